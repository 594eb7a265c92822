#!/usr/bin/env bash
# Debian packages some distributions read: the Python documentation sources (distribution "technical").
set -euo pipefail
if [ -d /usr/share/doc/python3.11/html/_sources ]; then
  exit 0
fi
if ! command -v apt-get >/dev/null; then
  echo "jtc: the 'technical' distribution needs the Debian package python3.11-doc (no apt-get here)" >&2
  exit 0
fi
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq python3.11-doc >/dev/null

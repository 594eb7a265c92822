#!/usr/bin/env bash
# Debian packages some distributions read: the Python documentation sources (distribution "technical"),
# and Chromium for the leaderboard's browser test (driven by playwright, which must not download its own).
set -euo pipefail
if [ -d /usr/share/doc/python3.11/html/_sources ] && [ -e /usr/bin/chromium ]; then
  exit 0
fi
if ! command -v apt-get >/dev/null; then
  echo "jtc: the 'technical' distribution needs the Debian package python3.11-doc, the browser test chromium (no apt-get here)" >&2
  exit 0
fi
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq python3.11-doc chromium >/dev/null

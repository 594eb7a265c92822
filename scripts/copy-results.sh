#!/usr/bin/env bash
# Copy the results files of finished runs (results_*.json and jtc_sweep.json, not the per-item samples) into a
# folder kept in git, with the same layout: copy-results.sh OUT DEST, e.g. out-paper docs/paper-run.
set -euo pipefail
src=${1:?usage: copy-results.sh OUT DEST} dest=${2:?usage: copy-results.sh OUT DEST}
cd "$src"
find . -type f \( -name 'results_*.json' -o -name 'jtc_sweep.json' \) -print0 |
    while IFS= read -r -d '' f; do mkdir -p "$dest/$(dirname "$f")" && cp -p "$f" "$dest/$f"; done

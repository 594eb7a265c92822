#!/usr/bin/env bash
# Copy finished runs into a folder kept in git, with the same layout: copy-results.sh OUT DEST, e.g. out-paper
# docs/paper-run. It copies results_*.json and jtc_sweep.json, and in place of the per-item samples (about 270
# values per item) the values the paired tests read, written beside them first by `jtc item-values`.
set -euo pipefail
src=${1:?usage: copy-results.sh OUT DEST} dest=${2:?usage: copy-results.sh OUT DEST}
dest=$(mkdir -p "$dest" && cd "$dest" && pwd)
jtc item-values "$src" >/dev/null
cd "$src"
find . -type f \( -name 'results_*.json' -o -name 'jtc_sweep.json' -o -name 'samples_*.safetensors' \) -print0 |
    while IFS= read -r -d '' f; do mkdir -p "$dest/$(dirname "$f")" && cp -p "$f" "$dest/$f"; done

#!/usr/bin/env bash
# The benchmark on the bundled default: two real models, every jtc task, results under out/.
# Sizes and models can be raised: JTC_N_EVAL, JTC_N_FIT, JTC_MODELS (see README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/system-packages.sh
python3 -m pip install --quiet "tox>=4"
python3 -m tox -e default

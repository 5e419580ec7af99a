#!/usr/bin/env bash
# The test command: unit tests, then every chapter executed and checked by nbval.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export IPYTHONDIR="$PWD/.venv/ipython" OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
.venv/bin/python -m pytest -q -p no:cacheprovider tests "$@"
.venv/bin/python -m pytest -q -p no:cacheprovider --nbval-lax --nbval-cell-timeout=900 book

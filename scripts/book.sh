#!/usr/bin/env bash
# The main command: set up, fetch the offline JS (MathJax, widgets), and build
# the HTML book into _build/html, executing every chapter. Extra arguments go
# to jupyter-book (CI adds -W to treat warnings as errors).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/offline_assets.sh
export IPYTHONDIR="$PWD/.venv/ipython" OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
rm -rf _build
start=$(date +%s)
.venv/bin/jupyter-book build --all "$@" .
echo "book built in $(( $(date +%s) - start )) s: open _build/html/index.html"

#!/usr/bin/env bash
# Create .venv (if missing) and install mlbook with the book and test tools.
# torch is installed first and pinned here only: 2.13.0 is the CPU wheel this
# project is tested with; pyproject.toml keeps a lower bound (Colab brings its own).
set -euo pipefail
# .ci/run sets up once before running book.sh and test.sh side by side.
[ "${MLBOOK_SKIP_SETUP:-}" = 1 ] && exit 0
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q -U pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[book,test]"
# A quiet IPython profile: ipykernel 7 warns about TCP on every kernel start.
mkdir -p .venv/ipython/profile_default
echo "c.IPKernelApp.log_level = 'ERROR'" > .venv/ipython/profile_default/ipython_kernel_config.py

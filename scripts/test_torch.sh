#!/usr/bin/env bash
# The test command (unit tests, then every chapter under nbval) with another
# torch release than CI's 2.13.0: pyproject's lower bound, or the release a
# Colab runtime brings. Each release gets a venv of its own, .venv-torch-VERSION,
# made on first use. PyPI's Linux wheels of torch are CUDA builds: a few GB of
# downloads the first time; they run on a CPU too.
#
#   bash scripts/test_torch.sh 2.6.0 [pytest options for the unit tests]
set -euo pipefail
cd "$(dirname "$0")/.."
version=${1:?usage: bash scripts/test_torch.sh VERSION [pytest options]}
shift
venv=.venv-torch-$version
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  # torch first and pinned: the package's own range would admit any release
  "$venv/bin/pip" install -q "torch==$version"
  "$venv/bin/pip" install -q -e ".[test]"
fi
"$venv/bin/python" -c "import torch; print('torch', torch.__version__)"
# the chapters' kernel is the venv's python: first on PATH
export IPYTHONDIR="$PWD/$venv/ipython" OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export PATH="$PWD/$venv/bin:$PATH"
"$venv/bin/python" -m pytest -q -p no:cacheprovider tests "$@"
"$venv/bin/python" -m pytest -q -p no:cacheprovider --nbval-lax --nbval-cell-timeout=900 book

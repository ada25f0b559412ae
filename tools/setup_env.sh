#!/usr/bin/env bash
# Create (or reuse) the project virtualenv and install crate_lm into it.
#
#   VENV=.venv        where the environment lives
#   PYTHON=python3    the interpreter to build it from
#   TORCH_SPEC=...    the torch requirement installed when none is present (default torch==2.13.0)
#   TORCH_INDEX=URL   extra pip index for torch only (e.g. a CPU-only or CUDA wheel index)
#
# A torch that the base interpreter already has (a cluster's CUDA build, a container's) is kept:
# the venv then sees it through --system-site-packages and pip installs nothing over it.
set -euo pipefail
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
stamp="$VENV/.crate_lm_installed"

if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ]; then
  exit 0
fi
if [ ! -x "$VENV/bin/python" ]; then
  if "$PYTHON" -c "import torch" 2>/dev/null; then
    echo "setup: keeping the torch of $PYTHON ($("$PYTHON" -c 'import torch; print(torch.__version__)'))"
    "$PYTHON" -m venv --system-site-packages "$VENV"
  else
    "$PYTHON" -m venv "$VENV"
  fi
fi
pip=("$VENV/bin/python" -m pip)
"${pip[@]}" install -q --upgrade pip
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "setup: installing $TORCH_SPEC"
  "${pip[@]}" install -q "$TORCH_SPEC" ${TORCH_INDEX:+--extra-index-url "$TORCH_INDEX"}
fi
"${pip[@]}" install -q -e ".[dev]"
touch "$stamp"
echo "setup: ready ($("$VENV/bin/python" -c 'import torch, deepspeed; print(f"torch {torch.__version__}, deepspeed {deepspeed.__version__}")'))"

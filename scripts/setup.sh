#!/usr/bin/env bash
# Create a venv (if missing) and install cxr-dist with every extra and the test tools
# (`.[dev]`: DeepSpeed, offline weights, pytest), at the exact versions of constraints.txt.
# Idempotent: a second run only checks, and reinstalls when pyproject.toml or constraints.txt
# changed since the last install.
#
#   PYTHON   interpreter for a new venv (Python >= 3.11; default python3)
#   VENV     where the venv lives (default .venv in the repository)
#
# torch/torchvision: pyproject.toml takes 2.14.x / 0.29.x; the team's machines have 2.14.1 and
# 0.29.1 as local wheels (a CUDA build that also runs on the CPU): about 2 minutes and 6.3 GB for
# a fresh venv.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating $VENV with $($PYTHON --version)" >&2
    "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.cxr-dist-setup"
want="$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] ||
   ! "$VENV/bin/python" -c "import cxr_dist, torch, timm, accelerate, deepspeed, mlflow, webdataset, yaml, pytest" >/dev/null 2>&1; then
    echo "[setup] installing cxr-dist[dev] into $VENV (a few minutes the first time)" >&2
    "$VENV/bin/pip" install --quiet --disable-pip-version-check -c constraints.txt -e ".[dev]"
    echo "$want" > "$stamp"
fi
echo "[setup] ready: $("$VENV/bin/python" -c 'import torch, accelerate; print("torch", torch.__version__, "accelerate", accelerate.__version__)')" >&2

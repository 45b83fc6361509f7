#!/usr/bin/env bash
# Create .venv (if missing) and install cxr-dist with every extra (DeepSpeed, offline weights, tests).
# Idempotent: a second run only checks. Python >= 3.11 as `python3`, or set PYTHON.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    echo "[setup] creating .venv with $($PYTHON --version)" >&2
    "$PYTHON" -m venv .venv
fi
# pyproject.toml pins torch==2.14.1 / torchvision==0.29.1 (see docs/environment.md).
if ! .venv/bin/python -c "import cxr_dist, torch, timm, accelerate, deepspeed, mlflow, webdataset, pytest" 2>/dev/null; then
    echo "[setup] installing cxr-dist[all] into .venv (a few minutes the first time)" >&2
    .venv/bin/pip install --quiet --disable-pip-version-check -e ".[all]"
fi
echo "[setup] ready: $(.venv/bin/python -c 'import torch, accelerate; print("torch", torch.__version__, "accelerate", accelerate.__version__)')" >&2

#!/usr/bin/env bash
# Set everything up and run the whole test suite:   ./test.sh   (extra arguments go to pytest)
#
# Installs .venv, starts a real one-node SLURM cluster on this machine (root + apt-get; its tests
# skip with a reason where it cannot start, except in CI), runs pytest, stops the cluster.
# The tests start and stop their own `mlflow server` on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
export CXR_SLURM_DIR="${CXR_SLURM_DIR:-/tmp/cxr-slurm-$$}"
if bash .ci/slurm_cluster.sh start; then
    trap 'bash .ci/slurm_cluster.sh stop || true' EXIT
    # shellcheck disable=SC1091
    source "$CXR_SLURM_DIR/env.sh"
else
    echo "[test] no SLURM cluster: tests/test_slurm.py will skip (or fail under CI=true)" >&2
fi
.venv/bin/python -m pytest "$@"

"""Helpers for tests that submit real jobs to a SLURM cluster (see .ci/slurm_cluster.sh)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
            "DEADLINE", "PREEMPTED"}


def cluster_problem() -> str | None:
    """None when a SLURM cluster answers, else why not."""
    if not shutil.which("sbatch") or not shutil.which("sinfo"):
        return "SLURM client commands (sbatch, sinfo) are not installed"
    if not os.environ.get("SLURM_CONF") and not Path("/etc/slurm/slurm.conf").exists():
        return "SLURM_CONF is not set (start one: .ci/slurm_cluster.sh start; source /tmp/cxr-slurm/env.sh)"
    try:
        res = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=15)
    except subprocess.TimeoutExpired:
        return "sinfo timed out"
    states = res.stdout.split()
    if res.returncode != 0:
        return f"sinfo failed: {res.stderr.strip()[:200]}"
    if not any(s.rstrip("*~#!%$@^-") in ("idle", "mix", "alloc", "comp") for s in states):
        return f"no usable node (sinfo states: {states})"
    return None


def require_cluster() -> None:
    """Skip without a cluster, but fail under CI=true: CI must not skip the scheduler silently."""
    problem = cluster_problem()
    if problem is None:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true but no SLURM cluster: {problem}", pytrace=False)
    pytest.skip(f"no SLURM cluster: {problem}")


def job_env(**extra: str) -> dict[str, str]:
    """The environment sbatch passes on to the job (--export=ALL)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "SBATCH_", "SRUN_")) or k == "SLURM_CONF"}
    # slurm_launch must set the CPU flag itself; MLflow goes where each test says.
    for key in ("ACCELERATE_USE_CPU", "MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME",
                "CXR_RUN_DIR", "CXR_ACCELERATE_CONFIG"):
        env.pop(key, None)
    env.update(OMP_NUM_THREADS="1", MLFLOW_DISABLE_TELEMETRY="true", DS_ACCELERATOR="cpu",
               CXR_VENV=str(Path(sys.executable).parent.parent))
    env.update(extra)
    return env


def sbatch(script: str, args: list[str], log_dir: Path, *, sbatch_opts: list[str] = (),
           env: dict[str, str] | None = None) -> str:
    """Submit slurm/<script> from the repository root, sized for a 2-CPU test node; the job id."""
    log_dir.mkdir(parents=True, exist_ok=True)
    cmd = ["sbatch", "--parsable", "--cpus-per-task=2", "--gpus-per-node=0", "--mem=0", "--time=15",
           f"--output={log_dir}/%x-%j.out", *sbatch_opts, f"slurm/{script}", *args]
    res = subprocess.run(cmd, cwd=ROOT, env=env or job_env(), capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, f"sbatch failed: {res.stderr}"
    return res.stdout.strip().split(";")[0]


def job_records(job_id: str) -> list[dict[str, str]]:
    """`scontrol show job -o ID` as dicts: one per job, one per task for an array job id."""
    res = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30)
    if res.returncode != 0:
        return []
    records = []
    for line in res.stdout.splitlines():
        info: dict[str, str] = {}
        for field in line.split():
            if "=" in field:
                k, v = field.split("=", 1)
                info.setdefault(k, v)
        if info:
            records.append(info)
    return records


def wait_job(job_id: str, timeout: float, min_restarts: int = 0) -> list[dict[str, str]]:
    """Poll until the job (every task of an array) ended, after `min_restarts` requeues."""
    deadline = time.time() + timeout
    records: list[dict[str, str]] = []
    while time.time() < deadline:
        records = job_records(job_id)
        if records and all(r.get("JobState") in TERMINAL and int(r.get("Restarts", "0")) >= min_restarts
                           for r in records):
            return records
        time.sleep(1)
    subprocess.run(["scancel", job_id], timeout=30)
    raise AssertionError(f"job {job_id} did not finish in {timeout:.0f} s: {records}")


def log_text(log_dir: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-6000:]}" for p in sorted(log_dir.glob("*.out")))

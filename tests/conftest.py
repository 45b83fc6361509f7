"""Shared fixtures: tiny prepared shards, and a runner for real `accelerate launch` jobs."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
TINY = ROOT / "configs" / "tiny.toml"

# The session-scoped `mlflow_server` fixture (a real `mlflow server`), registered once for every test
# module here: tests name it as an argument and import only the helpers (api, experiment_runs, ...).
pytest_plugins = ["tests.mlflow_server"]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        # A CPU-only machine needs this for real multi-process runs (launch/cpu_2proc.yaml).
        ACCELERATE_USE_CPU="true",
        DS_ACCELERATOR="cpu",
        MLFLOW_DISABLE_TELEMETRY="true",
        OMP_NUM_THREADS="1",  # two processes on two cores
        PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
    )
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def run_cmd(args: list[str], cwd: Path, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a command; on failure the assertion message shows its output."""
    return subprocess.run(args, cwd=cwd, env={**_env(), **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)


def accelerate_launch(module_args: list[str], cwd: Path, config: str = "cpu_2proc.yaml", timeout: int = 300,
                      env: dict | None = None) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file launch/<config> -m ...`: real processes, real gloo.

    The shipped configs name files relative to the repository root (where the SLURM scripts run);
    tests run elsewhere, so a copy with absolute paths is used.
    """
    text = (ROOT / "launch" / config).read_text().replace("launch/", f"{ROOT}/launch/")
    copy = cwd / f".launch-{config}"
    copy.write_text(text)
    args = [str(VENV_BIN / "accelerate"), "launch", "--config_file", str(copy), *module_args]
    return run_cmd(args, cwd, timeout, env)


# For a run whose end (MLflow logging of the servable model, Grad-CAM overlays) is not under test,
# e.g. the interrupted and resumed runs compared with an uninterrupted reference that has them:
# ~10 s less per run. Training, checkpoints and the final evaluation are unchanged.
QUICK_END = ("--tracking.enabled", "false", "--product.cam_images", "0")


def tiny_overrides(shards: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["--config", str(TINY), "--data.shards_dir", str(shards), "--train.run_dir", str(run_dir),
            "--tracking.uri", f"sqlite:///{run_dir.parent}/mlflow.db", *extra]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    from tests.datagen import make_dataset

    return make_dataset(tmp_path_factory.mktemp("tiny") / "ds", n_uids=40, size=64)


@pytest.fixture(scope="session")
def tiny_shards(tiny_data: Path, tmp_path_factory) -> Path:
    """The tiny dataset prepared with configs/tiny.toml (48 px stored, 32 px input)."""
    out = tmp_path_factory.mktemp("tiny-shards") / "shards"
    res = run_cmd([str(VENV_BIN / "cxr-dist"), "prepare", "--config", str(TINY), "--data", str(tiny_data),
                   "--out", str(out)], cwd=out.parent)
    assert res.returncode == 0, res.stdout + res.stderr
    return out

"""The documented GPU experiment script (bench/gpu_experiments.sh) end to end, on the CPU.

No GPU here: the script runs its real pipeline (prepare -> concurrent training runs -> summary,
and the salvage of a run stopped before its end) on a tiny dataset with a tiny schedule, in fp32,
with the offline Lite1 weights (its default); `bench_gpu.py` refuses without CUDA and the
script goes on. What only a GPU shows (speed, bf16) is in docs/performance.md, section 5.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.datagen import make_dataset

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--train.mixed_precision", "no", "--loader.input_size", "32", "--loader.batch_size", "8",
        "--train.phases.0.epochs", "1"]


def run_script(tmp_path: Path, runs: str, overrides: list[str], **env: str) -> subprocess.CompletedProcess:
    data = make_dataset(tmp_path / "data", n_uids=40, size=64)
    env = {**os.environ, "PY": sys.executable, "OUT": str(tmp_path / "out"), "WORKERS": "1", "RUNS": runs,
           "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **env}
    return subprocess.run(["bash", str(ROOT / "bench" / "gpu_experiments.sh"), str(data), *overrides],
                          env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_gpu_experiments_script_on_cpu(tmp_path):
    # ENSEMBLE: score the two runs' mean as well (on a GPU: the four all16 seeds)
    res = run_script(tmp_path, "default all16", [*TINY, "--train.phases.1.epochs", "1"], ENSEMBLE="default all16")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "no CUDA device" in res.stderr + res.stdout
    out = tmp_path / "out"
    summary = (out / "summary.md").read_text().splitlines()
    assert [line.split("|")[1].strip() for line in summary[2:]] == ["default", "all16"]
    for name, depth in (("default", 1), ("all16", 16)):
        run = out / "runs" / name
        history = json.loads((run / "history.json").read_text())
        assert [r["phase"] for r in history] == [1, 2]
        assert f"unfreeze_blocks = {depth}" in (run / "config.toml").read_text()
        assert "test" in json.loads((run / "evaluation.json").read_text())
    ensemble = (out / "ensemble.md").read_text()
    assert "/runs/default |" in ensemble and "/runs/all16 |" in ensemble and "| **mean of 2** |" in ensemble
    assert json.loads((out / "ensemble.json").read_text())["test"]["image_level"]["n"] > 0


@pytest.mark.slow
def test_gpu_experiments_script_salvages_a_stopped_run(tmp_path):
    # A run stopped in phase 2 (on the GPU machine: by RUN_LIMIT's timeout): its history comes from
    # the latest checkpoint and its evaluation from the best one, so the summary still has a row.
    # Here the stop is a preemption injected at the 20th step check (phase 1 is one epoch of ~6
    # steps), so it lands in phase 2 however loaded the machine is; a wall-clock RUN_LIMIT of 90 s
    # failed under load (start-up and phase 1 did not fit). RUN_LIMIT stays as a safety net.
    res = run_script(tmp_path, "default", [*TINY, "--train.phases.1.epochs", "500"], BENCH="0", RUN_LIMIT="600",
                     CXR_DIST_FAULT_PREEMPT_AT_CHECK="20")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "default: stopped before the end" in res.stdout
    assert "evaluated its best checkpoint after" in res.stdout
    run = tmp_path / "out" / "runs" / "default"
    history = json.loads((run / "history.json").read_text())
    assert 1 <= len(history) < 501 and history[-1]["phase"] == 2
    evaluation = json.loads((run / "evaluation.json").read_text())
    assert evaluation["test"]["image_level"]["n"] > 0  # and the other files a finished run writes:
    assert 0.0 < evaluation["test_at_val_threshold"]["threshold"] < 1.0
    assert "val" in evaluation and (run / "predictions.csv").is_file()
    assert (tmp_path / "out" / "summary.md").read_text().count("| default |") == 1


def test_gpu_experiments_script_fails_when_no_run_finishes(tmp_path):
    # a misspelt override: the run stops at once with a config error, and so does the script
    res = run_script(tmp_path, "default", ["--train.epochz", "3"], BENCH="0")
    assert res.returncode == 1
    assert "no checkpoint" in res.stderr + res.stdout
    assert "no run finished or could be evaluated" in res.stderr


def test_compare_histories_counts_what_differs(tmp_path):
    """bench/compare_histories.py (behaviour kept across refactors, bench/legacy_equivalence.sh):
    timing fields never count; any other difference does (exit 1); with --new-fields-ok, fields
    that only the second run reports are allowed, but a changed value still is not."""
    import json as _json

    def run(name, history, rows):
        d = tmp_path / name
        d.mkdir()
        (d / "history.json").write_text(_json.dumps(history))
        (d / "evaluation.json").write_text(_json.dumps({"test": {"auroc": 0.75}}))
        (d / "predictions.csv").write_text("split,key,label,prob_abnormal\n" + "".join(f"test,{k},{y},{p}\n" for k, y, p in rows))
        return d

    rows = [("a", 0, 0.2), ("b", 1, 0.7)]
    a = run("a", [{"epoch": 1, "val/auroc": 0.7, "epoch_time_s": 3.0}], rows)
    b = run("b", [{"epoch": 1, "val/auroc": 0.7, "epoch_time_s": 9.0}], rows)
    c = run("c", [{"epoch": 1, "val/auroc": 0.7, "epoch_time_s": 9.0, "val/source_mean_auroc": 0.7}], rows)
    d = run("d", [{"epoch": 1, "val/auroc": 0.7, "epoch_time_s": 9.0}], [("a", 0, 0.2), ("b", 1, 0.71)])
    script = [sys.executable, str(ROOT / "bench" / "compare_histories.py")]

    def run_cmd(args, cwd):
        return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120)

    same = run_cmd([*script, str(a), str(b)], cwd=tmp_path)
    assert same.returncode == 0 and "identical apart from timing" in same.stdout, same.stdout + same.stderr
    assert run_cmd([*script, str(a), str(c)], cwd=tmp_path).returncode == 1  # a new field counts by default
    assert run_cmd([*script, "--new-fields-ok", str(a), str(c)], cwd=tmp_path).returncode == 0
    changed = run_cmd([*script, "--new-fields-ok", str(a), str(d)], cwd=tmp_path)
    assert changed.returncode == 1 and "prob_abnormal" in changed.stdout
    assert run_cmd([*script, str(a), str(tmp_path / "missing")], cwd=tmp_path).returncode == 2

"""Run files that a resume, a batch script or a reader relies on are written atomically (issue 23.9).

Each writer is made to crash half-way through its write (fileio's low-level writer is replaced by
one that writes half the bytes, then raises): the file that was there before must still be there,
whole, with no temporary file left beside it. A writer that does not go through
fileio.write_bytes_atomic does not crash at all, or leaves a truncated file: either fails here.
"""
from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from cxr_dist import fileio


class Crash(RuntimeError):
    pass


def arm_crash(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Make every atomic write die after writing half of its bytes; returns the paths it hit."""
    hit: list[Path] = []

    def half_then_crash(path: Path, data: bytes) -> None:
        hit.append(Path(path))
        with open(path, "wb") as f:
            f.write(data[: len(data) // 2])
        raise Crash(f"simulated crash while writing {path}")

    monkeypatch.setattr(fileio, "_write_bytes", half_then_crash)
    return hit


@pytest.fixture
def crash_midway(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    return arm_crash(monkeypatch)


def assert_intact(path: Path, old: bytes, hit: list[Path]) -> None:
    assert hit, f"{path.name} was not written through fileio.write_bytes_atomic"
    assert path.read_bytes() == old, f"{path.name}: the old file was replaced by a partial one"
    assert [p.name for p in path.parent.iterdir() if p.name != path.name and path.name in p.name] == []


def test_preempted_marker_is_written_atomically(tmp_path: Path, crash_midway: list[Path]) -> None:
    from cxr_dist.dist import PREEMPTED_FILE, PreemptionWatch

    before = signal.getsignal(signal.SIGUSR1)
    try:
        watch = PreemptionWatch(tmp_path)
    finally:
        signal.signal(signal.SIGUSR1, before)  # PreemptionWatch installs its handler in this process
    marker = tmp_path / PREEMPTED_FILE
    old = json.dumps({"epoch": 1, "step": 1}).encode() + b"\n"
    marker.write_bytes(old)
    with pytest.raises(Crash):
        watch.mark_preempted({"epoch": 2, "step": 7, "note": "x" * 4000})
    assert_intact(marker, old, crash_midway)


def test_preempted_marker_content(tmp_path: Path) -> None:
    from cxr_dist.dist import PREEMPTED_FILE, PreemptionWatch

    before = signal.getsignal(signal.SIGUSR1)
    try:
        watch = PreemptionWatch(tmp_path)
    finally:
        signal.signal(signal.SIGUSR1, before)
    watch.mark_preempted({"epoch": 2, "step": 7})
    assert json.loads((tmp_path / PREEMPTED_FILE).read_text()) == {"epoch": 2, "step": 7}


@pytest.mark.parametrize("kind", ["training", "roc_pr", "confusion", "reliability"])
def test_figures_are_written_atomically(tmp_path: Path, crash_midway: list[Path], kind: str) -> None:
    from cxr_dist.eval import plots

    path = tmp_path / f"{kind}.png"
    old = b"\x89PNG\r\n\x1a\n" + b"the figure of the previous epoch" * 100
    path.write_bytes(old)
    probs, labels = [0.1, 0.4, 0.35, 0.8, 0.9], [0, 0, 1, 1, 1]
    draw = {
        "training": lambda: plots.training_figure([{"epoch": 1, "train/loss": 0.7, "val/loss": 0.6},
                                                   {"epoch": 2, "train/loss": 0.5, "val/loss": 0.55}], [2], path),
        "roc_pr": lambda: plots.roc_pr_figure(probs, labels, path),
        "confusion": lambda: plots.confusion_figure([[5, 1], [2, 7]], path),
        "reliability": lambda: plots.reliability_figure(probs, [0.2, 0.4, 0.4, 0.7, 0.8], labels, path, bins=5),
    }[kind]
    with pytest.raises(Crash):
        draw()
    assert_intact(path, old, crash_midway)


def test_mlflow_run_id_file_is_written_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A new MLflow run (here: resume=False over a run folder that names an older run) replaces
    mlflow_run_id.txt; a crash in that write must leave the old id whole, not half an id that a
    requeued job would then fail to find."""
    from cxr_dist.config import TrackingConfig
    from cxr_dist.runs.tracking import RUN_ID_FILE, make_tracker

    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    cfg = TrackingConfig(uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="atomic")
    run_dir = tmp_path / "run"
    with make_tracker(cfg, True, run_dir) as first:
        pass
    id_file = run_dir / RUN_ID_FILE
    old = id_file.read_bytes()
    assert old.decode().strip() == first.run_id

    import mlflow

    hit = arm_crash(monkeypatch)
    try:
        with pytest.raises(Crash):
            make_tracker(cfg, True, run_dir, resume=False)
    finally:
        if mlflow.active_run() is not None:  # the run the crashed tracker had started
            mlflow.end_run("KILLED")
    assert_intact(id_file, old, hit)

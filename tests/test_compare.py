"""`cxr-dist compare` and `cxr-dist folds` against runs logged to a real MLflow server."""
from __future__ import annotations

import json
import statistics
import uuid
from pathlib import Path

import pytest

from cxr_dist import cli
from cxr_dist.compare import folds_main, main
from cxr_dist.config import TrackingConfig
from cxr_dist.errors import UserError
from cxr_dist.tracking import make_tracker
from tests.mlflow_server import mlflow_server  # noqa: F401 - registers the fixture


def log_run(url: str, experiment: str, run_dir: Path, params: dict, history: list[dict],
            final: dict | None = None, tags: tuple[str, ...] = ()) -> str:
    """One finished run: params, per-epoch metrics (step = epoch from 1), then final metrics."""
    with make_tracker(TrackingConfig(uri=url, experiment=experiment, tags=tags), True, run_dir) as t:
        t.log_params(params)
        for epoch, metrics in enumerate(history, start=1):
            t.log_metrics(metrics, step=epoch)
        if final:
            t.log_metrics(final, step=len(history))
    return t.run_id


def test_compare_shows_differing_params_and_best_metrics(mlflow_server: str, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    exp = f"cmp-{uuid.uuid4().hex[:8]}"
    common = {"data": {"batch_size": 32}, "model": {"backbone": "efficientnet_b1"}}
    log_run(mlflow_server, exp, tmp_path / "lr_small", {**common, "train": {"lr": 0.001}},
            [{"val/auroc": 0.70, "val/loss": 0.9}, {"val/auroc": 0.81, "val/loss": 0.5},
             {"val/auroc": 0.75, "val/loss": 0.7}],
            final={"test/auroc": 0.77, "best_test/auroc": 0.79, "best_test/ece": 0.1})
    log_run(mlflow_server, exp, tmp_path / "lr_big", {**common, "train": {"lr": 0.01}},
            [{"val/auroc": 0.65}, {"val/auroc": 0.68}])

    capsys.readouterr()  # drop MLflow's "View run ..." lines printed while logging
    assert main(["--experiment", exp, "--tracking-uri", mlflow_server]) == 0
    out = capsys.readouterr().out
    assert "train.lr" in out and "0.001" in out and "0.01" in out
    assert "data.batch_size" not in out and "model.backbone" not in out  # identical: hidden
    assert "best val/auroc" in out and "test/auroc" in out
    assert "0.8100" in out and "0.6800" in out and "0.7700" in out
    assert "best_test/auroc" in out and "0.7900" in out and "best_test/ece" not in out
    assert "lr_small" in out and "lr_big" in out and "FINISHED" in out

    assert main(["--experiment", exp, "--tracking-uri", mlflow_server, "--json",
                 "--metrics", "val/auroc,val/loss,test/auroc"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["params"] == ["train.lr"]
    rows = {r["name"]: r for r in result["runs"]}
    assert rows["lr_small"]["metrics"] == pytest.approx({"val/auroc": 0.81, "val/loss": 0.5, "test/auroc": 0.77})
    assert rows["lr_big"]["metrics"]["test/auroc"] is None
    assert rows["lr_big"]["params"] == {"train.lr": "0.01"}


def test_folds_summary_mean_and_std(mlflow_server: str, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    exp = f"folds-{uuid.uuid4().hex[:8]}"
    best = {0: 0.80, 1: 0.70, 2: 0.90}
    test = {0: 0.75, 1: 0.72, 2: 0.81}
    # A retried fold 1: its earlier attempt must be ignored (the latest run of a fold counts).
    log_run(mlflow_server, exp, tmp_path / "f1_old", {"data": {"fold": 1}}, [{"val/auroc": 0.1}],
            tags=("fold=1",))
    for f in (0, 1, 2):
        log_run(mlflow_server, exp, tmp_path / f"f{f}", {"data": {"fold": f}},
                [{"val/auroc": best[f] - 0.05}, {"val/auroc": best[f]}], final={"test/auroc": test[f]},
                tags=(f"fold={f}",))
    log_run(mlflow_server, exp, tmp_path / "untagged", {}, [{"val/auroc": 0.99}])  # not a fold run

    capsys.readouterr()  # drop MLflow's "View run ..." lines printed while logging
    assert folds_main(["--experiment", exp, "--tracking-uri", mlflow_server, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["folds"] == ["0", "1", "2"]
    auroc = result["metrics"]["val/auroc"]
    assert auroc["folds"] == pytest.approx({"0": 0.80, "1": 0.70, "2": 0.90})
    assert auroc["mean"] == pytest.approx(statistics.fmean(best.values()))
    assert auroc["std"] == pytest.approx(statistics.stdev(best.values()))  # 0.1
    assert result["metrics"]["test/auroc"]["mean"] == pytest.approx(statistics.fmean(test.values()))

    assert folds_main(["--experiment", exp, "--tracking-uri", mlflow_server]) == 0
    out = capsys.readouterr().out
    assert "best val/auroc" in out and "0.8000" in out and "0.1000" in out and "fold=2" in out


def test_missing_experiment_and_empty_store_are_clear(mlflow_server: str, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(UserError, match="does not exist"):
        main(["--experiment", "no-such-experiment", "--tracking-uri", mlflow_server])
    # Through the CLI: a message and exit code 2, no traceback.
    assert cli.main(["folds", "--experiment", "no-such-experiment", "--tracking-uri", mlflow_server]) == 2
    assert "no-such-experiment" in capsys.readouterr().err

    import mlflow

    empty = f"empty-{uuid.uuid4().hex[:8]}"
    mlflow.MlflowClient(mlflow_server).create_experiment(empty)
    with pytest.raises(UserError, match="no runs"):
        main(["--experiment", empty, "--tracking-uri", mlflow_server])

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(UserError, match="no MLflow store"):
        main([])
    assert not (tmp_path / "mlflow.db").exists()  # reading must not create an empty store

"""`cxr-dist compare` and `cxr-dist folds` against runs logged to a real MLflow server."""
from __future__ import annotations

import json
import statistics
import threading
import time
import uuid
from pathlib import Path

import pytest

from cxr_dist import cli
from cxr_dist.runs.compare import folds_main, main
from cxr_dist.config import TrackingConfig
from cxr_dist.errors import UserError
from cxr_dist.runs.tracking import CAMPAIGN_PARENT_TAG, PARENT_RUN_TAG, campaign_parent_run, make_tracker


@pytest.fixture(autouse=True)
def _no_mlflow_run_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """A developer's MLFLOW_RUN_ID / MLFLOW_EXPERIMENT_NAME would redirect every run of these tests."""
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)


def log_run(url: str, experiment: str, run_dir: Path, params: dict, history: list[dict],
            final: dict | None = None, tags: tuple[str, ...] = (), campaign: str = "",
            fail: bool = False) -> str:
    """One finished run (FAILED with `fail`): params, per-epoch metrics (step = epoch from 1), then
    final metrics."""
    cfg = TrackingConfig(uri=url, experiment=experiment, tags=tags, campaign=campaign)
    try:
        with make_tracker(cfg, True, run_dir) as t:
            t.log_params(params)
            for epoch, metrics in enumerate(history, start=1):
                t.log_metrics(metrics, step=epoch)
            if final:
                t.log_metrics(final, step=len(history))
            if fail:
                raise RuntimeError("fold crashed")
    except RuntimeError:
        assert fail
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
    assert "loader.batch_size" not in out and "model.backbone" not in out  # identical: hidden
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


def test_folds_summarises_one_campaign_from_finished_runs(mlflow_server: str, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """Two k-fold campaigns in one experiment, a FAILED retry of a finished fold, an unfinished
    campaign: `folds` takes the latest campaign by default, only FINISHED runs, and names what
    is missing; `--campaign` picks the earlier one."""
    import mlflow

    exp = f"folds-{uuid.uuid4().hex[:8]}"
    best = {0: 0.80, 1: 0.70, 2: 0.90}
    test = {0: 0.75, 1: 0.72, 2: 0.81}

    def fold(campaign: str, f: int, auroc: float, fail: bool = False, final: dict | None = None) -> str:
        return log_run(mlflow_server, exp, tmp_path / f"c{campaign}-f{f}-{uuid.uuid4().hex[:4]}",
                       {"data": {"fold": f, "k_folds": 3}}, [{"val/auroc": auroc - 0.05}, {"val/auroc": auroc}],
                       final=final, tags=(f"fold={f}",), campaign=campaign, fail=fail)

    # Campaign 100: every fold FINISHED, then a retry of fold 1 that FAILED (it must not replace
    # the finished run, though it is the latest run of fold 1).
    first = {f: fold("100", f, best[f], final={"test/auroc": test[f]}) for f in (0, 1, 2)}
    fold("100", 1, 0.10, fail=True)
    log_run(mlflow_server, exp, tmp_path / "untagged", {}, [{"val/auroc": 0.99}])  # not a fold run
    # Campaign 200, later: fold 0 finished, fold 1 failed, fold 2 never ran.
    later = fold("200", 0, 0.60)
    fold("200", 1, 0.65, fail=True)

    capsys.readouterr()  # drop MLflow's "View run ..." lines printed while logging
    assert folds_main(["--experiment", exp, "--tracking-uri", mlflow_server, "--json"]) == 0
    latest = json.loads(capsys.readouterr().out)
    assert latest["campaign"] == "200" and latest["campaigns"] == ["200", "100"]
    assert latest["folds"] == ["0"] and latest["runs"] == {"0": later}
    assert latest["missing"] == {"1": "FAILED", "2": "no run"}
    assert latest["expected_folds"] == ["0", "1", "2"]
    assert latest["metrics"]["val/auroc"]["folds"] == pytest.approx({"0": 0.60})

    assert folds_main(["--experiment", exp, "--tracking-uri", mlflow_server, "--json", "--campaign", "100"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["folds"] == ["0", "1", "2"] and result["missing"] == {}
    assert result["runs"] == {str(f): first[f] for f in (0, 1, 2)}  # not the FAILED retry of fold 1
    auroc = result["metrics"]["val/auroc"]
    assert auroc["folds"] == pytest.approx({"0": 0.80, "1": 0.70, "2": 0.90})
    assert auroc["mean"] == pytest.approx(statistics.fmean(best.values()))
    assert auroc["std"] == pytest.approx(statistics.stdev(best.values()))  # 0.1
    assert result["metrics"]["test/auroc"]["mean"] == pytest.approx(statistics.fmean(test.values()))

    # One parent run per campaign, every fold run (the failed ones too) nested under it.
    client = mlflow.MlflowClient(mlflow_server)
    exp_id = client.get_experiment_by_name(exp).experiment_id
    parent_of: dict[str, str] = {}
    for campaign, n_folds in (("100", 4), ("200", 2)):
        runs = client.search_runs([exp_id], filter_string=f"tags.campaign = '{campaign}'")
        parents = [r for r in runs if CAMPAIGN_PARENT_TAG in r.data.tags]
        assert len(parents) == 1 and parents[0].data.tags[CAMPAIGN_PARENT_TAG] == "confirmed"
        assert parents[0].info.status == "FINISHED" and parents[0].info.run_name == f"campaign-{campaign}"
        parent_of[campaign] = parents[0].info.run_id
        children = [r for r in runs if r.info.run_id != parent_of[campaign]]
        assert len(children) == n_folds
        assert {r.data.tags.get(PARENT_RUN_TAG) for r in children} == {parent_of[campaign]}
    assert result["parent_run_id"] == parent_of["100"] and latest["parent_run_id"] == parent_of["200"]
    assert result["nested"] and latest["nested"]

    assert folds_main(["--experiment", exp, "--tracking-uri", mlflow_server]) == 0
    out = capsys.readouterr().out
    assert "campaign 200" in out and "1 of 3 fold(s) FINISHED" in out
    assert "missing (no FINISHED run): fold=1 (FAILED), fold=2 (no run)" in out
    assert "other campaigns (--campaign ID): 100" in out
    with pytest.raises(UserError, match="campaign '300'.*200, 100"):
        folds_main(["--experiment", exp, "--tracking-uri", mlflow_server, "--campaign", "300"])

    # `compare` lists the training runs, not the campaign parents (no params: every param would
    # "differ").
    assert main(["--experiment", exp, "--tracking-uri", mlflow_server, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["runs"]
    assert len(rows) == 4 + 2 + 1 and not any(r["name"].startswith("campaign-") for r in rows)


def test_runs_without_campaign_still_summarised(mlflow_server: str, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """Fold runs logged without tracking.campaign (older runs, by hand): FINISHED ones count."""
    exp = f"legacy-{uuid.uuid4().hex[:8]}"
    for f, auroc in ((0, 0.8), (1, 0.7)):
        log_run(mlflow_server, exp, tmp_path / f"f{f}", {}, [{"val/auroc": auroc}], tags=(f"fold={f}",))
    log_run(mlflow_server, exp, tmp_path / "f1-retry", {}, [{"val/auroc": 0.1}], tags=("fold=1",), fail=True)
    capsys.readouterr()
    assert folds_main(["--experiment", exp, "--tracking-uri", mlflow_server, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["campaign"] is None and result["parent_run_id"] is None
    assert result["metrics"]["val/auroc"]["folds"] == pytest.approx({"0": 0.8, "1": 0.7})
    assert result["missing"] == {}


def test_campaign_parent_is_created_once_by_simultaneous_tasks(mlflow_server: str) -> None:
    """Eight array tasks asking for the parent at the same moment get the same one, and exactly one
    live parent exists afterwards; a candidate left 'pending' by a dead task is ignored once stale."""
    import mlflow

    client = mlflow.MlflowClient(mlflow_server)
    exp_id = client.create_experiment(f"race-{uuid.uuid4().hex[:8]}")
    barrier = threading.Barrier(8)
    got: list[str] = []
    errors: list[BaseException] = []

    def task() -> None:
        try:
            own = mlflow.MlflowClient(mlflow_server)
            barrier.wait()
            got.append(campaign_parent_run(own, exp_id, "42"))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=task) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert len(got) == 8 and len(set(got)) == 1
    live = client.search_runs([exp_id], filter_string="tags.campaign = '42'")
    assert [r.info.run_id for r in live] == got[:1]
    assert live[0].data.tags[CAMPAIGN_PARENT_TAG] == "confirmed"

    # A pending candidate of a task that died: waited for while fresh, ignored once stale.
    dead = client.create_run(exp_id, run_name="campaign-7",
                             tags={"campaign": "7", CAMPAIGN_PARENT_TAG: "pending"}).info.run_id
    start = time.monotonic()
    parent = campaign_parent_run(client, exp_id, "7", stale_s=2)
    assert parent != dead and time.monotonic() - start >= 1
    assert campaign_parent_run(client, exp_id, "7") == parent


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

"""Tracker against a real MLflow server; results read back over its REST API with plain HTTP."""
from __future__ import annotations

import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pandas as pd
import pytest
import torch

from cxr_dist.config import TrackingConfig
from cxr_dist.errors import UserError
from cxr_dist.eval.plots import confusion_figure, roc_pr_figure, training_figure
from cxr_dist.runs.tracking import RUN_ID_FILE, MLflowTracker, NullTracker, flatten_params, make_tracker
from tests.mlflow_server import api, experiment_runs, free_port

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _no_mlflow_run_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """A developer's MLFLOW_RUN_ID / MLFLOW_EXPERIMENT_NAME would redirect every run of these tests."""
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)




def cfg_for(url: str, **kw: object) -> TrackingConfig:
    return TrackingConfig(uri=url, experiment=f"test-{uuid.uuid4().hex[:8]}", **kw)


def history_rows(epochs: int = 2) -> list[dict]:
    return [{"epoch": e, "phase": int(e > 1), **{f"{s}/{m}": 0.5 + 0.1 * e for s in ("train", "val")
                                                  for m in ("loss", "accuracy", "f1", "auroc")}}
            for e in range(1, epochs + 1)]


def test_flatten_params_nested_lists_and_long_values() -> None:
    flat = flatten_params({"train": {"lr": 1e-3, "phases": [{"epochs": 2}, {"epochs": 3}]},
                           "tracking": {"tags": ["fold=1", "x=y"]}, "long": "a" * 7000})
    assert flat["train.lr"] == "0.001"
    assert flat["train.phases.1.epochs"] == "3"
    assert flat["tracking.tags"] == "fold=1,x=y"
    assert len(flat["long"]) == 6000 and flat["long"].endswith("...")


def test_run_logs_params_metrics_artifacts_and_model(mlflow_server: str, tmp_path: Path) -> None:
    import mlflow.pytorch

    cfg = cfg_for(mlflow_server, tags=("fold=2", "purpose=test"))
    run_dir = tmp_path / "run_a"
    # A pyfunc "from code" (the way serve.py logs the real model: nothing pickled).
    code = tmp_path / "double.py"
    code.write_text("import mlflow\n\nclass Double(mlflow.pyfunc.PythonModel):\n"
                    "    def predict(self, context, model_input, params=None):\n        return model_input * 2\n\n"
                    "mlflow.models.set_model(Double())\n")
    note = tmp_path / "note.txt"
    note.write_text("hello")
    with make_tracker(cfg, True, run_dir) as tracker:
        assert isinstance(tracker, MLflowTracker)
        tracker.log_params({"train": {"lr": 0.001, "phases": [{"epochs": 1}, {"epochs": 1}]}})
        for epoch in (1, 2):
            tracker.log_metrics({"train/loss": 1.0 / epoch, "val/auroc": 0.6 + 0.1 * epoch,
                                 "val/nan": float("nan"), "val/text": "x", "val/t": torch.tensor(0.25)}, step=epoch)
        tracker.log_artifact(note)
        tracker.log_dict({"epochs": 2}, "summary.json")
        png = training_figure(history_rows(), [2], tmp_path / "training.png")
        tracker.log_figure(png, "figures/training.png")
        model_uri = tracker.log_pyfunc(python_model=str(code))
        run_id = tracker.run_id

    assert (run_dir / RUN_ID_FILE).read_text().strip() == run_id
    runs = experiment_runs(mlflow_server, cfg.experiment)
    assert [r["info"]["run_id"] for r in runs] == [run_id]  # exactly one run

    run = api(mlflow_server, "runs/get", run_id=run_id)["run"]
    assert run["info"]["status"] == "FINISHED"
    assert run["info"]["run_name"] == "run_a"
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert params == {"train.lr": "0.001", "train.phases.0.epochs": "1", "train.phases.1.epochs": "1"}
    tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
    assert tags["fold"] == "2" and tags["purpose"] == "test"
    assert tags["model_uri.model"] == model_uri
    metric_keys = {m["key"] for m in run["data"]["metrics"]}
    assert metric_keys == {"train/loss", "val/auroc", "val/t"}  # non-finite and non-scalar skipped

    hist = api(mlflow_server, "metrics/get-history", run_id=run_id, metric_key="val/auroc")["metrics"]
    assert sorted((m["step"], round(m["value"], 6)) for m in hist) == [(1, 0.7), (2, 0.8)]

    top = {f["path"] for f in api(mlflow_server, "artifacts/list", run_id=run_id)["files"]}
    assert {"note.txt", "summary.json", "figures"} <= top
    figs = api(mlflow_server, "artifacts/list", run_id=run_id, path="figures")["files"]
    assert [(f["path"], int(f["file_size"]) > 0) for f in figs] == [("figures/training.png", True)]

    mlflow.set_tracking_uri(mlflow_server)
    loaded = mlflow.pyfunc.load_model(model_uri)
    frame = pd.DataFrame({"x": [1.0, 2.5]})
    assert loaded.predict(frame)["x"].tolist() == [2.0, 5.0]


def test_exception_marks_run_failed_and_propagates(mlflow_server: str, tmp_path: Path) -> None:
    cfg = cfg_for(mlflow_server)
    with pytest.raises(ValueError, match="boom"):
        with make_tracker(cfg, True, tmp_path / "r") as tracker:
            tracker.log_metrics({"train/loss": 1.0}, step=1)
            raise ValueError("boom")
    assert api(mlflow_server, "runs/get", run_id=tracker.run_id)["run"]["info"]["status"] == "FAILED"


def test_keyboard_interrupt_marks_run_killed(mlflow_server: str, tmp_path: Path) -> None:
    cfg = cfg_for(mlflow_server)
    with pytest.raises(KeyboardInterrupt):
        with make_tracker(cfg, True, tmp_path / "r") as tracker:
            raise KeyboardInterrupt
    assert api(mlflow_server, "runs/get", run_id=tracker.run_id)["run"]["info"]["status"] == "KILLED"


def test_resume_continues_the_same_run(mlflow_server: str, tmp_path: Path) -> None:
    cfg = cfg_for(mlflow_server)
    run_dir = tmp_path / "resumable"
    with pytest.raises(KeyboardInterrupt):  # a preempted first attempt
        with make_tracker(cfg, True, run_dir) as first:
            first.log_params({"train": {"lr": 0.001, "seed": 1}})
            first.log_metrics({"val/auroc": 0.6}, step=1)
            raise KeyboardInterrupt
    with make_tracker(cfg, True, run_dir) as second:
        # Same values again must not fail; a changed one is kept as a tag, not an error.
        second.log_params({"train": {"lr": 0.001, "seed": 2, "epochs": 3}})
        second.log_metrics({"val/auroc": 0.7}, step=2)
    assert second.run_id == first.run_id
    assert len(experiment_runs(mlflow_server, cfg.experiment)) == 1
    run = api(mlflow_server, "runs/get", run_id=first.run_id)["run"]
    assert run["info"]["status"] == "FINISHED"
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert params == {"train.lr": "0.001", "train.seed": "1", "train.epochs": "3"}
    tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
    assert tags["param_changed_on_resume.train.seed"] == "2"
    hist = api(mlflow_server, "metrics/get-history", run_id=first.run_id, metric_key="val/auroc")["metrics"]
    assert sorted(m["step"] for m in hist) == [1, 2]

    with make_tracker(cfg, True, run_dir, resume=False) as fresh:
        pass
    assert fresh.run_id != first.run_id
    assert (run_dir / RUN_ID_FILE).read_text().strip() == fresh.run_id


def test_null_tracker_creates_nothing(mlflow_server: str, tmp_path: Path) -> None:
    cfg = cfg_for(mlflow_server)
    for tracker in (make_tracker(cfg, False, tmp_path / "r"),
                    make_tracker(TrackingConfig(uri=mlflow_server, experiment=cfg.experiment, enabled=False),
                                 True, tmp_path / "r")):
        assert isinstance(tracker, NullTracker)
        with tracker:
            tracker.log_params({"a": 1})
            tracker.log_metrics({"train/loss": 1.0}, step=1)
            tracker.log_artifact(tmp_path)
            tracker.log_dict({}, "x.json")
            tracker.log_figure("x.png", "x.png")
            assert tracker.log_pyfunc(python_model="x.py") is None
            assert tracker.register("models:/m-1", "cxr-dist", "best", "auroc", 0.7) is None
            tracker.set_tags({"a": 1})
        assert tracker.run_id is None
    assert not (tmp_path / "r").exists()
    with pytest.raises(urllib.error.HTTPError):  # the experiment was never created
        api(mlflow_server, "experiments/get-by-name", experiment_name=cfg.experiment)


def test_unreachable_server_fails_fast(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    start = time.monotonic()
    with pytest.raises(UserError, match="cannot be reached") as err:
        make_tracker(TrackingConfig(uri=url), True, tmp_path / "r")
    assert time.monotonic() - start < 10
    assert url in str(err.value) and "MLFLOW_TRACKING_URI" in str(err.value)


def test_local_sqlite_default_without_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    note = tmp_path / "note.txt"
    note.write_text("local")
    with make_tracker(TrackingConfig(experiment="local"), True, "runs/local") as tracker:
        tracker.log_params({"x": 1})
        tracker.log_metrics({"val/auroc": 0.9}, step=1)
        tracker.log_artifact(note)
    assert (tmp_path / "mlflow.db").is_file()
    assert not (tmp_path / "mlruns").exists()  # MLflow's client-side default would put artifacts here
    assert list((tmp_path / "mlartifacts").rglob("note.txt"))
    run = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.data.metrics == {"val/auroc": 0.9}
    assert run.data.params == {"x": "1"}


def test_figures_are_png_files(tmp_path: Path) -> None:
    paths = [
        training_figure(history_rows(4), [3], tmp_path / "a" / "training.png", phase_names=["finetune"]),
        training_figure(history_rows(4), [1.5, 2.5], tmp_path / "training_float.png"),
        roc_pr_figure([0.1, 0.4, 0.35, 0.8, 0.9], [0, 0, 1, 1, 1], tmp_path / "roc.png"),
        roc_pr_figure([0.2, 0.3], [1, 1], tmp_path / "roc_one_class.png"),  # must not raise
        confusion_figure([[5, 1], [2, 7]], tmp_path / "cm.png"),
    ]
    for p in paths:
        data = Path(p).read_bytes()
        assert data[:8] == PNG_SIGNATURE and len(data) > 1000, p


# ----------------------------------------------------------------------------- MLflow's conventions


def test_mlflow_experiment_name_applies_when_the_experiment_is_left_at_its_default(
        mlflow_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env_exp = f"env-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", env_exp)
    with make_tracker(TrackingConfig(uri=mlflow_server), True, tmp_path / "default") as t:  # "cxr-dist"
        pass
    assert [r["info"]["run_id"] for r in experiment_runs(mlflow_server, env_exp)] == [t.run_id]

    explicit = cfg_for(mlflow_server)  # a name of its own wins over the variable
    with make_tracker(explicit, True, tmp_path / "explicit") as t2:
        pass
    assert [r["info"]["run_id"] for r in experiment_runs(mlflow_server, explicit.experiment)] == [t2.run_id]
    assert len(experiment_runs(mlflow_server, env_exp)) == 1


def test_mlflow_run_id_logs_into_that_existing_run(mlflow_server: str, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow

    client = mlflow.MlflowClient(mlflow_server)
    outer_exp = f"outer-{uuid.uuid4().hex[:8]}"
    outer = client.create_run(client.create_experiment(outer_exp), run_name="made-by-orchestrator").info.run_id
    monkeypatch.setenv("MLFLOW_RUN_ID", outer)
    cfg = cfg_for(mlflow_server, tags=("purpose=env",))
    run_dir = tmp_path / "r"
    with make_tracker(cfg, True, run_dir) as tracker:
        tracker.log_params({"train": {"lr": 0.001}})
        tracker.log_metrics({"val/auroc": 0.7}, step=1)
    assert tracker.run_id == outer
    assert (run_dir / RUN_ID_FILE).read_text().strip() == outer
    run = api(mlflow_server, "runs/get", run_id=outer)["run"]
    assert run["info"]["status"] == "FINISHED" and run["info"]["run_name"] == "made-by-orchestrator"
    assert {p["key"]: p["value"] for p in run["data"]["params"]} == {"train.lr": "0.001"}
    assert {t["key"]: t["value"] for t in run["data"]["tags"]}["purpose"] == "env"
    assert [m["key"] for m in run["data"]["metrics"]] == ["val/auroc"]
    # No run of its own in tracking.experiment: the experiment was not even needed.
    with pytest.raises(urllib.error.HTTPError):
        api(mlflow_server, "experiments/get-by-name", experiment_name=cfg.experiment)

    # It also wins over the run id a run folder holds; a run the store lacks is refused at once.
    with make_tracker(cfg_for(mlflow_server), True, tmp_path / "other") as other:
        pass
    monkeypatch.setenv("MLFLOW_RUN_ID", outer)
    with make_tracker(cfg, True, tmp_path / "other") as again:
        pass
    assert again.run_id == outer != other.run_id
    monkeypatch.setenv("MLFLOW_RUN_ID", uuid.uuid4().hex)
    with pytest.raises(UserError, match="MLFLOW_RUN_ID"):
        make_tracker(cfg, True, tmp_path / "missing")


def test_system_metrics_option(mlflow_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.5")
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING", "1")
    monkeypatch.delenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", raising=False)
    runs = {}
    for on in (True, False):
        with make_tracker(cfg_for(mlflow_server, system_metrics=on), True, tmp_path / str(on)) as t:
            time.sleep(2.5)
        runs[on] = {m["key"] for m in api(mlflow_server, "runs/get", run_id=t.run_id)["run"]["data"].get("metrics", [])}
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= runs[True], runs[True]
    assert not runs[False]


# ----------------------------------------------------------------------------- the model registry


def test_registry_alias_compares_only_versions_validated_on_the_same_data(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Issue 23.10: the Kermany demo registered version 1 as @best with val AUROC 0.958; an IU run
    then registered version 2 (0.726) and the alias stayed on the demo forever. A version on
    other data never blocks the alias; one on the same data (index checksum + val split) and the
    same metric does, when it is at least as good."""
    import logging

    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    name, kermany, iu = "cxr-dist-registry-test", "sha256:kermany val=val", "sha256:iu val=val"
    client = MlflowClient(uri)

    def alias() -> str:
        return str(client.get_model_version_by_alias(name, "best").version)

    caplog.set_level(logging.INFO, logger="cxr_dist.runs.tracking")
    with make_tracker(TrackingConfig(uri=uri, experiment="registry"), True, tmp_path / "r") as tracker:
        experiment_id = tracker.client.get_run(tracker.run_id).info.experiment_id

        def register(data_key: str, value: float | None, metric: str = "auroc") -> str:
            model = tracker.client.create_logged_model(experiment_id, source_run_id=tracker.run_id)
            caplog.clear()
            version = tracker.register(model.model_uri, name, "best", metric, value, "max", data_key=data_key)
            assert version is not None, caplog.text  # a failure would only be warned about
            return version

        assert register(kermany, 0.958) == "1" and alias() == "1"  # the first version takes it
        assert register(iu, 0.726) == "2" and alias() == "2", caplog.text  # other data: not compared
        assert "version 1 held it (validated on other data: not compared)" in caplog.text
        assert register(iu, 0.70) == "3" and alias() == "2"  # same data, worse: stays
        assert "stays on version 2: version 2 on the same data has val/auroc 0.726 >= 0.7" in caplog.text
        assert "compared with 1 earlier version(s) validated on the same data (sha256:iu val=val)" in caplog.text
        # The demo again, worse than its own version 1: the alias stays on IU's version 2.
        assert register(kermany, 0.90) == "4" and alias() == "2"
        assert "version 1 on the same data has val/auroc 0.958 >= 0.9" in caplog.text
        assert register(iu, 0.726) == "5" and alias() == "2"  # a tie keeps the holder
        assert register(iu, 0.80) == "6" and alias() == "6"  # better on the same data: moves
        assert register(iu, 0.99, metric="balanced_accuracy") == "7" and alias() == "7"  # another metric
        assert register("sha256:iu val=fold2", 0.5) == "8" and alias() == "8"  # another val split
        assert register(iu, None) == "9" and alias() == "8"  # no value: any same-data version blocks it

    tags = client.get_model_version(name, "2").tags
    assert tags["data_key"] == iu and tags["val_metric"] == "auroc" and float(tags["val/auroc"]) == 0.726
    assert tags["run_id"] == tracker.run_id
    assert client.get_model_version(name, "9").tags["val/auroc"] == "nan"

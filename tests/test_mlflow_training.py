"""End to end: real 2-process trainings logging to a real `mlflow server`, read back over REST.

Every training run must be one complete, comparable MLflow record: one run (not one per rank)
with the flattened config, per-epoch metrics of both phases, figures, evaluation JSON and a
loadable model; FAILED after a crash, the same run continued after a preemption, a clear error
before training when the server is down, and the local SQLite store when no server is named.

The server is the real thing (tests/mlflow_server.py); everything is read back with plain HTTP
(/api/2.0/mlflow/...), not with MLflow's client, so what is checked is what the server holds.
The trainings are shared through module-scoped fixtures (each ~15-35 s on 2 CPU cores).
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import tarfile
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pytest

from tests.conftest import ROOT, VENV_BIN, _env, accelerate_launch, run_cmd, tiny_overrides
from tests.mlflow_server import api, experiment_runs, free_port
from tests.train_hooks import wait_until_held

pytestmark = pytest.mark.slow

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# configs/tiny.toml: 2 epochs of phase "head", 1 of "finetune"; 49 train samples, 2 ranks x 8
# per batch -> 3 steps per epoch, so preemption check 2 is epoch 1, step 1.
PHASES = [1, 1, 2]
PREEMPT_AT_CHECK = "2"




def get_run(base: str, run_id: str) -> dict:
    return api(base, "runs/get", run_id=run_id)["run"]


def history(base: str, run_id: str, key: str) -> list[tuple[int, float]]:
    """(step, value) of every logged value of `key`, sorted by step."""
    rows = api(base, "metrics/get-history", run_id=run_id, metric_key=key, max_results="25000")
    return sorted((int(m["step"]), float(m["value"])) for m in rows.get("metrics", []))


def artifact_bytes(base: str, run_id: str, path: str) -> bytes:
    """Download one run artifact through the server (the UI's own download endpoint)."""
    url = f"{base}/get-artifact?" + urllib.parse.urlencode({"path": path, "run_uuid": run_id})
    with urllib.request.urlopen(url, timeout=15) as resp:
        return resp.read()


def params_of(run: dict) -> dict[str, str]:
    return {p["key"]: p["value"] for p in run["data"].get("params", [])}


def tags_of(run: dict) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


# --- launching trainings ---------------------------------------------------------------------

def train(tmp: Path, shards: Path, name: str, uri: str | None, *extra: str, env: dict | None = None,
          timeout: int = 300) -> tuple[subprocess.CompletedProcess, Path, float]:
    """`accelerate launch -m cxr_dist.train` on the tiny config; (result, run_dir, seconds).

    tiny_overrides names a SQLite store; a later `--tracking.uri` override wins (overrides apply
    in order), and `uri=None` drops the option altogether so the default store is used.
    """
    run_dir = tmp / name
    args = tiny_overrides(shards, run_dir, *extra)
    if uri is None:
        i = args.index("--tracking.uri")
        del args[i:i + 2]
    else:
        args += ["--tracking.uri", uri]
    t0 = time.monotonic()
    res = accelerate_launch(["-m", "cxr_dist.train", *args], cwd=tmp, env=env, timeout=timeout)
    return res, run_dir, time.monotonic() - t0


def output(res: subprocess.CompletedProcess) -> str:
    return res.stdout[-3000:] + res.stderr[-6000:]


def run_id_of(run_dir: Path) -> str:
    return (run_dir / "mlflow_run_id.txt").read_text().strip()


def corrupt_first_image(shards: Path, split: str) -> str:
    """Replace the JPEG bytes of the first sample of `split`'s first shard with garbage.

    That sample belongs to rank 0's slot (slot 0 always reads it first, see stream.py), so rank 0
    fails while decoding it and rank 1 is left waiting at the next collective: the main process
    (the one that tracks) is the one that crashes, deterministically. Returns the sample key.
    """
    index = json.loads((shards / "index.json").read_text())
    path = shards / index["splits"][split]["shards"][0]["file"]
    with tarfile.open(path) as src:
        members = [(m, src.extractfile(m).read()) for m in src.getmembers()]
    key = next(m.name for m, _ in members if m.name.endswith(".jpg"))
    tmp = path.with_suffix(".tmp")
    with tarfile.open(tmp, "w") as dst:
        for m, data in members:
            if m.name == key:
                data = b"this is not a JPEG"
                m.size = len(data)
            dst.addfile(m, io.BytesIO(data))
    tmp.replace(path)
    return key.rsplit(".", 1)[0]


# --- shared trainings (module scope: each runs once for all the tests that use it) -----------

@pytest.fixture(scope="module")
def full_run(mlflow_server: str, tiny_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One complete training into its own experiment on the server."""
    tmp = tmp_path_factory.mktemp("mlflow-full")
    exp = f"full-{uuid.uuid4().hex[:8]}"
    res, run_dir, secs = train(tmp, tiny_shards, "full", mlflow_server, "--tracking.experiment", exp)
    assert res.returncode == 0, output(res)
    runs = experiment_runs(mlflow_server, exp)
    return {"exp": exp, "res": res, "run_dir": run_dir, "runs": runs, "seconds": secs}


@pytest.fixture(scope="module")
def crashed_run(mlflow_server: str, tiny_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A training whose validation data is broken: it crashes at the end of epoch 1."""
    tmp = tmp_path_factory.mktemp("mlflow-crash")
    shards = tmp / "shards"
    shutil.copytree(tiny_shards, shards)
    key = corrupt_first_image(shards, "val")
    exp = f"crash-{uuid.uuid4().hex[:8]}"
    res, run_dir, secs = train(tmp, shards, "crash", mlflow_server, "--tracking.experiment", exp)
    return {"exp": exp, "res": res, "run_dir": run_dir, "key": key, "seconds": secs}


@pytest.fixture(scope="module")
def resumed_run(mlflow_server: str, tiny_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Preempted in epoch 1 (injected, deterministic), then relaunched and finished."""
    tmp = tmp_path_factory.mktemp("mlflow-resume")
    exp = f"resume-{uuid.uuid4().hex[:8]}"
    first, run_dir, _ = train(tmp, tiny_shards, "resumable", mlflow_server, "--tracking.experiment", exp,
                              env={"CXR_DIST_FAULT_PREEMPT_AT_CHECK": PREEMPT_AT_CHECK})
    assert first.returncode == 0, output(first)
    assert (run_dir / "PREEMPTED").exists(), output(first)
    first_id = run_id_of(run_dir)
    after_first = {"runs": experiment_runs(mlflow_server, exp), "run": get_run(mlflow_server, first_id),
                   "phase": history(mlflow_server, first_id, "phase")}
    second, _, _ = train(tmp, tiny_shards, "resumable", mlflow_server, "--tracking.experiment", exp)
    assert second.returncode == 0, output(second)
    return {"exp": exp, "run_dir": run_dir, "first_id": first_id, "after_first": after_first,
            "first": first, "second": second}


@pytest.fixture(scope="module")
def local_store(tiny_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two trainings with no tracking URI at all (default store) that differ in phase 1's lr."""
    tmp = tmp_path_factory.mktemp("mlflow-local")
    env = {"MLFLOW_TRACKING_URI": ""}  # conftest already drops it; an empty value must not count
    a, run_a, _ = train(tmp, tiny_shards, "lr_1e-3", None, env=env)
    assert a.returncode == 0, output(a)
    b, run_b, _ = train(tmp, tiny_shards, "lr_5e-4", None, "--train.phases.0.lr", "5e-4", env=env)
    assert b.returncode == 0, output(b)
    return {"tmp": tmp, "run_dirs": [run_a, run_b]}


# --- one complete run ------------------------------------------------------------------------

def test_one_finished_run_per_training_not_per_rank(full_run: dict) -> None:
    runs = full_run["runs"]
    assert len(runs) == 1, [r["info"] for r in runs]
    info = runs[0]["info"]
    assert info["status"] == "FINISHED"
    assert info["run_id"] == run_id_of(full_run["run_dir"])
    assert info["run_name"] == "full"
    out = full_run["res"].stdout + full_run["res"].stderr
    assert out.count("View run full at") == 1  # MLflow's end-of-run line: one process tracked


def test_per_epoch_metrics_of_both_phases(mlflow_server: str, full_run: dict) -> None:
    run_id = full_run["runs"][0]["info"]["run_id"]
    assert history(mlflow_server, run_id, "phase") == [(1, 1.0), (2, 1.0), (3, 2.0)]
    for key in ("train/loss", "train/auroc", "val/loss", "val/auroc", "val/f1", "lr/head",
                "epoch_time_s", "images_per_s"):
        steps = [s for s, _ in history(mlflow_server, run_id, key)]
        assert steps == [1, 2, 3], (key, steps)
    # The backbone's parameter group exists only once it is unfrozen (phase 2).
    assert [s for s, _ in history(mlflow_server, run_id, "lr/backbone")] == [3]
    # The values are the ones the run wrote to history.json (same numbers, same epochs).
    rows = json.loads((full_run["run_dir"] / "history.json").read_text())
    assert [v for _, v in history(mlflow_server, run_id, "val/auroc")] == pytest.approx(
        [r["val/auroc"] for r in rows])
    assert [v for _, v in history(mlflow_server, run_id, "train/loss")] == pytest.approx(
        [r["train/loss"] for r in rows])
    # Final metrics of the best checkpoint, logged once at the last epoch.
    metrics = {m["key"]: m for m in full_run["runs"][0]["data"]["metrics"]}
    for key in ("best_val/auroc", "best_test/auroc", "best_test/f1", "best_test_study/auroc",
                "best_test_at_val_threshold/balanced_accuracy",
                "best_val_study/auroc", "best_test/auroc_ci95_low", "best_test_study/auroc_ci95_high"):
        assert key in metrics and metrics[key]["step"] == 3, key
    assert metrics["best_test/auroc_ci95_low"]["value"] <= metrics["best_test/auroc"]["value"] \
        <= metrics["best_test/auroc_ci95_high"]["value"]


def test_params_are_the_flattened_config_and_the_environment(mlflow_server: str, full_run: dict,
                                                             tiny_shards: Path) -> None:
    run = get_run(mlflow_server, full_run["runs"][0]["info"]["run_id"])
    params = params_of(run)
    assert params["train.phases.0.name"] == "head" and params["train.phases.1.name"] == "finetune"
    assert (params["train.phases.0.epochs"], params["train.phases.1.epochs"]) == ("2", "1")
    assert params["train.phases.0.lr"] == "0.001" and params["train.phases.1.unfreeze_blocks"] == "1"
    assert params["loader.batch_size"] == "8" and params["model.backbone"] == "efficientnet_b1"
    assert params["tracking.uri"] == mlflow_server
    assert params["world_size"] == "2"
    assert params["mixed_precision"] == "no"
    assert params["weights_source"] == "random"  # tiny.toml: pretrained = false
    index = json.loads((tiny_shards / "index.json").read_text())
    assert params["data_checksum"] == index["checksum"] and index["checksum"].startswith("sha256:")
    assert params["batches_per_epoch"] == "3" and params["deepspeed"] == "False"

    tags = tags_of(run)
    assert tags["run_dir"] == str(full_run["run_dir"].resolve())
    # The code version: MLflow tags the commit of the repository holding the entry point.
    if (ROOT / ".git").exists():
        sha = tags.get("mlflow.source.git.commit", "")
        assert re.fullmatch(r"[0-9a-f]{40}", sha), tags
        # An ancestor of (or equal to) HEAD: other commits may land while the suite runs.
        res = subprocess.run(["git", "merge-base", "--is-ancestor", sha, "HEAD"], cwd=ROOT)
        assert res.returncode == 0, f"{sha} is not in this repository's history"
        # `-m cxr_dist.train` runs the package's __main__.py (the loop is train/loop.py).
        assert tags["mlflow.source.name"].endswith("cxr_dist/train/__main__.py"), tags["mlflow.source.name"]


def test_artifacts_figures_and_evaluation(mlflow_server: str, full_run: dict) -> None:
    run_id = full_run["runs"][0]["info"]["run_id"]
    files = {f["path"]: f for f in api(mlflow_server, "artifacts/list", run_id=run_id)["files"]}
    expected = {"config.toml", "training_metrics.png", "roc_pr_test.png", "confusion_test.png",
                "evaluation.json", "history.json", "predictions.csv"}
    assert expected <= files.keys(), sorted(files)
    for name in ("training_metrics.png", "roc_pr_test.png", "confusion_test.png"):
        data = artifact_bytes(mlflow_server, run_id, name)
        assert data.startswith(PNG_SIGNATURE) and len(data) == int(files[name]["file_size"]) > 1000, name
    evaluation = json.loads(artifact_bytes(mlflow_server, run_id, "evaluation.json"))
    assert {"val", "test"} <= evaluation.keys()
    assert "auroc" in evaluation["test"]["image_level"] and "study_level" in evaluation["test"]
    assert evaluation == json.loads((full_run["run_dir"] / "evaluation.json").read_text())
    config = artifact_bytes(mlflow_server, run_id, "config.toml").decode()
    assert config == (full_run["run_dir"] / "config.toml").read_text()
    assert len(json.loads(artifact_bytes(mlflow_server, run_id, "history.json"))) == 3
    assert artifact_bytes(mlflow_server, run_id, "predictions.csv") == (full_run["run_dir"] / "predictions.csv").read_bytes()


def test_logged_model_is_a_servable_pyfunc_that_predicts_like_the_checkpoint(mlflow_server: str, full_run: dict,
                                                                             tiny_data: Path) -> None:
    """The run's MLflow model: a pyfunc "from code" with the checkpoint as an artifact (nothing
    pickled), a signature, and answers equal to inference.py's on the same files."""
    import base64

    import mlflow.pyfunc
    import pandas as pd

    from cxr_dist.product.inference import load_product, read_film

    run_id = full_run["runs"][0]["info"]["run_id"]
    model_uri = tags_of(get_run(mlflow_server, run_id))["model_uri.model"]
    assert model_uri.startswith("models:/m-")
    model_id = model_uri.split("/", 1)[1]
    logged = api(mlflow_server, f"logged-models/{model_id}")["model"]["info"]
    assert logged["source_run_id"] == run_id and logged["status"] == "LOGGED_MODEL_READY"

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    mlflow.set_tracking_uri(mlflow_server)
    loaded = mlflow.pyfunc.load_model(model_uri)
    assert loaded.metadata.signature.inputs.input_names() == ["image"]
    files = sorted((tiny_data / "images").rglob("*.png"))[:5]
    out = loaded.predict(pd.DataFrame({"image": [base64.b64encode(p.read_bytes()).decode() for p in files]}))
    product = load_product(full_run["run_dir"])
    want = product.predict([(read_film(p, p.name, product.data, product.loader), p.name) for p in files])
    assert out["prob_abnormal"].tolist() == pytest.approx([w["prob_abnormal"] for w in want], abs=1e-6)


def test_registered_version_says_what_data_it_was_validated_on(mlflow_server: str, full_run: dict,
                                                               tiny_shards: Path) -> None:
    """Issue 23.10: the run's model is a version of `cxr-dist` tagged with its data (the shards'
    checksum and the val split) and metric, so that @best compares it only with like versions."""
    run_id = full_run["runs"][0]["info"]["run_id"]
    found = api(mlflow_server, "model-versions/search", filter=f"run_id = '{run_id}'")["model_versions"]
    assert [v["name"] for v in found] == ["cxr-dist"], found
    tags = {t["key"]: t["value"] for t in found[0].get("tags", [])}
    index = json.loads((tiny_shards / "index.json").read_text())
    assert tags["data_key"] == f"{index['checksum']} val=val"
    assert tags["val_metric"] == "source_mean_auroc" and tags["run_id"] == run_id
    assert "val/source_mean_auroc" in tags


# --- failures, resumption, reachability ------------------------------------------------------

def test_crash_mid_training_ends_the_run_failed(mlflow_server: str, crashed_run: dict) -> None:
    res = crashed_run["res"]
    assert res.returncode != 0, output(res)
    runs = experiment_runs(mlflow_server, crashed_run["exp"])
    assert len(runs) == 1
    run = get_run(mlflow_server, runs[0]["info"]["run_id"])
    assert run["info"]["status"] == "FAILED", run["info"]  # not left RUNNING
    assert int(run["info"].get("end_time", 0)) > 0
    # It crashed in epoch 1's validation: params were logged, no epoch was.
    assert params_of(run)["world_size"] == "2"
    assert history(mlflow_server, run["info"]["run_id"], "phase") == []


def test_preempted_run_is_continued_not_duplicated(mlflow_server: str, resumed_run: dict) -> None:
    first = resumed_run["after_first"]
    # After the preemption: one run, ended (KILLED: the job stopped, a requeue will continue it).
    assert [r["info"]["run_id"] for r in first["runs"]] == [resumed_run["first_id"]]
    assert first["run"]["info"]["status"] == "KILLED"
    assert first["phase"] == []  # stopped inside epoch 1: no epoch completed yet

    runs = experiment_runs(mlflow_server, resumed_run["exp"])
    assert [r["info"]["run_id"] for r in runs] == [resumed_run["first_id"]]
    assert run_id_of(resumed_run["run_dir"]) == resumed_run["first_id"]
    assert "resuming from" in output(resumed_run["second"])
    run = get_run(mlflow_server, resumed_run["first_id"])
    assert run["info"]["status"] == "FINISHED"
    for key in ("phase", "val/auroc", "train/loss", "lr/head"):
        steps = [s for s, _ in history(mlflow_server, resumed_run["first_id"], key)]
        assert steps == [1, 2, 3], (key, steps)  # every epoch once: none lost, none twice
    assert [v for _, v in history(mlflow_server, resumed_run["first_id"], "phase")] == [1.0, 1.0, 2.0]
    # Params were logged once and not contradicted by the second attempt.
    tags = tags_of(run)
    assert not [k for k in tags if k.startswith("param_changed_on_resume.")], tags
    assert "model_uri.model" in tags


def test_unreachable_server_fails_fast_before_training(tiny_shards: Path, tmp_path: Path) -> None:
    """The training module itself (one process, no launcher): exit code 2, one clear line."""
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    run_dir = tmp_path / "nowhere"
    t0 = time.monotonic()
    res = run_cmd([str(VENV_BIN / "python"), "-m", "cxr_dist.train",
                   *tiny_overrides(tiny_shards, run_dir, "--tracking.uri", url)], cwd=tmp_path, timeout=120)
    secs = time.monotonic() - t0
    err = res.stdout + res.stderr
    assert res.returncode == 2, err[-3000:]
    assert f"cxr_dist.train: MLflow tracking server at {url} cannot be reached" in err
    assert "Traceback" not in err
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "mlflow_run_id.txt").exists()
    assert secs < 60, f"took {secs:.0f} s"  # imports only: no HTTP retry storm


@pytest.fixture(scope="module")
def unreachable_launch(tiny_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("mlflow-unreachable")
    url = f"http://127.0.0.1:{free_port()}"
    res, run_dir, secs = train(tmp, tiny_shards, "nowhere", url)
    return {"url": url, "res": res, "run_dir": run_dir, "seconds": secs}


def test_unreachable_server_under_accelerate_launch(unreachable_launch: dict) -> None:
    """2 processes: the launcher fails (torchrun always exits 1), the reason is shown, the ranks
    exited with code 2 before training (every rank checks the server; torchrun reports whichever
    exited first), and nothing was trained or logged."""
    res, url = unreachable_launch["res"], unreachable_launch["url"]
    out = res.stdout + res.stderr
    assert res.returncode != 0, out[-3000:]
    assert f"cxr_dist.train: MLflow tracking server at {url} cannot be reached" in out
    assert re.search(r"rank\s*: \d \(local_rank: \d\)\s*exitcode\s*: 2 ", out), out[-3000:]
    assert not re.search(r"exitcode\s*: (?!2\b|-15\b)", out), out[-3000:]  # 2, or SIGTERM from the launcher
    run_dir = unreachable_launch["run_dir"]
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "mlflow_run_id.txt").exists()
    assert "epoch 1/3" not in out
    assert unreachable_launch["seconds"] < 90, f"took {unreachable_launch['seconds']:.0f} s"


def test_unreachable_server_stops_every_rank_without_a_traceback(unreachable_launch: dict) -> None:
    out = unreachable_launch["res"].stdout + unreachable_launch["res"].stderr
    assert "[rank1]: Traceback" not in out and "Connection closed by peer" not in out, out[-3000:]


def test_sigterm_mid_training_does_not_leave_the_run_running(mlflow_server: str, tiny_shards: Path,
                                                            tmp_path: Path) -> None:
    """`scancel`, or the launcher stopping the survivors after one rank failed, sends SIGTERM.

    Deterministic: the run goes through tests.train_hooks, which holds every rank after the
    checkpoint of epoch 1 until released; SIGTERM is sent while it is held, so it always lands
    in the middle of training (sending it once the checkpoint appeared raced the end of the run)."""
    exp = f"sigterm-{uuid.uuid4().hex[:8]}"
    run_dir, hold = tmp_path / "terminated", tmp_path / "hold"
    hold.mkdir()
    launch = tmp_path / ".launch-cpu_2proc.yaml"
    launch.write_text((ROOT / "launch" / "cpu_2proc.yaml").read_text().replace("launch/", f"{ROOT}/launch/"))
    args = [str(VENV_BIN / "accelerate"), "launch", "--config_file", str(launch),
            "-m", "tests.train_hooks", "--hold", str(hold), "cxr_dist.train",
            *tiny_overrides(tiny_shards, run_dir, "--tracking.uri", mlflow_server, "--tracking.experiment", exp)]
    log = (tmp_path / "launch.log").open("w")
    proc = subprocess.Popen(args, cwd=tmp_path, env=_env(), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        wait_until_held(proc, hold)
        os.killpg(proc.pid, signal.SIGTERM)  # what scancel does to every process of the step
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
    out = (tmp_path / "launch.log").read_text()[-6000:]
    run = get_run(mlflow_server, run_id_of(run_dir))
    assert run["info"]["status"] == "KILLED", (run["info"], out)
    assert int(run["info"].get("end_time", 0)) > 0
    # Stopped where it was held: epoch 1's checkpoint saved, nothing after it ran.
    meta = json.loads((run_dir / "checkpoints" / "latest" / "meta.json").read_text())
    assert meta["progress"]["epoch"] == 1, out
    assert history(mlflow_server, run["info"]["run_id"], "phase") == [], out
    assert not (run_dir / "evaluation.json").exists()


def test_local_sqlite_store_by_default(local_store: dict) -> None:
    tmp = local_store["tmp"]
    db = tmp / "mlflow.db"
    assert db.is_file()
    assert (tmp / "mlartifacts").is_dir()
    assert not (tmp / "mlruns").exists()
    import sqlite3

    with sqlite3.connect(db) as con:
        rows = con.execute("SELECT r.run_uuid, r.status, r.name FROM runs r JOIN experiments e "
                           "ON r.experiment_id = e.experiment_id WHERE e.name = 'cxr-dist-tiny'").fetchall()
        ids = {run_id_of(d) for d in local_store["run_dirs"]}
        assert {r[0] for r in rows} == ids and {r[1] for r in rows} == {"FINISHED"}
        n_phase = con.execute("SELECT COUNT(*) FROM metrics WHERE run_uuid = ? AND key = 'phase'",
                              (run_id_of(local_store["run_dirs"][0]),)).fetchone()[0]
    assert n_phase == 3
    assert list((tmp / "mlartifacts").rglob("training_metrics.png"))


def test_compare_shows_the_param_that_differs(local_store: dict) -> None:
    tmp = local_store["tmp"]
    res = run_cmd([str(VENV_BIN / "cxr-dist"), "compare", "--experiment", "cxr-dist-tiny",
                   "--tracking-uri", f"sqlite:///{tmp / 'mlflow.db'}"], cwd=tmp, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].startswith("experiment cxr-dist-tiny: 2 run(s)")
    header = lines[1].split()
    assert "train.phases.0.lr" in header and "train.run_dir" in header
    assert "train.phases.1.lr" not in header and "loader.batch_size" not in header  # same in both
    col = header.index("train.phases.0.lr")
    rows = {line.split()[0]: line.split() for line in lines[3:]}
    assert rows["lr_1e-3"][col] == "0.001" and rows["lr_5e-4"][col] == "0.0005"
    assert rows["lr_1e-3"][2] == rows["lr_5e-4"][2] == "FINISHED"
    assert "best" in lines[1] and "val/auroc" in lines[1]

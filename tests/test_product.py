"""The model as a product (issue 14): what a finished run hands over, and every way to use it.

One real training (module fixture `product_run`): the demo's Kermany films shipped in demo/
(real chest films, CC BY 4.0), a short schedule at 128 px, 2 processes through `accelerate launch`
(gloo on the CPU), tracked on a real `mlflow server`. Then:
- the best checkpoint carries the temperature, the validation threshold and the OOD statistics;
- evaluation.json / predictions.csv / MLflow have calibration, OOD scores, the model card, the
  reliability diagram and the Grad-CAM overlays;
- the servable model is registered, and a real `mlflow models serve --env-manager local` on
  127.0.0.1 answers a REST request like `cxr-dist predict` on the same files, within 1e-4, and
  answers bad payloads with HTTP 400;
- `cxr-dist predict` refuses constant images (reported, exit 2, the other films still predicted)
  and flags real non-chest photographs (scikit-learn's two sample images) as out of distribution;
- `cxr-dist evaluate` (Product.load, the readout) gives the probabilities of the run's own final
  evaluation (train/end_of_run.py, the same Readout).
"""
from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxr_dist.model.checkpoint import load_extra, load_model_state
from cxr_dist.eval.ood import OOD_KEYS, FeatureDensity, check_not_constant
from cxr_dist.errors import DataError
from tests.conftest import ROOT, VENV_BIN, accelerate_launch, run_cmd
from tests.mlflow_server import api, experiment_runs, free_port

DEMO_FILMS = ROOT / "demo" / "kermany"
SCHEDULE = ["--train.phases.0.epochs", "2", "--train.phases.1.epochs", "1", "--loader.input_size", "128",
            "--selection.early_stop_patience", "0", "--product.cam_images", "3"]


# --- the pieces on their own -----------------------------------------------------------------

def test_constant_images_are_refused_and_films_pass() -> None:
    white = Image.new("L", (300, 200), 255)
    noisy = Image.fromarray(np.clip(128 + np.random.default_rng(0).normal(0, 1.0, (64, 64)), 0, 255).astype(np.uint8))
    for img in (white, Image.new("L", (64, 64), 0), noisy, Image.new("RGB", (50, 50), (200, 10, 10))):
        with pytest.raises(DataError, match="constant"):
            check_not_constant(img, "x.png")
    film = next(DEMO_FILMS.rglob("*.jpeg"))
    check_not_constant(Image.open(film), film.name)  # a real film passes


def test_feature_density_scores_far_points_higher_and_round_trips() -> None:
    rng = np.random.default_rng(0)
    train = rng.normal(0, 1, (300, 40))
    density = FeatureDensity.fit(train)
    near, far = density.score(rng.normal(0, 1, (50, 40))), density.score(rng.normal(3, 1, (50, 40)))
    assert far.min() > near.max()
    again = FeatureDensity.from_tensors(density.tensors())
    np.testing.assert_allclose(again.score(train[:5]), density.score(train[:5]), rtol=1e-4)
    assert FeatureDensity.from_tensors({}) is None
    with pytest.raises(ValueError):
        FeatureDensity.fit(train[:3])


# --- one real run ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def product_run(mlflow_server: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("product")
    shards, run_dir = tmp / "shards", tmp / "run"
    res = run_cmd([str(VENV_BIN / "cxr-dist"), "prepare", "--config", "configs/demo.toml", "--out", str(shards)], cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    exp, registered = f"product-{uuid.uuid4().hex[:8]}", f"cxr-product-{uuid.uuid4().hex[:8]}"
    res = accelerate_launch(["-m", "cxr_dist.train", "--config", str(ROOT / "configs" / "demo.toml"),
                             "--data.shards_dir", str(shards), "--train.run_dir", str(run_dir),
                             "--tracking.uri", mlflow_server, "--tracking.experiment", exp,
                             "--tracking.registered_model", registered, *SCHEDULE], cwd=tmp, timeout=900)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-5000:]
    runs = experiment_runs(mlflow_server, exp)
    assert len(runs) == 1
    test_films = sorted((DEMO_FILMS / "test").rglob("*.jpeg"))[::12]  # both classes, a handful
    return {"run_dir": run_dir, "shards": shards, "run_id": runs[0]["info"]["run_id"], "registered": registered,
            "server": mlflow_server, "films": test_films, "tmp": tmp}


def predict_json(run_dir: Path, files: list[Path], *extra: str) -> subprocess.CompletedProcess:
    return run_cmd([str(VENV_BIN / "cxr-dist"), "predict", "--checkpoint", str(run_dir), "--json", *extra,
                    *map(str, files)], cwd=run_dir)


def test_checkpoint_carries_temperature_threshold_and_ood(product_run: dict) -> None:
    _, meta = load_model_state(product_run["run_dir"], tag="best")
    cal, thr, ood = meta["calibration"], meta["threshold"], meta["ood"]
    assert cal["temperature"] > 0 and cal["fitted_on"] in ("val", None)
    assert 0 < thr["value"] < 1 and thr["picked_on"] == "val" and thr["scale"] == "calibrated"
    assert ood["threshold"] > 0 and ood["quantile"] == 0.99 and ood["fit_images"] > 10
    extra = load_extra(product_run["run_dir"])
    assert set(OOD_KEYS) <= extra.keys() and extra[OOD_KEYS[1]].shape == (1280, 1280)


def test_evaluation_predictions_and_mlflow_have_the_product_parts(product_run: dict) -> None:
    run_dir, server, run_id = product_run["run_dir"], product_run["server"], product_run["run_id"]
    evaluation = json.loads((run_dir / "evaluation.json").read_text())
    cal = evaluation["calibration"]
    for split in ("val", "test"):
        rep = cal[split]
        assert {"ece_before", "ece_after", "brier_before", "brier_after"} <= rep.keys()
    assert cal["val"]["ece_after"] <= cal["val"]["ece_before"] + 1e-9  # fitted there: never worse
    assert 0 <= evaluation["test"]["ood"]["flagged_frac"] <= 1
    header = (run_dir / "predictions.csv").read_text().splitlines()[0].split(",")
    assert header[-2:] == ["prob_uncalibrated", "ood_score"]
    card = (run_dir / "MODEL_CARD.md").read_text()
    assert "CC BY 4.0" in card and "not for clinical use" in card.lower()
    # The run's own calibration numbers (val and test), and the threshold on the calibrated scale.
    for split in ("val", "test"):
        rep = cal[split]
        assert f"| {rep['ece_before']:.3f} -> {rep['ece_after']:.3f} |" in card, split
    assert f"{evaluation['test_at_val_threshold']['threshold']:.4f} on P(abnormal)" in card
    cams = sorted((run_dir / "cam").glob("*.png"))
    assert len(cams) == 3 and all(p.read_bytes()[:4] == b"\x89PNG" for p in cams)
    top = {f["path"] for f in api(server, "artifacts/list", run_id=run_id)["files"]}
    assert {"MODEL_CARD.md", "reliability_test.png", "cam", "evaluation.json"} <= top, top
    assert len(api(server, "artifacts/list", run_id=run_id, path="cam")["files"]) == 3
    metrics = {m["key"] for m in api(server, "runs/get", run_id=run_id)["run"]["data"]["metrics"]}
    assert {"calibration/temperature", "calibration/test/ece_before", "calibration/test/ece_after",
            "best_test/ood_flagged_frac"} <= metrics


def test_the_model_is_registered_and_the_alias_follows_the_best_metric(product_run: dict) -> None:
    from cxr_dist.config import TrackingConfig
    from cxr_dist.runs.tracking import make_tracker

    server, name = product_run["server"], product_run["registered"]
    alias = api(server, "registered-models/alias", name=name, alias="best")["model_version"]
    assert alias["run_id"] == product_run["run_id"]
    tags = {t["key"]: t["value"] for t in alias.get("tags", [])}
    first = float(tags["val/source_mean_auroc"])
    uri = [t["value"] for t in api(server, "runs/get", run_id=product_run["run_id"])["run"]["data"]["tags"]
           if t["key"] == "model_uri.model"][0]
    # Two more versions of the same model from another run, validated on the same data (the
    # alias's own data_key): a worse one, then a better one.
    data_key = tags["data_key"]
    cfg = TrackingConfig(uri=server, experiment=f"register-{uuid.uuid4().hex[:6]}")
    with make_tracker(cfg, True, product_run["tmp"] / "register") as tracker:
        worse = tracker.register(uri, name, "best", "source_mean_auroc", first - 0.1, data_key=data_key)
        assert api(server, "registered-models/alias", name=name, alias="best")["model_version"]["version"] == alias["version"]
        better = tracker.register(uri, name, "best", "source_mean_auroc", first + 0.01, data_key=data_key)
    now = api(server, "registered-models/alias", name=name, alias="best")["model_version"]["version"]
    assert int(worse) > int(alias["version"]) and now == better


def test_served_model_answers_like_predict_and_refuses_bad_payloads(product_run: dict) -> None:
    run_dir, files = product_run["run_dir"], product_run["films"]
    by_predict = [json.loads(line) for line in predict_json(run_dir, files).stdout.splitlines()]
    assert len(by_predict) == len(files)
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": product_run["server"], "MLFLOW_DISABLE_TELEMETRY": "true",
           "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}  # mlflow starts `uvicorn` by name
    uri = f"models:/{product_run['registered']}@best"
    log = open(product_run["tmp"] / "serve.log", "w")
    proc = subprocess.Popen([str(VENV_BIN / "mlflow"), "models", "serve", "-m", uri, "--env-manager", "local",
                             "--host", "127.0.0.1", "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while not _get_ok(f"{url}/ping"):
            assert proc.poll() is None and time.monotonic() < deadline, (product_run["tmp"] / "serve.log").read_text()[-3000:]
            time.sleep(1)
        records = [{"image": base64.b64encode(p.read_bytes()).decode()} for p in files]
        status, answer = _post(f"{url}/invocations", {"dataframe_records": records})
        assert status == 200, answer
        served = answer["predictions"]
        for got, want in zip(served, by_predict):
            assert abs(got["prob_abnormal"] - want["prob_abnormal"]) < 1e-4
            assert got["label"] == want["label"] and got["ood_flag"] == want["ood_flag"]
            assert abs(got["ood_score"] - want["ood_score"]) < 1e-2 * max(1.0, want["ood_score"])
        white = io.BytesIO()
        Image.new("L", (256, 256), 255).save(white, format="PNG")
        for bad in ([{"image": "not base64!"}], [{"image": base64.b64encode(b"not an image").decode()}],
                    [{"image": base64.b64encode(white.getvalue()).decode()}], [{"picture": records[0]["image"]}]):
            status, answer = _post(f"{url}/invocations", {"dataframe_records": bad})
            assert 400 <= status < 500, (bad, status, answer)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def _get_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def test_predict_flags_photographs_refuses_blank_images_and_draws_cams(product_run: dict, tmp_path: Path) -> None:
    from sklearn.datasets import load_sample_images

    run_dir, films = product_run["run_dir"], product_run["films"]
    photos = []
    for i, arr in enumerate(load_sample_images().images):  # china.jpg, flower.jpg: real photographs
        photos.append(tmp_path / f"photo{i}.jpg")
        Image.fromarray(arr).save(photos[-1])
    res = predict_json(run_dir, photos + films, "--cam", str(tmp_path / "cams"))
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    assert all(r["ood_flag"] for r in rows[:2]), rows[:2]
    film_scores = [r["ood_score"] for r in rows[2:]]
    assert min(r["ood_score"] for r in rows[:2]) > max(film_scores)
    assert len(list((tmp_path / "cams").glob("*.png"))) == len(rows)
    raw = [json.loads(line) for line in predict_json(run_dir, films[:2], "--uncalibrated").stdout.splitlines()]
    assert [r["prob_abnormal"] for r in raw] == [r["prob_uncalibrated"] for r in rows[2:4]]
    blank = tmp_path / "blank.png"
    Image.new("L", (300, 300), 255).save(blank)
    # A bad file is reported with its path and the good one is still predicted (exit 2: one failed).
    res = predict_json(run_dir, [films[0], blank])
    assert res.returncode == 2 and f"cxr-dist predict: {blank}: the image is (nearly) constant" in res.stderr
    assert [json.loads(line)["image"] for line in res.stdout.splitlines()] == [str(films[0])]


def test_evaluate_reports_calibrated_probabilities_and_ood(product_run: dict, tmp_path: Path) -> None:
    out = tmp_path / "eval.json"
    res = run_cmd([str(VENV_BIN / "cxr-dist"), "evaluate", "--checkpoint", str(product_run["run_dir"]),
                   "--shards", str(product_run["shards"]), "--split", "test", "--out", str(out),
                   "--predictions", str(tmp_path / "p.csv")], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["calibrated"] is True and 0 <= report["ood"]["flagged_frac"] <= 1
    mine = {r.split(",")[1]: r.split(",") for r in (tmp_path / "p.csv").read_text().splitlines()[1:]}
    theirs = {r.split(",")[1]: r.split(",") for r in (product_run["run_dir"] / "predictions.csv").read_text().splitlines()[1:]
              if r.startswith("test,")}
    assert mine.keys() == theirs.keys()
    for key in mine:  # the same calibrated probability as the run's own final evaluation
        assert abs(float(mine[key][4]) - float(theirs[key][4])) < 1e-4

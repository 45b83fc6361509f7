"""`cxr-dist evaluate` and `cxr-dist predict` on a checkpoint of a real (tiny) training run."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from cxr_dist.data.index import load_index
from tests.conftest import ROOT, VENV_BIN, accelerate_launch, run_cmd, tiny_overrides

pytestmark = pytest.mark.slow
CLI = str(VENV_BIN / "cxr-dist")


@pytest.fixture(scope="module")
def trained(tiny_shards, tmp_path_factory) -> Path:
    """One process, bf16 autocast and gradient accumulation: the single-process code path."""
    tmp = tmp_path_factory.mktemp("eval")
    run_dir = tmp / "run"
    res = run_cmd([CLI, "train", *tiny_overrides(tiny_shards, run_dir, "--train.mixed_precision", "bf16",
                                                 "--optimizer.grad_accum_steps", "2")], cwd=tmp)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def second(tiny_shards, tmp_path_factory) -> Path:
    """Another run on the same shards, another seed, fp32, its final evaluation over 2 views: the
    second member of an ensemble."""
    tmp = tmp_path_factory.mktemp("eval2")
    res = run_cmd([CLI, "train", *tiny_overrides(tiny_shards, tmp / "run", "--train.seed", "7",
                                                 "--product.tta_views", "2")], cwd=tmp)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return tmp / "run"


@pytest.fixture(scope="module")
def plain_eval(trained, tiny_shards, tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path, Path]:
    """`cxr-dist evaluate` of `trained` on the test split with the defaults (the run's own views,
    threshold 0.5), run once for the tests that read it: its stdout, --predictions CSV and --out
    JSON (each CLI run costs ~15 s of start-up on 2 cores)."""
    tmp = tmp_path_factory.mktemp("plain-eval")
    res = run_cmd([CLI, "evaluate", "--checkpoint", str(trained), "--shards", str(tiny_shards), "--split", "test",
                   "--predictions", str(tmp / "plain.csv"), "--out", str(tmp / "plain.json")], cwd=trained)
    assert res.returncode == 0, res.stderr[-3000:]
    return res, tmp / "plain.csv", tmp / "plain.json"


def _csv(path: Path) -> dict:
    from cxr_dist.eval.evaluate import read_predictions

    return read_predictions(path)


def test_evaluate_on_shards(plain_eval, tiny_shards):
    res, _, out_file = plain_eval
    out = json.loads(res.stdout)
    assert json.loads(out_file.read_text()) == out  # --out writes what it prints
    test = load_index(tiny_shards).split("test")
    _, n_abnormal = test.labels
    assert out["image_level"]["n"] == test.total  # every test image exactly once
    assert out["image_level"]["n_pos"] == n_abnormal
    assert out["always_abnormal"]["accuracy"] == pytest.approx(n_abnormal / test.total)
    assert out["always_abnormal"]["recall"] == 1.0
    assert out["study_level"]["n"] == test.uids  # one prediction per study
    for key in ("accuracy", "precision", "recall", "f1", "auroc", "specificity", "balanced_accuracy", "confusion"):
        assert key in out["image_level"]
    for level in ("image_level", "study_level"):  # a 95% interval around each AUROC
        low, high = out[level]["auroc_ci95"]
        assert low <= out[level]["auroc"] <= high  # [1, 1] here: the tiny set is separable


def test_evaluate_with_a_threshold_picked_on_val(trained, tiny_shards, plain_eval):
    base = [CLI, "evaluate", "--checkpoint", str(trained), "--shards", str(tiny_shards), "--split", "test"]
    res = run_cmd([*base, "--threshold", "val"], cwd=trained)
    assert res.returncode == 0, res.stderr[-3000:]
    picked = json.loads(res.stdout)
    assert 0.0 < picked["threshold"] < 1.0
    # The same threshold given as a number gives the same metrics: it was applied to test as is.
    res = run_cmd([*base, "--threshold", str(picked["threshold"])], cwd=trained)
    assert json.loads(res.stdout)["image_level"] == picked["image_level"]
    # The training run made the same kind of choice for its evaluation.json (in bf16 there, so
    # its probabilities, the candidates, differ in the last digits from this fp32 evaluation).
    evaluation = json.loads((trained / "evaluation.json").read_text())
    at_val = evaluation["test_at_val_threshold"]
    assert 0.0 < at_val["threshold"] < 1.0 and at_val["image_level"]["n"] == picked["image_level"]["n"]
    assert evaluation["test"]["threshold"] == 0.5
    assert json.loads(plain_eval[0].stdout)["threshold"] == 0.5  # `base` as is: its default
    for bad in ("1.5", "high"):
        res = run_cmd([*base, "--threshold", bad], cwd=trained)
        assert res.returncode == 2 and "--threshold" in res.stderr and "Traceback" not in res.stderr


def test_training_writes_its_predictions(trained, tiny_shards):
    """RUN_DIR/predictions.csv: every val and test image once, the numbers behind evaluation.json."""
    from cxr_dist.eval.evaluate import report

    preds = _csv(trained / "predictions.csv")
    index = load_index(tiny_shards)
    evaluation = json.loads((trained / "evaluation.json").read_text())
    for split in ("val", "test"):
        assert len(set(preds[split]["keys"])) == len(preds[split]["keys"]) == index.split(split).total
        assert int(preds[split]["labels"].sum()) == index.split_labels(split)[1]
        again = report(preds[split])["image_level"]  # from the CSV's 6-digit probabilities
        assert again["confusion"] == evaluation[split]["image_level"]["confusion"]
        assert again["auroc"] == pytest.approx(evaluation[split]["image_level"]["auroc"], abs=1e-3)


def test_training_evaluates_its_best_checkpoint_with_tta_views(second, tiny_shards, tmp_path):
    res = run_cmd([CLI, "evaluate", "--checkpoint", str(second), "--shards", str(tiny_shards), "--tta", "2",
                   "--predictions", str(tmp_path / "p.csv")], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    by_cli, by_training = _csv(tmp_path / "p.csv")["test"], _csv(second / "predictions.csv")["test"]
    assert by_cli["keys"] == by_training["keys"]
    np.testing.assert_allclose(by_cli["probs"], by_training["probs"], atol=2e-6)


def test_evaluate_an_ensemble_of_checkpoints(trained, second, tiny_shards, plain_eval, tmp_path):
    base = [CLI, "evaluate", "--shards", str(tiny_shards), "--split", "test"]
    shutil.copy(plain_eval[1], tmp_path / "a.csv")  # `--checkpoint trained` alone: the plain evaluation
    for name, ckpts in (("b", [second]), ("ab", [trained, second])):
        res = run_cmd([*base, "--checkpoint", *map(str, ckpts), "--predictions", str(tmp_path / f"{name}.csv"),
                       "--out", str(tmp_path / f"{name}.json")], cwd=tmp_path)
        assert res.returncode == 0, res.stderr[-3000:]
    a, b, ab = (_csv(tmp_path / f"{n}.csv")["test"] for n in ("a", "b", "ab"))
    assert a["keys"] == b["keys"] == ab["keys"] and not np.allclose(a["probs"], b["probs"])
    np.testing.assert_allclose(ab["probs"], (a["probs"] + b["probs"]) / 2, atol=2e-6)  # CSVs keep 6 digits
    out = json.loads((tmp_path / "ab.json").read_text())
    assert out["checkpoint"] == [str(trained), str(second)] and out["image_level"]["n"] == len(ab["keys"])


def test_evaluate_with_test_time_augmentation(trained, tiny_shards, plain_eval, tmp_path):
    base = [CLI, "evaluate", "--checkpoint", str(trained), "--shards", str(tiny_shards), "--split", "test"]
    assert json.loads(plain_eval[0].stdout)["tta"] == 1  # the run's own product.tta_views: the plain view
    shutil.copy(plain_eval[1], tmp_path / "plain.csv")
    for name, tta in (("tta", "3"), ("tta-again", "3")):
        res = run_cmd([*base, "--tta", tta, "--predictions", str(tmp_path / f"{name}.csv")], cwd=tmp_path)
        assert res.returncode == 0, res.stderr[-3000:]
        assert json.loads(res.stdout)["tta"] == int(tta)
    plain, tta, again = (_csv(tmp_path / f"{n}.csv")["test"] for n in ("plain", "tta", "tta-again"))
    assert plain["keys"] == tta["keys"]
    assert not np.array_equal(plain["probs"], tta["probs"])  # tiny model: its outputs barely move
    np.testing.assert_array_equal(tta["probs"], again["probs"])  # and they are the same every time
    res = run_cmd([*base, "--tta", "0"], cwd=tmp_path)
    assert res.returncode == 2 and "--tta" in res.stderr and "Traceback" not in res.stderr


def test_tta_gives_the_same_answer_on_two_processes(tiny_shards, tmp_path):
    """evaluate_split with 3 views on 2 real processes (gloo) = the mean of the plain view and two
    augmented views computed here in one process. A brightness 'model' makes every view count."""
    from cxr_dist.config import load_config
    from cxr_dist.eval.evaluate import predict_split
    from tests.conftest import TINY
    from tests.tta_probe import Brightness

    res = accelerate_launch(["-m", "tests.tta_probe", str(tiny_shards), "3", str(tmp_path / "two.csv")], cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    assert "rank 1/2 done" in res.stdout
    two = _csv(tmp_path / "two.csv")["test"]
    data = load_config(str(TINY), []).loader
    index = load_index(tiny_shards)
    one, plain = (predict_split(Brightness(), data, "test", index, views) for views in (3, 1))
    assert two["keys"] == one["keys"] == plain["keys"]
    np.testing.assert_allclose(two["probs"], one["probs"], atol=2e-6)  # the CSV keeps 6 digits
    assert np.abs(one["probs"] - plain["probs"]).mean() > 1e-3  # the augmented views moved the mean


def test_ensemble_of_runs_from_their_predictions(trained, second, tmp_path):
    """bench/ensemble.py: the same mean as `evaluate --checkpoint A B`, from the runs' CSVs alone."""
    from cxr_dist.eval.metrics import compute_metrics

    script = [str(VENV_BIN / "python"), str(ROOT / "bench" / "ensemble.py")]
    res = run_cmd([*script, str(trained), str(second), "--out", str(tmp_path / "e.json")], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.splitlines()
    assert len(lines) == 5 and all(line.startswith("|") for line in lines)  # header, rule, 2 runs, mean
    out = json.loads((tmp_path / "e.json").read_text())
    a, b = _csv(trained / "predictions.csv")["test"], _csv(second / "predictions.csv")["test"]
    mean = compute_metrics((a["probs"] + b["probs"]) / 2, a["labels"])
    assert out["test"]["image_level"]["auroc"] == pytest.approx(mean["auroc"])
    assert 0.0 < out["test_at_val_threshold"]["threshold"] < 1.0
    # One run is scored alone: its row, no mean; its report is the run's own.
    res = run_cmd([*script, str(trained / "predictions.csv"), "--out", str(tmp_path / "one.json")], cwd=tmp_path)
    assert res.returncode == 0 and len(res.stdout.splitlines()) == 3 and "mean" not in res.stdout, res.stderr
    one = json.loads((tmp_path / "one.json").read_text())["test"]["image_level"]
    assert one["auroc"] == pytest.approx(compute_metrics(a["probs"], a["labels"])["auroc"])
    assert one["auroc_ci95"][0] <= one["auroc"] <= one["auroc_ci95"][1]
    # Runs over different images cannot be averaged.
    other, broken = tmp_path / "other.csv", tmp_path / "broken.csv"
    other.write_text("split,key,uid,label,prob_abnormal\nval,x,u,1,0.5\ntest,y,u,1,0.5\n")
    broken.write_text("split,key,uid,label,prob_abnormal\nval,x,u,1,high\n")
    for bad in ([str(trained), str(other)], [str(trained), str(broken)]):
        res = run_cmd([*script, *bad], cwd=tmp_path)
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr


def test_paired_auroc_gain_of_one_model_over_another(tmp_path):
    """bench/paired_auroc.py: the AUROC difference of two models on the same test images, per
    image and per study, with a paired interval that contains it (exactly 0 against itself).
    Synthetic predictions of 120 two-view studies: the tiny runs' models are too weak to differ."""
    from cxr_dist.eval.evaluate import PREDICTION_COLUMNS, predictions_csv
    from cxr_dist.eval.metrics import compute_metrics

    rng = np.random.default_rng(0)
    labels = np.repeat(rng.integers(0, 2, 120), 2)
    good = np.clip(rng.normal(0.35 + 0.3 * labels, 0.2), 0, 1)
    base = {"keys": [f"k{i:03d}" for i in range(240)], "uids": [f"u{i // 2:03d}" for i in range(240)],
            "labels": labels, "probs": good}
    worse = {**base, "probs": np.clip(good + rng.normal(0, 0.3, 240), 0, 1)}
    for name, test in (("base", base), ("worse", worse)):
        (tmp_path / f"{name}.csv").write_text(predictions_csv({"val": test, "test": test}))
    script = [str(VENV_BIN / "python"), str(ROOT / "bench" / "paired_auroc.py")]
    res = run_cmd([*script, *(str(tmp_path / f"{n}.csv") for n in ("base", "worse", "base"))], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    header, _, versus_worse, versus_itself = res.stdout.splitlines()
    diff = compute_metrics(worse["probs"], labels)["auroc"] - compute_metrics(good, labels)["auroc"]
    point, interval = [c.strip() for c in versus_worse.split("|")[1:-1]][4].split(" (")
    low, high = (float(x) for x in interval.rstrip(")").split(" to "))
    assert float(point) == pytest.approx(diff, abs=1e-4) and low <= float(point) <= high < 0
    assert versus_itself.count("+0.0000 (+0.0000 to +0.0000)") == 2  # image and study
    other = tmp_path / "other.csv"
    other.write_text(",".join(PREDICTION_COLUMNS) + "\ntest,y,u,1,0.5\n")
    for bad in (["base.csv", "other.csv"], ["base.csv", "missing"]):
        res = run_cmd([*script, *bad], cwd=tmp_path)
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr


def test_results_table_of_a_run(trained, plain_eval, tmp_path):
    """bench/results_table.py (the last step of bench/reproduce_results.sh): the per-epoch table,
    the test table and the AUROC intervals of the run's test_evaluation.json."""
    run = tmp_path / "run"
    shutil.copytree(trained, run, ignore=shutil.ignore_patterns("checkpoints"))
    # `cxr-dist evaluate --checkpoint RUN --shards S --split test --out RUN/test_evaluation.json`
    shutil.copy(plain_eval[2], run / "test_evaluation.json")
    res = run_cmd([str(VENV_BIN / "python"), str(ROOT / "bench" / "results_table.py"), str(run)], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    history = json.loads((run / "history.json").read_text())
    lines = res.stdout.splitlines()
    assert sum(line.startswith(f"| {r['epoch']} | {r['phase']} |") for r in history for line in lines) == len(history)
    ev = json.loads((run / "test_evaluation.json").read_text())
    assert f"| image_level | {ev['image_level']['accuracy']:.3f} |" in res.stdout
    low, high = ev["study_level"]["auroc_ci95"]
    assert lines[-1].startswith("95% bootstrap intervals") and f"study {low:.3f}-{high:.3f}" in lines[-1]


def test_evaluate_a_kaggle_folder_on_the_fly(trained, tiny_data, tmp_path):
    res = run_cmd([CLI, "evaluate", "--checkpoint", str(trained / "checkpoints" / "best"), "--data", str(tiny_data),
                   "--out", str(tmp_path / "e.json")], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads((tmp_path / "e.json").read_text())
    index = json.loads((trained / "config.toml").parent.joinpath("evaluation.json").read_text())
    assert index  # the training run wrote its own evaluation
    # All labelled images of the folder (the tiny set drops its 'No Indexing' studies).
    from cxr_dist.data.sources.iu import build_manifest

    df, _ = build_manifest(tiny_data, "drop")
    assert out["image_level"]["n"] == len(df)


@pytest.fixture(scope="module")
def plain_predict(trained, tiny_data) -> tuple[list[Path], list[dict]]:
    """`cxr-dist predict --checkpoint trained --json` of 4 films with the defaults, run once for
    the two tests that read it."""
    images = sorted((tiny_data / "images").rglob("*.png"))[:4]
    res = run_cmd([CLI, "predict", "--checkpoint", str(trained), "--json", *map(str, images)], cwd=trained)
    assert res.returncode == 0, res.stderr[-3000:]
    return images, [json.loads(line) for line in res.stdout.splitlines()]


def test_predict_prints_a_probability_per_image(trained, plain_predict):
    images, rows = plain_predict
    assert [r["image"] for r in rows] == [str(p) for p in images]
    assert all(0.0 <= r["prob_abnormal"] <= 1.0 and r["views"] == 1 for r in rows)
    # The run's threshold (picked on val, stored in the checkpoint) labels each image.
    from cxr_dist.model.checkpoint import load_model_state

    threshold = load_model_state(trained, tag="best")[1]["threshold"]["value"]
    assert [r["label"] for r in rows] == ["abnormal" if r["prob_abnormal"] >= threshold else "normal" for r in rows]


def test_predict_split_decodes_on_the_device_like_the_workers(trained, tiny_shards):
    """loader.decode_on = "device" (device_input.py, the GPU input pipeline) runs on the CPU as the
    same code path: evaluation gives the same probabilities as the workers' PIL decode."""
    import torch

    from cxr_dist.model.checkpoint import load_model_state
    from cxr_dist.config import LoaderConfig, ModelConfig, from_dict, replace, section
    from cxr_dist.eval.evaluate import predict_split
    from cxr_dist.model.classifier import build_model

    state, meta = load_model_state(trained, tag="best")
    model = build_model(replace(from_dict(ModelConfig, meta["config"]["model"]), pretrained=False, weights=""))
    model.load_state_dict(state)
    data = section(meta["config"], LoaderConfig)
    cpu = torch.device("cpu")
    index = load_index(tiny_shards)
    workers = predict_split(model, replace(data, decode_on="workers"), "test", index, device=cpu)
    device = predict_split(model, replace(data, decode_on="device"), "test", index, device=cpu)
    assert device["keys"] == workers["keys"] and len(workers["keys"]) > 0
    np.testing.assert_array_equal(device["probs"], workers["probs"])


def test_predict_with_views_and_a_threshold(trained, second, plain_predict):
    """--tta averages augmented views (reproducibly); the default is the run's own product.tta_views;
    --threshold adds the label the threshold gives."""
    images, plain = plain_predict

    def rows(ckpt, *args):
        res = run_cmd([CLI, "predict", "--checkpoint", str(ckpt), "--json", *args, *map(str, images)], cwd=ckpt)
        assert res.returncode == 0, res.stderr[-3000:]
        return [json.loads(line) for line in res.stdout.splitlines()]

    tta, again = rows(trained, "--tta", "3"), rows(trained, "--tta", "3")
    assert [r["views"] for r in tta] == [3] * 4 and tta == again
    assert [r["prob_abnormal"] for r in tta] != [r["prob_abnormal"] for r in plain]
    assert [r["views"] for r in rows(second)] == [2] * 4  # trained with product.tta_views = 2
    probs = [r["prob_abnormal"] for r in plain]
    middle = (min(probs) + max(probs)) / 2
    labelled = rows(trained, "--threshold", str(middle))
    assert [r["label"] for r in labelled] == ["abnormal" if r["prob_abnormal"] >= middle else "normal" for r in plain]
    assert {r["label"] for r in labelled} == {"abnormal", "normal"}
    for bad in (["--tta", "0"], ["--threshold", "2"]):
        res = run_cmd([CLI, "predict", "--checkpoint", str(trained), *bad, str(images[0])], cwd=trained)
        assert res.returncode == 2 and bad[0] in res.stderr and "Traceback" not in res.stderr


def test_inference_device_is_the_gpu_when_there_is_one(monkeypatch):
    """`cxr-dist evaluate` (predict_split) and `cxr-dist predict` run on model.inference_device().
    Only the choice is tested here: a GPU cannot be mocked honestly (a CUDA tensor needs CUDA), so on
    these CPU machines the tests of evaluate and predict run the CPU path, and the GPU path is
    checked by the next test only where a GPU is present."""
    import torch

    from cxr_dist.model.classifier import inference_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert inference_device() == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert inference_device() == torch.device("cuda")


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a GPU (this machine has none)")
def test_predict_split_on_the_gpu_matches_the_cpu(trained, tiny_shards):
    import torch

    from cxr_dist.model.checkpoint import load_model_state
    from cxr_dist.config import LoaderConfig, ModelConfig, from_dict, replace, section
    from cxr_dist.eval.evaluate import predict_split
    from cxr_dist.model.classifier import build_model

    state, meta = load_model_state(trained, tag="best")
    model = build_model(replace(from_dict(ModelConfig, meta["config"]["model"]), pretrained=False, weights=""))
    model.load_state_dict(state)
    data = section(meta["config"], LoaderConfig)
    index = load_index(tiny_shards)
    cpu = predict_split(model, data, "test", index, 2, device=torch.device("cpu"))
    gpu = predict_split(model, data, "test", index, 2)  # the default: the GPU
    assert next(model.parameters()).is_cuda and gpu["keys"] == cpu["keys"]
    np.testing.assert_allclose(gpu["probs"], cpu["probs"], atol=1e-4)


@pytest.mark.parametrize("what", ["missing", "garbage", "pickle"])
def test_bad_checkpoint_is_a_clear_error(trained, tmp_path, what):
    bad = tmp_path / "ckpt"
    if what != "missing":
        bad.mkdir()
        payload = b"\x80\x04\x95not a checkpoint" if what == "pickle" else b"garbage"
        (bad / "model.safetensors").write_bytes(payload)
    res = run_cmd([CLI, "predict", "--checkpoint", str(bad), "x.png"], cwd=tmp_path)
    assert res.returncode == 2
    assert "Traceback" not in res.stderr and "cxr-dist predict:" in res.stderr


def test_predict_missing_image_is_a_clear_error(trained, tmp_path):
    res = run_cmd([CLI, "predict", "--checkpoint", str(trained), str(tmp_path / "nope.png")], cwd=tmp_path)
    assert res.returncode == 2 and "no such image" in res.stderr and "Traceback" not in res.stderr


def test_train_without_shards_says_how_to_make_them(tmp_path):
    config = Path(__file__).resolve().parents[1] / "configs" / "tiny.toml"
    res = run_cmd([CLI, "train", "--config", str(config), "--data.shards_dir", str(tmp_path / "none"),
                   "--train.run_dir", str(tmp_path / "r")], cwd=tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "prepare" in res.stderr
    assert not (tmp_path / "mlflow.db").exists()  # failed before opening an MLflow run

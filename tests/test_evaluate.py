"""`cxr-dist evaluate` and `cxr-dist predict` on a checkpoint of a real (tiny) training run."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import VENV_BIN, run_cmd, tiny_overrides

pytestmark = pytest.mark.slow
CLI = str(VENV_BIN / "cxr-dist")


@pytest.fixture(scope="module")
def trained(tiny_shards, tmp_path_factory) -> Path:
    """One process, bf16 autocast and gradient accumulation: the single-process code path."""
    tmp = tmp_path_factory.mktemp("eval")
    run_dir = tmp / "run"
    res = run_cmd([CLI, "train", *tiny_overrides(tiny_shards, run_dir, "--train.mixed_precision", "bf16",
                                                 "--train.grad_accum_steps", "2")], cwd=tmp)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return run_dir


def test_evaluate_on_shards(trained, tiny_shards):
    res = run_cmd([CLI, "evaluate", "--checkpoint", str(trained), "--shards", str(tiny_shards), "--split", "test"],
                  cwd=trained)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout)
    index = json.loads((tiny_shards / "index.json").read_text())
    test = index["splits"]["test"]
    assert out["image_level"]["n"] == test["total"]  # every test image exactly once
    assert out["image_level"]["n_pos"] == test["labels"]["abnormal"]
    assert out["always_abnormal"]["accuracy"] == pytest.approx(test["labels"]["abnormal"] / test["total"])
    assert out["always_abnormal"]["recall"] == 1.0
    assert out["study_level"]["n"] == test["uids"]  # one prediction per study
    for key in ("accuracy", "precision", "recall", "f1", "auroc", "specificity", "balanced_accuracy", "confusion"):
        assert key in out["image_level"]


def test_evaluate_with_a_threshold_picked_on_val(trained, tiny_shards):
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
    assert json.loads(run_cmd(base, cwd=trained).stdout)["threshold"] == 0.5
    for bad in ("1.5", "high"):
        res = run_cmd([*base, "--threshold", bad], cwd=trained)
        assert res.returncode == 2 and "--threshold" in res.stderr and "Traceback" not in res.stderr


def test_evaluate_a_kaggle_folder_on_the_fly(trained, tiny_data, tmp_path):
    res = run_cmd([CLI, "evaluate", "--checkpoint", str(trained / "checkpoints" / "best"), "--data", str(tiny_data),
                   "--out", str(tmp_path / "e.json")], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads((tmp_path / "e.json").read_text())
    index = json.loads((trained / "config.toml").parent.joinpath("evaluation.json").read_text())
    assert index  # the training run wrote its own evaluation
    # All labelled images of the folder (the tiny set drops its 'No Indexing' studies).
    from cxr_dist.manifest import build_manifest

    df, _ = build_manifest(tiny_data, "drop")
    assert out["image_level"]["n"] == len(df)


def test_predict_prints_a_probability_per_image(trained, tiny_data):
    images = sorted((tiny_data / "images").rglob("*.png"))[:3]
    res = run_cmd([CLI, "predict", "--checkpoint", str(trained), "--json", *map(str, images)], cwd=trained)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    assert [r["image"] for r in rows] == [str(p) for p in images]
    assert all(0.0 <= r["prob_abnormal"] <= 1.0 for r in rows)


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

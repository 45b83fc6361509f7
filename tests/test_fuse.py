"""`cxr-dist fuse`: a real image run and a real text run (one process each, tiny BERT with random
weights: no download) on the same generated IU shards, made one late-fusion checkpoint. The
checkpoint must compute the weighed rule that bench/ensemble.py applies to the runs' predictions:
`cxr-dist evaluate` on it reproduces the fused predictions.csv film by film."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from cxr_dist.errors import run_main
from cxr_dist.eval.evaluate import read_predictions
from cxr_dist.eval.metrics import compute_metrics
from cxr_dist.runs.fuse import PROG, build, fuse, main, pick_weight
from cxr_dist.runs.paired import reads
from tests.conftest import TINY, VENV_BIN, run_cmd, tiny_overrides
from tests.textgen import make_text_dataset, make_tiny_bert

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory) -> tuple[Path, Path, Path, Path]:
    """(shards, image run, text run, work folder). The image run trains a backbone block in its
    second phase, so the fused checkpoint must carry the image run's backbone, not ImageNet's."""
    tmp = tmp_path_factory.mktemp("fuse")
    shards = tmp / "shards"
    res = run_cmd([str(VENV_BIN / "cxr-dist"), "prepare", "--config", str(TINY), "--data",
                   str(make_text_dataset(tmp / "ds")), "--out", str(shards)], cwd=tmp)
    assert res.returncode == 0, res.stdout + res.stderr
    bert = make_tiny_bert(tmp / "bert")
    common = ["--train.cache_views", "1", "--tracking.enabled", "false", "--product.cam_images", "0"]
    runs = {"image": [], "text": ["--model.kind", "text", "--model.text_encoder", str(bert),
                                  "--train.phases.1.unfreeze_blocks", "0"]}
    for name, extra in runs.items():  # not tracked: the fused run's MLflow record is what is tested
        res = run_cmd([sys.executable, "-m", "cxr_dist.train", *tiny_overrides(shards, tmp / name), *common, *extra],
                      cwd=tmp, timeout=400)
        assert res.returncode == 0, res.stderr[-4000:]
    return shards, tmp / "image", tmp / "text", tmp


def auroc(preds: dict) -> float:
    return compute_metrics(preds["probs"], preds["labels"])["auroc"]


@pytest.mark.slow
def test_fuse_makes_the_weighed_pair_one_checkpoint_that_evaluate_reproduces(two_runs, mlflow_server):
    shards, image, text, tmp = two_runs
    out = tmp / "fused"
    # A weight strictly inside (0, 1), so both heads count (on these generated films the image alone
    # may separate val perfectly, and the weight picked there is then 1: tested below).
    w = 0.6
    made = run_cmd([str(VENV_BIN / "cxr-dist"), "fuse", str(image), str(text), "--out", str(out), "--weight", str(w),
                    "--tracking-uri", mlflow_server], cwd=tmp)
    assert made.returncode == 0, made.stdout + made.stderr
    a, b = read_predictions(image), read_predictions(text)
    record = json.loads((out / "fusion.json").read_text())
    assert record["weight_of_image"] == w and record["picked_on"] == "given (--weight)"
    assert "weight of the image run: 0.60 (given); of the text run: 0.40" in made.stdout

    # The run folder's predictions are the rule applied to the members' (then recalibrated: same order).
    fused = read_predictions(out)
    for split in ("val", "test"):
        rule = fuse(a[split], b[split], w)
        assert fused[split]["keys"] == rule["keys"]
        assert auroc(fused[split]) == pytest.approx(auroc(rule), abs=1e-9)

    # The checkpoint computes it: evaluate reads the shards, the films and the texts, through the
    # image run's backbone and head and the text run's encoder and head.
    res = run_cmd([str(VENV_BIN / "cxr-dist"), "evaluate", "--checkpoint", str(out), "--shards", str(shards),
                   "--split", "test", "--predictions", str(tmp / "again.csv")], cwd=tmp)
    assert res.returncode == 0, res.stdout + res.stderr
    again = read_predictions(tmp / "again.csv")["test"]
    assert again["keys"] == fused["test"]["keys"]
    np.testing.assert_allclose(again["probs"], fused["test"]["probs"], atol=2e-5)

    # What the folder says it is: a late-fusion image+text model reading the text run's fields.
    assert reads(str(out)) == "image+text late fusion (indication,comparison)"
    card = (out / "MODEL_CARD.md").read_text()
    assert "late" in card and "indication, comparison" in card
    assert "## Fused after training" in card and "sigmoid(0.60 logit p_image + 0.40 logit p_text)" in card
    assert str(text.resolve()) in card and "No shard index was available" not in card  # the image run's shards
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert evaluation["test"]["image_level"]["auroc"] == pytest.approx(auroc(fused["test"]), abs=1e-4)

    # A run of its own in the real MLflow server: tagged as training tags, its metrics, its served model.
    import base64

    import mlflow
    import pandas as pd

    run_id = re.search(r"logged to MLflow as run (\w+)", made.stdout).group(1)
    run = mlflow.MlflowClient(mlflow_server).get_run(run_id)
    assert run.data.tags["model.kind"] == "image+text" and run.data.tags["fusion"] == "late"
    assert run.data.tags["text_fields"] == "indication,comparison" and run.data.tags["label_leakage"] == "false"
    assert str(image.resolve()) in run.data.tags["fused_from"]
    assert run.data.metrics["best_test/auroc"] == pytest.approx(evaluation["test"]["image_level"]["auroc"])
    assert float(run.data.params["fusion.weight_of_image"]) == w
    mlflow.set_tracking_uri(mlflow_server)
    served = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    film = sorted((tmp / "ds" / "images" / "images_normalized").glob("1_*.png"))[0]
    got = served.predict(pd.DataFrame({"image": [base64.b64encode(film.read_bytes()).decode()] * 2,
                                       "indication": ["Chest pain.", None]}))
    assert list(got["text"]) == [True, False] and got["prob_abnormal"].between(0, 1).all()


@pytest.mark.slow
def test_the_weight_is_picked_on_val_and_never_on_test(two_runs):
    _, image, text, tmp = two_runs
    a, b = read_predictions(image), read_predictions(text)
    result = build(str(image), str(text), tmp / "picked", tracking="")
    w, scores = pick_weight(a["val"], b["val"])
    assert result["weight_of_image"] == w and result["picked_on"] == "val" and result["mlflow_run_id"] is None
    assert result["val_study_auroc_by_weight"] == scores and len(scores) == 21
    # The picked weight's fusion is the one the folder holds, on test too (ranking: recalibration keeps it).
    assert auroc(read_predictions(tmp / "picked")["test"]) == pytest.approx(auroc(fuse(a["test"], b["test"], w)))
    assert not (tmp / "picked" / "mlflow_run_id.txt").exists()  # tracking="": nothing logged


@pytest.mark.slow
@pytest.mark.parametrize("case", ["swapped", "not empty", "bad weight"])
def test_fuse_refuses_bad_input_with_one_line(two_runs, case, capsys):
    _, image, text, tmp = two_runs
    out = tmp / f"bad-{case.replace(' ', '-')}"
    args = {"swapped": [str(text), str(image)], "not empty": [str(image), str(text)],
            "bad weight": [str(image), str(text), "--weight", "1.5"]}[case]
    if case == "not empty":
        out.mkdir()
        (out / "mine.txt").write_text("a user's file")
    assert run_main(PROG, main, [*args, "--out", str(out)], setup_logging=False) == 2  # what `cxr-dist fuse` runs
    expected = {"swapped": "must have model.kind = 'image', it has 'text'", "not empty": "is not empty",
                "bad weight": "--weight must be in [0, 1]"}[case]
    err = capsys.readouterr().err
    assert err.startswith("cxr-dist fuse: ") and expected in err and len(err.strip().splitlines()) == 1
    if case == "not empty":
        assert [p.name for p in out.iterdir()] == ["mine.txt"]  # nothing of the user's touched
    else:
        assert not (out / "checkpoints").exists()


@pytest.mark.slow
def test_a_leaking_text_run_makes_a_leaking_fused_run(two_runs, capsys, caplog):
    # A text run that reads the findings (allowed on purpose, to measure the leak): fused with the
    # image run, the leak must stay visible: a warning, LEAK in compare, the card's first limitation.
    shards, image, _, tmp = two_runs
    leaking = tmp / "text-findings"
    res = run_cmd([sys.executable, "-m", "cxr_dist.train", *tiny_overrides(shards, leaking),
                   "--train.cache_views", "1", "--tracking.enabled", "false", "--product.cam_images", "0",
                   "--model.kind", "text", "--model.text_encoder", str(tmp / "bert"),
                   "--train.phases.1.unfreeze_blocks", "0",
                   "--loader.text_fields", '["findings"]', "--loader.allow_label_leakage", "true"], cwd=tmp, timeout=400)
    assert res.returncode == 0, res.stderr[-4000:]
    out = tmp / "fused-leak"
    with caplog.at_level("WARNING"):
        assert run_main(PROG, main, [str(image), str(leaking), "--out", str(out), "--no-tracking"],
                        setup_logging=False) == 0
    assert "LABEL LEAKAGE" in caplog.text and "findings" in caplog.text
    assert reads(str(out)) == "image+text late fusion (findings) LEAK"
    card = (out / "MODEL_CARD.md").read_text()
    assert "**LABEL LEAKAGE: this model reads findings" in card.split("## Model")[0]  # before any number
    limits = card[card.index("## Known limitations"):]
    assert limits.split("\n- ")[1].startswith("**LABEL LEAKAGE.**")  # the first limitation

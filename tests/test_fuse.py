"""`cxr-dist fuse`: a real image run and a real text run (one process each, tiny BERT with random
weights: no download) on the same generated IU shards, made one late-fusion checkpoint. The
checkpoint must compute the weighed rule that bench/ensemble.py applies to the runs' predictions:
`cxr-dist evaluate` on it reproduces the fused predictions.csv film by film."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from cxr_dist.errors import run_main
from cxr_dist.eval.evaluate import read_predictions
from cxr_dist.eval.metrics import compute_metrics
from cxr_dist.product.fuse import PROG, build, fuse, main, pick_weight
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
    for name, extra in runs.items():
        res = run_cmd([sys.executable, "-m", "cxr_dist.train", *tiny_overrides(shards, tmp / name), *common, *extra],
                      cwd=tmp, timeout=400)
        assert res.returncode == 0, res.stderr[-4000:]
    return shards, tmp / "image", tmp / "text", tmp


def auroc(preds: dict) -> float:
    return compute_metrics(preds["probs"], preds["labels"])["auroc"]


@pytest.mark.slow
def test_fuse_makes_the_weighed_pair_one_checkpoint_that_evaluate_reproduces(two_runs):
    shards, image, text, tmp = two_runs
    out = tmp / "fused"
    res = run_cmd([str(VENV_BIN / "cxr-dist"), "fuse", str(image), str(text), "--out", str(out)], cwd=tmp)
    assert res.returncode == 0, res.stdout + res.stderr
    a, b = read_predictions(image), read_predictions(text)
    w, _ = pick_weight(a["val"], b["val"])
    record = json.loads((out / "fusion.json").read_text())
    assert record["weight_of_image"] == w and record["picked_on"] == "val"
    assert f"weight of the image run: {w:.2f} (picked on val)" in res.stdout

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
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert evaluation["test"]["image_level"]["auroc"] == pytest.approx(auroc(fused["test"]), abs=1e-4)


@pytest.mark.slow
def test_a_given_weight_of_one_is_the_image_run(two_runs):
    _, image, text, tmp = two_runs
    out = tmp / "image-only"
    assert build(str(image), str(text), out, weight=1.0)["picked_on"] == "given (--weight)"
    a, fused = read_predictions(image)["test"], read_predictions(out)["test"]
    assert auroc(fused) == pytest.approx(auroc(a), abs=1e-9)


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

"""The findings head (issue 22, items 2-3): masked BCE, targets by key, per-finding metrics, and a
real training run on shards with findings whose history, evaluation and model card carry them."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from cxr_dist.config import ModelConfig
from cxr_dist.eval.per_finding import (MIN_POSITIVES, finding_table, findings_breakdown, findings_report, macro_auroc,
                                        source_macro_auroc)
from cxr_dist.model.classifier import build_model
from cxr_dist.model.findings_head import FindingsTable, MaskedBCE, align
from tests.conftest import TINY, VENV_BIN, run_cmd, tiny_overrides


# ----------------------------------------------------------------------------- the loss and targets


def test_masked_bce_ignores_masked_entries_and_weights_positives():
    torch.manual_seed(0)
    logits, targets = torch.randn(6, 3), torch.randint(0, 2, (6, 3)).float()
    mask = torch.tensor([[1, 0, 1]] * 6, dtype=torch.bool)
    loss = MaskedBCE(torch.ones(3))
    flipped = targets.clone()
    flipped[:, 1] = 1 - flipped[:, 1]  # a masked column: its targets mean nothing
    assert torch.equal(loss(logits, targets, mask), loss(logits, flipped, mask))
    by_hand = torch.nn.functional.binary_cross_entropy_with_logits(logits[:, [0, 2]], targets[:, [0, 2]])
    assert torch.allclose(loss(logits, targets, mask), by_hand)
    assert loss(logits, targets, torch.zeros_like(mask)).item() == 0.0  # nothing annotated: nothing learnt
    weighted = MaskedBCE(torch.tensor([5.0, 1.0, 1.0]))(logits, torch.ones(6, 3), mask)
    assert weighted > loss(logits, torch.ones(6, 3), mask)  # positives count pos_weight times


def test_targets_by_key_and_by_name():
    table = FindingsTable(("effusion", "edema"), {"a": ([1.0, 0.0], [True, False]), "b": ([0.0, 1.0], [True, True])})
    t, m = table.lookup(["b", "zzz", "a"])
    assert t.tolist() == [[0, 1], [0, 0], [1, 0]] and m.tolist() == [[True, True], [False, False], [True, False]]
    # A batch in another vocabulary: columns by name; a finding the shards lack is masked.
    v, mk = align(torch.tensor([[1.0, 0.0, 1.0]]), torch.tensor([[True, True, False]]),
                  ("edema", "effusion", "any_finding"), ("effusion", "edema", "mass"))
    assert v.tolist() == [[0, 1, 0]] and mk.tolist() == [[True, True, False]]


def test_the_findings_head_leaves_the_abnormal_output_alone():
    """Same weights, with and without a findings head: the abnormal logits are the same; the
    findings come from the same hidden layer."""
    torch.manual_seed(0)
    cfg = ModelConfig(backbone="efficientnet_b0", pretrained=False)
    plain, multi = build_model(cfg), build_model(cfg, ("effusion", "edema"))
    missing, unexpected = multi.load_state_dict(plain.state_dict(), strict=False)
    assert set(missing) == {"findings_head.weight", "findings_head.bias"} and not unexpected
    plain.eval(), multi.eval()
    x = torch.rand(2, 3, 64, 64)
    logits, findings = multi(x, return_findings=True)
    assert torch.allclose(logits, plain(x), atol=1e-6) and torch.allclose(multi(x), plain(x), atol=1e-6)
    assert findings.shape == (2, 2)


# ----------------------------------------------------------------------------- metrics


def test_per_finding_auroc_counts_annotated_images_only():
    rng = np.random.default_rng(0)
    n = 60
    targets = np.stack([rng.integers(0, 2, n), rng.integers(0, 2, n)], 1).astype(float)
    probs = np.where(targets == 1, 0.8, 0.2) + rng.normal(0, 0.05, (n, 2))
    mask = np.ones((n, 2), bool)
    mask[:30, 1] = False
    probs[:30, 1] = 1 - probs[:30, 1]  # wrong on the masked half: must not lower the AUROC
    table = finding_table(probs, targets, mask, ["a", "b"], interval=True)
    assert table["a"]["auroc"] == pytest.approx(1.0) and table["b"]["auroc"] == pytest.approx(1.0)
    assert table["b"]["n"] == 30 and table["b"]["n_pos"] == int(targets[30:, 1].sum())
    assert len(table["a"]["auroc_ci95"]) == 2
    # The macro mean leaves out a finding with fewer than MIN_POSITIVES positives.
    few = targets.copy()
    few[:, 1] = 0
    few[:MIN_POSITIVES - 1, 1] = 1
    mean, used = macro_auroc(finding_table(probs, few, np.ones((n, 2), bool), ["a", "b"]))
    assert used == ["a"] and mean == pytest.approx(1.0)
    flat = findings_breakdown(probs, targets, mask, ["a", "b"])
    assert flat["finding/b/n_pos"] == table["b"]["n_pos"] and flat["findings_macro_auroc"] == pytest.approx(1.0)
    rep = findings_report(probs, targets, mask, ["a", "b"], [str(i) for i in range(n)], ["s1"] * n, ["PA"] * n)
    assert rep["by_finding"]["b"]["by_source"]["s1"]["n"] == 30 and rep["macro_over"] == ["a", "b"]


def test_the_macro_mean_scores_each_finding_within_its_source():
    # Finding "p" is ranked at chance within each source, but source "k" has nearly all the
    # positives and higher scores: pooled, its AUROC is high and measures the source, not p.
    rng = np.random.default_rng(0)
    n = 200
    sources = ["iu"] * n + ["k"] * n
    targets = np.concatenate([rng.random(n) < 0.1, rng.random(n) < 0.7]).astype(float)[:, None]
    probs = np.concatenate([rng.random(n) * 0.5, 0.5 + rng.random(n) * 0.5])[:, None]
    mask = np.ones_like(targets, bool)
    pooled = finding_table(probs, targets, mask, ["p"])["p"]["auroc"]
    assert pooled > 0.75
    macro, used = source_macro_auroc(probs, targets, mask, ["p"], sources)
    assert used == ["p (iu)", "p (k)"] and abs(macro - 0.5) < 0.1
    within = [finding_table(probs[i:i + n], targets[i:i + n], mask[i:i + n], ["p"])["p"]["auroc"] for i in (0, n)]
    assert macro == pytest.approx(np.mean(within))
    assert findings_breakdown(probs, targets, mask, ["p"], sources)["findings_macro_auroc"] == pytest.approx(macro)
    assert findings_breakdown(probs, targets, mask, ["p"])["findings_macro_auroc"] == pytest.approx(pooled)
    rep = findings_report(probs, targets, mask, ["p"], [str(i) for i in range(2 * n)], sources, ["PA"] * (2 * n))
    assert rep["macro_over"] == used and rep["macro_auroc"] == pytest.approx(macro)
    assert rep["by_finding"]["p"]["auroc"] == pytest.approx(pooled)  # the pooled number is still reported
    # a source with too few positives of a finding leaves only its cell out
    few = targets.copy()
    few[:n] = 0
    few[:MIN_POSITIVES - 1] = 1
    assert source_macro_auroc(probs, few, mask, ["p"], sources)[1] == ["p (k)"]


# ----------------------------------------------------------------------------- a real run


@pytest.fixture(scope="module")
def findings_run(tiny_data, tmp_path_factory):
    """configs/tiny.toml on shards prepared with the NIH findings vocabulary: both phases, 1 process."""
    root = tmp_path_factory.mktemp("findings-run")
    shards = root / "shards"
    res = run_cmd([str(VENV_BIN / "cxr-dist"), "prepare", "--config", str(TINY), "--data", str(tiny_data),
                   "--out", str(shards), "--data.findings", '["nih14"]'], cwd=root)
    assert res.returncode == 0, res.stdout + res.stderr
    run_dir = root / "run"
    res = run_cmd([str(VENV_BIN / "python"), "-m", "cxr_dist.train",
                   *tiny_overrides(shards, run_dir, "--product.cam_images", "0")], cwd=root, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return run_dir, res.stdout + res.stderr


def test_a_run_on_findings_shards_trains_and_reports_each_finding(findings_run):
    run_dir, log = findings_run
    assert "findings head: atelectasis, cardiomegaly, effusion" in log
    history = json.loads((run_dir / "history.json").read_text())
    last = history[-1] if isinstance(history, list) else history["epochs"][-1]
    assert "val/findings_macro_auroc" in last and "val/finding/cardiomegaly/auroc" in last
    # Every finding's positives on validation are the shards' own count (targets by key, masks kept).
    from cxr_dist.data.index import load_index

    index = load_index(run_dir.parent / "shards")
    counts = index.finding_counts("val")
    assert all(last[f"val/finding/{n}/n_pos"] == counts[n].positive for n in counts if n != "any_finding")
    assert sum(c.positive for n, c in counts.items() if n != "any_finding") > 0  # something to learn from
    evaluation = json.loads((run_dir / "evaluation.json").read_text())
    test = evaluation["test"]["findings"]
    assert set(test["by_finding"]) >= {"cardiomegaly", "effusion", "atelectasis"}
    cardio = test["by_finding"]["cardiomegaly"]
    assert cardio["n"] > 0 and (math.isnan(cardio["auroc"]) or 0 <= cardio["auroc"] <= 1)
    meta = json.loads((run_dir / "checkpoints" / "best" / "meta.json").read_text())
    assert meta["findings"][:3] == ["atelectasis", "cardiomegaly", "effusion"] and "any_finding" not in meta["findings"]
    card = (run_dir / "MODEL_CARD.md").read_text()
    assert "## Findings" in card and "| cardiomegaly |" in card


def test_a_product_of_a_findings_run_loads_with_its_head(findings_run):
    from cxr_dist.product.inference import Product

    product = Product.load(findings_run[0])
    assert product.model.findings[:2] == ("atelectasis", "cardiomegaly")
    assert product.model.findings_head.out_features == 14


def test_evaluate_on_an_outside_nih_collection_reports_each_finding(findings_run, tmp_path):
    """`cxr-dist evaluate --data NIH_DIR --format nih`: the films are prepared with the run's
    vocabulary, NIH's labels map to the 14 findings, and the JSON scores each one."""
    from tests.datagen import make_nih_dataset

    nih = make_nih_dataset(tmp_path / "nih", n_patients=16)
    res = run_cmd([str(VENV_BIN / "cxr-dist"), "evaluate", "--checkpoint", str(findings_run[0]), "--data", str(nih),
                   "--format", "nih", "--out", str(tmp_path / "eval.json")], cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = json.loads((tmp_path / "eval.json").read_text())
    table = out["findings"]["by_finding"]
    assert len(table) == 14  # every finding of the head; NIH annotates all of them
    assert all(m["n"] == out["image_level"]["n"] for m in table.values())
    assert sum(m["n_pos"] for m in table.values()) > 0


def test_the_product_gives_a_calibrated_probability_and_a_call_per_finding(findings_run, tiny_data, tmp_path):
    """predict, the served model's columns and the ONNX export, per finding: temperatures and
    thresholds fitted on val (meta.json), applied by the one Readout."""
    from cxr_dist.product.export import FINDINGS_OUTPUT, check_parity, export_onnx, metadata
    from cxr_dist.product.inference import Product
    from cxr_dist.product.serve import _flat, output_schema

    run_dir = findings_run[0]
    meta = json.loads((run_dir / "checkpoints" / "best" / "meta.json").read_text())
    fr = meta["findings_readout"]
    assert fr["names"] == meta["findings"] and len(fr["temperature"]) == len(fr["threshold"]) == 14
    assert all(t > 0 for t in fr["temperature"])
    product = Product.load(run_dir)
    film = next((tiny_data / "images" / "images_normalized").glob("*.png"))
    row = product.predict([product.read(film, film.name)])[0]
    assert list(row["findings"]) == list(meta["findings"]) and all(0 <= p <= 1 for p in row["findings"].values())
    # (predict rounds to 6 digits; a val film can sit exactly on its finding's threshold)
    called = [n for n, t in zip(fr["names"], fr["threshold"]) if t is not None and row["findings"][n] >= round(t, 6)]
    assert row["findings_positive"] == called
    # The served model: one column per finding.
    columns = [c.name for c in output_schema(product.model.findings).inputs]
    assert "prob_cardiomegaly" in columns and set(_flat(row)) <= set(columns)
    # ONNX: a third output, the calibrated probability per finding, equal to torch's.
    out = export_onnx(run_dir, tmp_path / "m.onnx")
    assert metadata(out)["findings"].split(",") == list(meta["findings"])
    parity = check_parity(out, run_dir)
    assert parity["max_prob_diff"] < 1e-4 and parity["max_finding_prob_diff"] < 1e-4, parity
    from cxr_dist.product.export import onnx_session

    assert [o.name for o in onnx_session(out).get_outputs()][-1] == FINDINGS_OUTPUT


def test_grad_cam_explains_a_finding(findings_run, tiny_data, tmp_path):
    """`predict --cam DIR --cam-target cardiomegaly`: overlays of the finding's own logit; a name
    the model lacks is refused with the names it has."""
    film = next((tiny_data / "images" / "images_normalized").glob("*.png"))
    base = [str(VENV_BIN / "cxr-dist"), "predict", "--checkpoint", str(findings_run[0]), "--json", str(film)]
    res = run_cmd([*base, "--cam", str(tmp_path / "cam"), "--cam-target", "cardiomegaly"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    row = json.loads(res.stdout.splitlines()[-1])
    assert row["cam"].endswith("_cam.png") and (tmp_path / "cam").is_dir() and "findings" in row
    bad = run_cmd([*base, "--cam", str(tmp_path / "cam2"), "--cam-target", "broken_bone"], cwd=tmp_path)
    assert bad.returncode == 2 and "abnormal, atelectasis, cardiomegaly" in bad.stderr
    from cxr_dist.product.cam import grad_cam
    from cxr_dist.product.inference import Product

    model = Product.load(findings_run[0]).model
    x = torch.randint(0, 256, (2, 1, 32, 32), dtype=torch.uint8)
    heat_f, heat_a = grad_cam(model, x, "cardiomegaly"), grad_cam(model, x, 1)
    assert heat_f.shape == heat_a.shape == (2, 32, 32) and not torch.equal(heat_f, heat_a)

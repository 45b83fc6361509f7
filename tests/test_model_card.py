"""RUN_DIR/MODEL_CARD.md (cxr_dist/product/model_card.py) from a real shard index (write_shards on generated
IU-layout and folder-per-class sources) and a real evaluation (evaluate.report on generated
predictions, the threshold picked on val as final.py picks it)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from scipy.special import expit

from cxr_dist.eval.calibrate import apply_temperature, calibration_report, fit_temperature
from cxr_dist.config import Config, DataConfig, SourceConfig, TrainConfig, replace
from cxr_dist.eval.evaluate import report
from cxr_dist.fileio import json_bytes
from cxr_dist.eval.metrics import balanced_threshold
from cxr_dist.product.model_card import NOT_FOR_CLINICAL_USE, limitations, model_card, write_model_card
from cxr_dist.data.index import ShardIndex
from cxr_dist.data.shards import write_shards
from tests.datagen import KERMANY_REGEX, make_dataset, make_folder_dataset

IU_LICENCE = "CC BY-NC-ND 4.0 (Open-i; non-commercial research use)"
DATA = {"image_size": 48, "samples_per_shard": 16, "prepare_workers": 1}


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Config, ShardIndex]:
    """A two-source config (IU trained on, a folder source held out as external, no licence
    stated) and the index that `prepare` writes for it."""
    root = tmp_path_factory.mktemp("card")
    iu = SourceConfig(name="iu", format="iu", path=str(make_dataset(root / "iu_small", n_uids=24, size=40)),
                      licence=IU_LICENCE)
    ext = SourceConfig(name="kermany", format="folder", role="external", patient_regex=KERMANY_REGEX,
                       path=str(make_folder_dataset(root / "kermany_ped", n_patients=8, size=40, subsets=False)),
                       normal_labels=("NORMAL",), abnormal_labels=("PNEUMONIA",))
    cfg = Config(data=DataConfig(sources=(iu, ext), **DATA), train=TrainConfig(run_dir=str(root / "run")))
    return cfg, write_shards(cfg.data, root / "shards")


def _preds(rng, n_studies: int, source: str, views: tuple[str, ...], strength: float, lateral_shift: float = 0.0) -> dict:
    """Predictions in evaluate.predict_split's shape: every study has one film per view and one
    label; `lateral_shift` raises P(abnormal) of normal LATERAL films (a view shortcut)."""
    keys, uids, srcs, vws, probs, labels = [], [], [], [], [], []
    for s in range(n_studies):
        y = int(rng.random() < 0.5)
        for v in views:
            z = strength * (2 * y - 1) + rng.normal() + (lateral_shift if v == "LATERAL" and y == 0 else 0.0)
            keys.append(f"{source}__{s}_{v}")
            uids.append(f"{source}/{s}")
            srcs.append(source)
            vws.append(v)
            probs.append(float(expit(z)))
            labels.append(y)
    return {"keys": keys, "uids": uids, "sources": srcs, "views": vws, "probs": np.array(probs),
            "labels": np.array(labels, dtype=np.int64)}


def _evaluation(lateral_shift: float, ext_strength: float = 0.3, seed: int = 0) -> tuple[dict, dict]:
    """evaluation.json's content as final.py builds it, and the val predictions."""
    rng = np.random.default_rng(seed)
    iu_views = ("FRONTAL", "LATERAL")
    preds = {"val": _preds(rng, 60, "iu", iu_views, 1.2, lateral_shift),
             "test": _preds(rng, 60, "iu", iu_views, 1.2, lateral_shift),
             "external": _preds(rng, 50, "kermany", ("",), ext_strength)}
    evaluation = {name: report(p) for name, p in preds.items()}
    threshold = balanced_threshold(preds["val"]["probs"], preds["val"]["labels"])
    for name in ("test", "external"):
        evaluation[f"{name}_at_val_threshold"] = report(preds[name], threshold)
    return evaluation, preds["val"]


def test_card_has_sources_metrics_threshold_and_use(setup):
    cfg, index = setup
    evaluation, val = _evaluation(lateral_shift=0.0)
    t = fit_temperature(val["probs"] ** 3, val["labels"])  # any real temperature, != 1
    calibration = calibration_report(val["probs"] ** 3, val["labels"], t)
    path = write_model_card(cfg, index, evaluation, cfg.train.run_dir, calibration=calibration,
                            ood={"quantile": 0.99, "threshold": 12.345})
    assert path == Path(cfg.train.run_dir) / "MODEL_CARD.md"
    assert [p.name for p in path.parent.iterdir()] == ["MODEL_CARD.md"]  # written atomically, nothing left over
    card = path.read_text()

    # Sources: format, folder name, role, licence ("not stated" when the config gives none), labels.
    assert re.search(r"\| iu \| iu \| iu_small \| trained on [^|]*\| " + re.escape(IU_LICENCE) + r" \|", card)
    assert re.search(r"\| kermany \| folder \| kermany_ped \| external [^|]*\| not stated \|", card)
    assert "Problems field is exactly 'normal'" in card
    assert "class folder name: normal = NORMAL; abnormal = PNEUMONIA" in card
    # Splits: from the index, per split and source (checked against the file prepare wrote).
    raw = json.loads((Path(index.root) / "index.json").read_text())
    for split, info in raw["splits"].items():
        for source, c in info["sources"].items():
            assert (f"| {split} | {source} | {c['total']} | {c['labels']['normal']} | {c['labels']['abnormal']} "
                    f"| {c['patients']} |") in card
    assert f"seed {cfg.data.seed}" in card and "By patient" in card
    # Per-split and per-source AUROC with their 95% intervals.
    for split in ("val", "test", "external"):
        for group, m in [("", evaluation[split]["image_level"]), *evaluation[split]["by_source"].items()]:
            lo, hi = m["auroc_ci95"]
            assert f"{m['auroc']:.3f} [{lo:.3f}, {hi:.3f}]" in card
    lo, hi = evaluation["test"]["by_view"]["LATERAL"]["auroc_ci95"]
    assert f"| LATERAL | {evaluation['test']['by_view']['LATERAL']['n']} |" in card and f"[{lo:.3f}, {hi:.3f}]" in card
    # The threshold, how it was picked, and the same cut on calibrated probabilities.
    thr = evaluation["test_at_val_threshold"]["threshold"]
    assert f"{thr:.4f} on P(abnormal), picked on the validation split" in card
    assert f"the same cut is {float(apply_temperature(thr, t)):.4f}" in card
    # Calibration, OOD, intended use.
    assert f"T = {t:.3f}" in card and f"| {calibration['ece_before']:.3f} -> {calibration['ece_after']:.3f} |" in card
    assert "exceeds 12.35, the 0.99 quantile" in card
    assert "not for clinical use" in card.lower() and NOT_FOR_CLINICAL_USE in card
    # Fixed limitations that fit these sources; no view-shortcut line without a shortcut.
    assert "report-derived labels" in card and "one institution" in card
    assert evaluation["test"]["normal_prob_spread_across_views"] < 0.1
    assert "partly reads the view" not in card


def test_view_shortcut_and_weak_external_source_become_limitations(setup):
    cfg, index = setup
    evaluation, _ = _evaluation(lateral_shift=2.0, ext_strength=0.2)
    spread = evaluation["test"]["normal_prob_spread_across_views"]
    assert spread > 0.1
    lines = limitations(cfg, evaluation)
    view_line = next(line for line in lines if line.startswith("On test, normal films of different views"))
    assert f"{spread:.2f} apart" in view_line and "LATERAL" in view_line and "FRONTAL" in view_line
    ext = evaluation["external"]["image_level"]
    assert ext["auroc"] < 0.7
    assert any(line.startswith("Weak across sources") and f"{ext['auroc']:.3f}" in line and "kermany" in line
               for line in lines)
    # Against the first test: the same config, a model without the shortcut and a strong external score.
    good, _ = _evaluation(lateral_shift=0.0, ext_strength=1.5)
    assert not any("views get" in line or "Weak across" in line for line in limitations(cfg, good))


def test_card_survives_missing_parts(setup, tmp_path):
    """Only a val report with one class (no threshold), no index, an older evaluation.json
    without breakdowns or intervals, no calibration or OOD: a card all the same."""
    cfg, _ = setup
    rng = np.random.default_rng(5)
    val = _preds(rng, 10, "iu", ("FRONTAL",), 1.0)
    val["labels"][:] = 1
    evaluation = {"val": report(val)}
    card = write_model_card(cfg, None, evaluation, tmp_path).read_text()
    assert "no threshold was picked" in card and "No test split" in card and "Not calibrated" in card
    assert "None computed" in card and "counts unknown" in card and "| val | 10 | 10 | n/a |" in card

    old, _ = _evaluation(lateral_shift=0.0)
    for rep in old.values():
        for key in ("by_view", "by_source", "normal_prob_spread_across_views", "study_level"):
            rep.pop(key, None)
        rep["image_level"].pop("auroc_ci95")
    old.pop("external_at_val_threshold")
    legacy_index = ShardIndex.from_json({"format": "cxr-dist-shards", "splits": {"train": {  # version 1
        "total": 30, "labels": {"normal": 10, "abnormal": 20}, "shards": []}}}, tmp_path)
    card = model_card(replace(cfg, data=DataConfig(data_dir="/data/iu_xray_small")), legacy_index, old,
                      temperature=1.7)
    assert f"{old['test']['image_level']['auroc']:.3f} |" in card
    assert "| train | iu | 30 | 10 | 20 |" in card and "| iu | iu | iu_xray_small |" in card
    assert "T = 1.700" in card and "ECE" not in card


def test_card_is_the_same_from_evaluation_json(setup):
    """final.py writes evaluation.json (NaN AUROCs included) and may build the card from the file."""
    cfg, index = setup
    evaluation, _ = _evaluation(lateral_shift=2.0)
    evaluation["external"]["by_view"]["unknown"]["mean_prob_normal"] = float("nan")
    again = json.loads(json_bytes(evaluation))
    assert model_card(cfg, index, evaluation) == model_card(cfg, index, again)


def test_a_leaking_text_model_says_so_before_any_number(setup):
    """A model that reads the fields its label was derived from: the banner comes before the
    first table of the card (and again among the limitations)."""
    from cxr_dist.config import LoaderConfig, ModelConfig

    cfg, index = setup
    evaluation, _ = _evaluation(lateral_shift=0.0)
    leak = replace(cfg, model=ModelConfig(kind="image+text"),
                   loader=LoaderConfig(text_fields=("findings", "impression"), allow_label_leakage=True))
    card = model_card(leak, index, evaluation)
    banner = card.index("**LABEL LEAKAGE: this model reads findings, impression")
    assert banner < card.index("## Model") < card.index("| split |")
    assert "LABEL LEAKAGE" not in model_card(replace(leak, loader=LoaderConfig()), index, evaluation)


def test_a_text_model_says_what_it_reads_and_how_it_fuses(setup):
    from cxr_dist.config import ModelConfig

    cfg, index = setup
    evaluation, _ = _evaluation(lateral_shift=0.0)
    assert "- Text:" not in model_card(cfg, index, evaluation)  # an image model reads none
    early = model_card(replace(cfg, model=ModelConfig(kind="image+text")), index, evaluation)
    assert "- Text: indication, comparison, read by `all-MiniLM-L6-v2 (default)`; its embedding goes into the " \
           "head beside the image feature." in early
    assert "learned no-text input (modality dropout 0.2)" in early
    late = model_card(replace(cfg, model=ModelConfig(kind="image+text", fusion="late")), index, evaluation)
    assert "logits are added to the image head's (late fusion)." in late
    assert "films without text are ranked by the image head alone" in late and "modality dropout 0.2" not in late


def test_a_findings_model_has_its_table(setup):
    from cxr_dist.eval.per_finding import findings_report

    cfg, index = setup
    evaluation, _ = _evaluation(lateral_shift=0.0)
    rng = np.random.default_rng(3)
    n = 120
    targets = rng.integers(0, 2, (n, 2)).astype(float)
    mask = np.ones((n, 2), bool)
    mask[:, 1] = False  # a finding no source annotates
    probs = np.clip(targets * 0.6 + rng.random((n, 2)) * 0.4, 0, 1)
    evaluation["test"]["findings"] = findings_report(probs, targets, mask, ["effusion", "edema"], [str(i) for i in range(n)],
                                                     ["iu"] * n, ["PA"] * n)
    card = model_card(cfg, index, evaluation)
    assert "## Findings" in card and "| effusion | " in card and "| edema | not annotated |" in card
    assert "macro mean" in card and "## Findings" not in model_card(cfg, index, _evaluation(lateral_shift=0.0)[0])

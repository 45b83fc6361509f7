"""Is one run better than another on the same test images? The paired bootstrap of the AUROC gain.

    cxr-dist compare --paired BASELINE OTHER [OTHER...]      (run dirs or predictions CSVs)
    cxr-dist compare --paired A B --source iu                (one source's images)
    cxr-dist compare --paired A B --source kermany --split external --other-split test --common

For each OTHER: its test AUROC minus the baseline's, per image and per study, with a 95% interval
from 2,000 draws of whole studies, both runs scored on every draw (metrics.auroc_interval with
`baseline`). Two runs' separate intervals overlap even when one is better on nearly every draw; the
paired interval is the one that answers. An interval above 0 says the gain is not the luck of which
studies landed in the test split; it says nothing about the luck of training (compare seeds or folds).

Each row also says what the run's model reads (its config.toml: model.kind, loader.text_fields) and
marks a run that reads a field its label was derived from (loader.allow_label_leakage) as LEAK: its
gain measures the leak, not the model.
"""
from __future__ import annotations

import json
import tomllib
from pathlib import Path

import numpy as np

from ..config import upgrade
from ..errors import UserError
from ..eval.evaluate import read_predictions
from ..eval.metrics import auroc_interval, compute_metrics, study_level


def levels(preds: dict) -> dict[str, tuple[np.ndarray, np.ndarray, list[str]]]:
    """{'image': (probs, labels, groups), 'study': ...}: what the two levels score."""
    uids, probs, labels = study_level(preds["uids"], preds["probs"], preds["labels"])
    return {"image": (preds["probs"], preds["labels"], preds["uids"]), "study": (probs, labels, uids)}


def gain(base: tuple, other: tuple) -> dict:
    """AUROC(other) - AUROC(base) and its paired 95% interval, from one level of `levels()` of each."""
    (bp, labels, groups), op = base, other[0]
    diff = compute_metrics(op, labels)["auroc"] - compute_metrics(bp, labels)["auroc"]
    low, high = auroc_interval(op, labels, groups, baseline=bp)
    return {"gain": float(diff), "ci95": [float(low), float(high)]}


def select(preds: dict, source: str | None = None, keys: set[str] | None = None) -> dict:
    """The predictions of one source and/or of the given keys (order kept: sorted by key)."""
    keep = [i for i, (k, s) in enumerate(zip(preds["keys"], preds["sources"]))
            if (source is None or s == source) and (keys is None or k in keys)]
    return {"keys": [preds["keys"][i] for i in keep], "uids": [preds["uids"][i] for i in keep],
            "sources": [preds["sources"][i] for i in keep], "views": [preds["views"][i] for i in keep],
            "probs": preds["probs"][keep], "labels": preds["labels"][keep]}


def split_of(path: str, split: str, source: str | None) -> dict:
    preds = read_predictions(path).get(split)
    if preds is None:
        raise UserError(f"{path} has no {split} predictions")
    preds = select(preds, source)
    if not preds["keys"]:
        raise UserError(f"{path} has no {split} predictions of source {source!r}")
    return preds


def reads(path: str) -> str:
    """What a run's model reads, from its config.toml: "image", "image+text (indication,comparison)",
    with " LEAK" when it reads a field its label was derived from; "" when unknown (a CSV). For the
    predictions of an ensemble (bench/ensemble.py --write: its ensemble.json names the members),
    what each member reads, and LEAK when one of them does."""
    fused = Path(path) / "ensemble.json"
    if fused.is_file():
        try:
            members = json.loads(fused.read_text())["members"]
        except (OSError, ValueError, KeyError, TypeError):
            return ""
        parts = [reads(m) or "?" for m in members]
        leak = " LEAK" if any(r.endswith(" LEAK") for r in parts) else ""
        return "ensemble of " + " + ".join(r.removesuffix(" LEAK") for r in parts) + leak
    cfg_path = Path(path) / "config.toml"
    if not cfg_path.is_file():
        return ""
    cfg = upgrade(tomllib.loads(cfg_path.read_text()), warn=False)  # a run of any config layout
    kind = cfg.get("model", {}).get("kind", "image")
    data = cfg.get("loader", {})
    text = f" ({','.join(data.get('text_fields', []))})" if kind != "image" else ""
    if kind == "image+text" and cfg.get("model", {}).get("fusion") == "late":
        text = " late fusion" + text
    sup = " + report supervision" if cfg.get("model", {}).get("report_supervision", 0) > 0 else ""
    leak = " LEAK" if kind != "image" and data.get("allow_label_leakage") else ""
    return f"{kind}{text}{sup}{leak}"


def paired(baseline: str, others: list[str], split: str = "test", other_split: str | None = None,
           source: str | None = None, common: bool = False) -> list[dict]:
    """One row per other run: n images, its AUROC, the image- and study-level gains over `baseline`."""
    base_all = split_of(baseline, split, source)
    rows = []
    for path in others:
        other = split_of(path, other_split or split, source)
        base = base_all
        if common:
            shared = set(base["keys"]) & set(other["keys"])
            base, other = select(base, keys=shared), select(other, keys=shared)
        if other["keys"] != base["keys"] or not np.array_equal(other["labels"], base["labels"]):
            raise UserError(f"{path} does not cover the baseline's images with the same labels "
                            "(--common scores the images both have)")
        gains = [gain(b, o) for b, o in zip(levels(base).values(), levels(other).values())]
        rows.append({"run": path, "reads": reads(path), "n": len(base["keys"]),
                     "auroc": float(compute_metrics(other["probs"], other["labels"])["auroc"]),
                     "image": gains[0], "study": gains[1]})
    return rows


def table(baseline: str, rows: list[dict]) -> str:
    def fmt(g: dict) -> str:
        return f"{g['gain']:+.4f} ({g['ci95'][0]:+.4f} to {g['ci95'][1]:+.4f})"

    out = [(f"| against {baseline} ({reads(baseline) or '?'}) | reads | n images | AUROC, image | "
            "gain, image (95% CI) | gain, study (95% CI) |"), "|---|---|---|---|---|---|"]
    out += [f"| {r['run']} | {r['reads']} | {r['n']} | {r['auroc']:.4f} | {fmt(r['image'])} | {fmt(r['study'])} |"
            for r in rows]
    return "\n".join(out)

"""Metrics per finding (issue 22): a multi-label model's AUROC for each finding of the shards'
vocabulary, over the images that annotate it (a masked target is neither positive nor negative:
a source that does not label a finding does not count for it), with its interval and n, per
source and per view; and their macro mean.

    finding_table(probs, targets, mask, names, groups)   {name: {auroc, auroc_ci95, n, n_pos}}
    findings_breakdown(...)                               flat numbers for a validation epoch
    findings_report(...)                                  the nested table of evaluation.json

`findings_macro_auroc` is the mean AUROC over the findings with at least MIN_POSITIVES positive
and as many negative images in the split: a finding seen 3 times has an AUROC that moves by 0.2
with one image, and averaging it in would let it decide which checkpoint is "best". With several
sources it is the mean over (finding, source) cells, each AUROC computed within one source: a
finding's AUROC pooled over collections mostly measures which collection a film comes from
(Kermany's pneumonia films against IU's: 0.99), not the finding.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from .metrics import auroc_interval, compute_metrics, view_name

MIN_POSITIVES = 10  # positives (and negatives) a finding needs in a split to enter the macro mean


def _check(probs: np.ndarray, targets: np.ndarray, mask: np.ndarray, names: Sequence[str]) -> None:
    if not (probs.shape == targets.shape == mask.shape) or probs.ndim != 2 or probs.shape[1] != len(names):
        raise ValueError(f"findings: probs {probs.shape}, targets {targets.shape} and mask {mask.shape} must all be "
                         f"N x {len(names)} (one column per finding)")


def finding_table(probs: np.ndarray, targets: np.ndarray, mask: np.ndarray, names: Sequence[str],
                  groups: Sequence[str] | None = None, interval: bool = False) -> dict[str, dict]:
    """{finding: {auroc, n, n_pos[, auroc_ci95]}} over the images that annotate each finding;
    AUROC NaN where the annotated images hold one class only. `groups` (study uids) makes the
    interval a cluster bootstrap, as everywhere else (metrics.auroc_interval)."""
    probs, targets, mask = np.asarray(probs, float), np.asarray(targets, float), np.asarray(mask, bool)
    _check(probs, targets, mask, names)
    out = {}
    for j, name in enumerate(names):
        rows = mask[:, j]
        p, y = probs[rows, j], targets[rows, j].astype(np.int64)
        entry = {"n": int(rows.sum()), "n_pos": int(y.sum()),
                 "auroc": compute_metrics(p, y)["auroc"] if rows.any() else math.nan}
        if interval:
            g = [groups[i] for i in np.flatnonzero(rows)] if groups is not None else None
            entry["auroc_ci95"] = auroc_interval(p, y, g) if rows.any() else [math.nan, math.nan]
        out[name] = entry
    return out


def macro_auroc(table: dict[str, dict], min_positives: int = MIN_POSITIVES) -> tuple[float, list[str]]:
    """(mean AUROC, the findings averaged): those with >= min_positives positives and negatives."""
    used = [name for name, m in table.items()
            if m["n_pos"] >= min_positives and m["n"] - m["n_pos"] >= min_positives and not math.isnan(m["auroc"])]
    return (float(np.mean([table[n]["auroc"] for n in used])) if used else math.nan), used


def source_macro_auroc(probs: np.ndarray, targets: np.ndarray, mask: np.ndarray, names: Sequence[str],
                       sources: Sequence[str] | None = None,
                       min_positives: int = MIN_POSITIVES) -> tuple[float, list[str]]:
    """The macro mean of the module docstring: over findings for one source (or none given),
    over (finding, source) cells scored within their source for several; and what it averages
    ("effusion", or "effusion (iu)" with several sources)."""
    probs, targets, mask = np.asarray(probs, float), np.asarray(targets, float), np.asarray(mask, bool)
    groups = sorted(set(sources)) if sources is not None else []
    if len(groups) <= 1:
        return macro_auroc(finding_table(probs, targets, mask, names), min_positives)
    by_source = {}
    for group in groups:
        rows = np.array([s == group for s in sources])
        by_source[group] = finding_table(probs[rows], targets[rows], mask[rows], names)
    return macro_over_sources(by_source, min_positives)


def macro_over_sources(by_source: dict[str, dict[str, dict]], min_positives: int = MIN_POSITIVES) -> tuple[float, list[str]]:
    """macro_auroc over the (finding, source) cells of per-source finding tables ({source: table})."""
    cells = {f"{name} ({group})": m for group, table in by_source.items() for name, m in table.items()}
    return macro_auroc(cells, min_positives)


def findings_breakdown(probs: np.ndarray, targets: np.ndarray, mask: np.ndarray, names: Sequence[str],
                       sources: Sequence[str] | None = None) -> dict[str, float]:
    """Flat numbers for a validation epoch (history.json, MLflow): ``finding/NAME/auroc`` (over
    all sources), ``finding/NAME/n_pos`` and ``findings_macro_auroc`` (within each source: a
    metric that can pick the best checkpoint)."""
    table = finding_table(probs, targets, mask, names)
    out: dict[str, float] = {}
    for name, m in table.items():
        out[f"finding/{name}/auroc"] = m["auroc"]
        out[f"finding/{name}/n_pos"] = float(m["n_pos"])
    out["findings_macro_auroc"] = source_macro_auroc(probs, targets, mask, names, sources)[0]
    return out


def findings_report(probs: np.ndarray, targets: np.ndarray, mask: np.ndarray, names: Sequence[str],
                    uids: Sequence[str], sources: Sequence[str], views: Sequence[str]) -> dict:
    """evaluation.json's `findings`: per finding its AUROC with interval and n, and the same per
    source and per view; the macro mean and which findings it averages."""
    probs, targets, mask = np.asarray(probs, float), np.asarray(targets, float), np.asarray(mask, bool)
    table = finding_table(probs, targets, mask, names, uids, interval=True)
    by_source = {}  # {source: its finding table}: also what the macro mean averages
    for kind, labels in (("by_source", list(sources)), ("by_view", [view_name(v) for v in views])):
        for group in sorted(set(labels)):
            rows = np.array([g == group for g in labels])
            sub = finding_table(probs[rows], targets[rows], mask[rows], names,
                                [u for u, r in zip(uids, rows) if r], interval=True)
            if kind == "by_source":
                by_source[group] = sub
            for name, m in sub.items():
                if m["n"]:
                    table[name].setdefault(kind, {})[group] = m
    macro, used = macro_over_sources(by_source) if len(by_source) > 1 else macro_auroc(table)
    return {"by_finding": table, "macro_auroc": macro, "macro_over": used, "min_positives": MIN_POSITIVES}

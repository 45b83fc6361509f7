"""Classification metrics from gathered (key, prob, label) triples, computed once on the main process.

Conventions used everywhere in cxr-dist:

* ``probs`` is the predicted probability of **abnormal** (class 1), one float per sample;
* ``labels`` is 0 (normal) or 1 (abnormal); abnormal is the positive class, so ``recall`` is the
  sensitivity to abnormal studies and ``specificity`` the recall of normal ones;
* a prediction is abnormal when ``prob >= threshold``.

Distributed evaluation may pad the last batches or let several ranks see the same sample, so the
training loop gathers ``(key, prob, label)`` from every rank and calls :func:`dedupe` before
:func:`compute_metrics`; metrics therefore never depend on the world size or on rank order.

Pure numpy/scikit-learn; nothing here needs torch or a GPU.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

ArrayLike = Sequence[float] | np.ndarray

# Metrics worth one number per epoch in a log line or MLflow (confusion is a matrix, not a scalar).
SCALAR_KEYS = (
    "loss", "accuracy", "precision", "recall", "specificity", "f1",
    "balanced_accuracy", "auroc", "auprc", "n", "n_pos",
)


def check_predictions(probs: ArrayLike, labels: ArrayLike, error: type[Exception] = ValueError,
                      probabilities: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(probs as float64, labels as int64), flat, or `error` when they cannot be scored together:
    different lengths, a label that is not 0/1, a NaN or infinity; with `probabilities`, also a
    value outside [0, 1] (a temperature is fitted on probabilities; AUROC takes any score).
    The one check of predictions: metrics here, calibration (calibrate.py)."""
    p = np.asarray(probs, dtype=np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1)
    if p.shape != y.shape:
        raise error(f"probs and labels differ in length: {p.shape[0]} vs {y.shape[0]}")
    if y.size and not np.isin(y, (0, 1)).all():
        raise error(f"labels must be 0 (normal) or 1 (abnormal), got values {sorted(set(y.tolist()))[:5]}")
    if not np.isfinite(p).all():
        raise error("probs contain NaN or infinity (did the loss diverge?)")
    if probabilities and ((p < 0).any() or (p > 1).any()):
        raise error("probs must be probabilities in [0, 1]")
    return p, y.astype(np.int64)



def dedupe(
    keys: Sequence[str], probs: ArrayLike, labels: ArrayLike
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Drop repeated keys (keeping the first occurrence) and sort by key.

    Repeats come from distributed evaluation (padding, or a sample seen by two ranks); their
    probabilities may differ in the last bits between ranks, so the first one is kept rather than
    compared. Two copies of a key with *different labels* mean the data is inconsistent, which is
    an error, not something to average away. Sorting makes the result independent of rank order.
    """
    p, y = check_predictions(probs, labels)
    keys = [str(k) for k in keys]
    if len(keys) != p.shape[0]:
        raise ValueError(f"keys and probs differ in length: {len(keys)} vs {p.shape[0]}")
    first: dict[str, int] = {}
    for i, k in enumerate(keys):
        j = first.setdefault(k, i)
        if j != i and y[j] != y[i]:
            raise ValueError(f"key {k!r} appears twice with different labels ({y[j]} and {y[i]})")
    order = sorted(first)  # sorted unique keys
    idx = np.fromiter((first[k] for k in order), dtype=np.int64, count=len(order))
    return order, p[idx], y[idx]


def _div(num: float, den: float) -> float:
    """num/den, with 0 for an empty denominator (e.g. precision when nothing is predicted abnormal)."""
    return float(num) / float(den) if den else 0.0


def compute_metrics(
    probs: ArrayLike, labels: ArrayLike, threshold: float = 0.5, loss: float | None = None
) -> dict[str, Any]:
    """Metrics of abnormal-vs-normal predictions; abnormal (label 1) is the positive class.

    Returns floats ``loss`` (only if given), ``accuracy``, ``precision``, ``recall`` (sensitivity),
    ``specificity``, ``f1``, ``balanced_accuracy``, ``auroc``, ``auprc`` (average precision), ints
    ``n`` and ``n_pos``, and ``confusion`` = ``[[tn, fp], [fn, tp]]``.

    Degenerate inputs do not raise: with one class only, ``auroc`` is NaN (undefined) and ``auprc``
    is NaN when there are no positives; ratios with an empty denominator are 0. Balanced accuracy
    averages the recall of the classes present, as scikit-learn does. Empty input raises ValueError.
    """
    p, y = check_predictions(probs, labels)
    n = int(y.size)
    if n == 0:
        raise ValueError("compute_metrics needs at least one sample")
    pred = (p >= threshold).astype(np.int64)
    tp = int(((pred == 1) & (y == 1)).sum())
    tn = int(((pred == 0) & (y == 0)).sum())
    fp = int(((pred == 1) & (y == 0)).sum())
    fn = int(((pred == 0) & (y == 1)).sum())
    n_pos, n_neg = tp + fn, tn + fp
    precision = _div(tp, tp + fp)
    recall = _div(tp, n_pos)
    specificity = _div(tn, n_neg)
    present = [r for r, count in ((recall, n_pos), (specificity, n_neg)) if count]
    out: dict[str, Any] = {}
    if loss is not None:
        out["loss"] = float(loss)
    out.update(
        accuracy=_div(tp + tn, n),
        precision=precision,
        recall=recall,
        specificity=specificity,
        f1=_div(2 * precision * recall, precision + recall),
        balanced_accuracy=float(np.mean(present)),
        auroc=float(roc_auc_score(y, p)) if n_pos and n_neg else math.nan,
        auprc=float(average_precision_score(y, p)) if n_pos else math.nan,
        n=n,
        n_pos=n_pos,
        confusion=[[tn, fp], [fn, tp]],
    )
    return out


def metric_mode(name: str, mode: str = "") -> str:
    """"max" or "min" for a validation metric: `mode` when given, else "min" for loss-like names."""
    return mode or ("min" if name.endswith("loss") else "max")


def balanced_threshold(probs: ArrayLike, labels: ArrayLike) -> float:
    """The decision threshold that maximises balanced accuracy (Youden's J) on these predictions.

    Meant for the validation split: the class-weighted loss puts the balanced point near 0.5 on
    the training data, but a model that overfits drifts away from it, and accuracy and F1 at 0.5
    then swing from seed to seed while AUROC does not (docs/results.md). Only the predicted
    probabilities are candidates (an observed score, so ``prob >= threshold`` is well defined),
    which means the result is at least as good on these predictions as 0.5. Ties go to the
    candidate closest to 0.5. Needs both classes.
    """
    p, y = check_predictions(probs, labels)
    if not (y == 1).any() or not (y == 0).any():
        raise ValueError("balanced_threshold needs both classes")
    fpr, tpr, thr = roc_curve(y, p, drop_intermediate=False)  # every observed score a candidate
    ok = np.isfinite(thr)  # scikit-learn's first threshold is +inf (nothing called abnormal)
    j, thr = (tpr - fpr)[ok], thr[ok]
    best = np.flatnonzero(np.isclose(j, j.max()))
    return float(thr[best[np.argmin(np.abs(thr[best] - 0.5))]])


def _weighted_auroc(p: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """AUROC of the same predictions under several sample weightings at once (rows of ``w``).

    The Mann-Whitney form: the weighted share of (abnormal, normal) pairs ranked the right way,
    ties counting one half. One sort for all rows, so a 2,000-draw bootstrap costs milliseconds.
    """
    _, tie = np.unique(p, return_inverse=True)  # rank of each score among the distinct scores
    m = int(tie.max()) + 1
    pos = np.stack([np.bincount(tie, row * (y == 1), minlength=m) for row in w])  # weight per score
    neg = np.stack([np.bincount(tie, row * (y == 0), minlength=m) for row in w])
    below = np.cumsum(neg, axis=1) - neg  # normal weight strictly below each score
    with np.errstate(invalid="ignore", divide="ignore"):
        return (pos * (below + 0.5 * neg)).sum(1) / (pos.sum(1) * neg.sum(1))


def _study_draws(groups: Sequence[str] | None, n: int, draws: int, seed: int) -> np.ndarray:
    """``draws`` x ``n`` sample weights of a cluster bootstrap: how often each sample's group
    (study) was drawn when drawing as many groups as there are, with replacement."""
    names = list(range(n)) if groups is None else [str(g) for g in groups]
    if len(names) != n:
        raise ValueError(f"groups and probs differ in length: {len(names)} vs {n}")
    _, group = np.unique(names, return_inverse=True)
    n_groups = int(group.max()) + 1
    draw = np.random.default_rng(seed).integers(0, n_groups, size=(draws, n_groups))
    return np.stack([np.bincount(d, minlength=n_groups) for d in draw])[:, group].astype(np.float64)


def auroc_interval(
    probs: ArrayLike, labels: ArrayLike, groups: Sequence[str] | None = None,
    level: float = 0.95, draws: int = 2000, seed: int = 0, baseline: ArrayLike | None = None,
) -> list[float]:
    """A bootstrap confidence interval ``[low, high]`` of the AUROC (percentile method).

    How far one test split's AUROC is from the truth: ~1,000 test images give an interval ~0.07
    wide, which is the scale on which "0.80" can be judged. ``groups`` (the study uid of each
    image) makes it a cluster bootstrap: whole studies are drawn with replacement, because the
    frontal and lateral views of a study are not independent samples. ``baseline`` (another
    model's probabilities for the same images) gives instead the interval of the *gain*,
    AUROC(probs) - AUROC(baseline), both scored on each draw: a paired comparison, far tighter
    than two separate intervals. Seeded: the same numbers every time. ``[nan, nan]`` when the
    AUROC itself is undefined (one class only).
    """
    p, y = check_predictions(probs, labels)
    if not ((y == 1).any() and (y == 0).any()):
        return [math.nan, math.nan]
    weight = _study_draws(groups, y.size, draws, seed)
    auc = _weighted_auroc(p, y, weight)
    if baseline is not None:
        auc = auc - _weighted_auroc(check_predictions(baseline, y)[0], y, weight)
    auc = auc[np.isfinite(auc)]  # a draw without one of the classes has no AUROC
    if auc.size == 0:
        return [math.nan, math.nan]
    low, high = np.quantile(auc, [(1 - level) / 2, (1 + level) / 2])
    return [float(low), float(high)]


def study_level(
    uids: Sequence[str], probs: ArrayLike, labels: ArrayLike
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Pool image-level predictions into one per study (uid), sorted by uid.

    The probability of a study is the **mean** over its views. The label belongs to the report,
    i.e. to the study, so all views share it and a disagreement raises ValueError. Why the mean:
    frontal and lateral views are two looks at the same finding, and averaging lets a confident
    view outweigh an uninformative one while staying a probability; ``max`` would make a study
    more likely to be called abnormal just because it has more views (more chances for one
    false positive), which biases specificity by study size.
    """
    p, y = check_predictions(probs, labels)
    uids = [str(u) for u in uids]
    if len(uids) != p.shape[0]:
        raise ValueError(f"uids and probs differ in length: {len(uids)} vs {p.shape[0]}")
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    label_of: dict[str, int] = {}
    for u, pi, yi in zip(uids, p.tolist(), y.tolist()):
        if label_of.setdefault(u, yi) != yi:
            raise ValueError(f"study {u!r} has views with different labels")
        sums[u] = sums.get(u, 0.0) + pi
        counts[u] = counts.get(u, 0) + 1
    order = sorted(sums)
    return (
        order,
        np.array([sums[u] / counts[u] for u in order], dtype=np.float64),
        np.array([label_of[u] for u in order], dtype=np.int64),
    )


def always_abnormal(labels: ArrayLike) -> dict[str, Any]:
    """Metrics of the trivial baseline that calls everything abnormal (probability 1.0, AUROC 0.5).

    Any useful model must beat its accuracy (= prevalence of abnormal) and its AUPRC.
    """
    y = np.asarray(labels).reshape(-1)
    return compute_metrics(np.ones(y.shape[0]), y)


def curves(probs: ArrayLike, labels: ArrayLike) -> dict[str, dict[str, list[float]]]:
    """ROC (fpr, tpr, thresholds) and precision-recall (precision, recall) points as plain lists.

    With a single class present the curves are undefined and come back as empty lists. The first
    ROC threshold, infinite in scikit-learn, is replaced by the next float above the largest score
    (same meaning: nothing is predicted abnormal) so that the lists stay JSON-safe.
    """
    p, y = check_predictions(probs, labels)
    if y.size == 0 or y.min() == y.max():
        return {"roc": {"fpr": [], "tpr": [], "thresholds": []}, "pr": {"precision": [], "recall": []}}
    fpr, tpr, thr = roc_curve(y, p)
    thr = np.where(np.isfinite(thr), thr, np.nextafter(max(1.0, float(p.max())), math.inf))
    prec, rec, _ = precision_recall_curve(y, p)
    return {
        "roc": {"fpr": fpr.tolist(), "tpr": tpr.tolist(), "thresholds": thr.tolist()},
        "pr": {"precision": prec.tolist(), "recall": rec.tolist()},
    }


def view_name(view: str) -> str:
    """A view as it appears in metric names: "PA", "AP", "LATERAL", "FRONTAL", or "unknown"."""
    return view or "unknown"


def group_metrics(
    probs: ArrayLike, labels: ArrayLike, groups: Sequence[str], studies: Sequence[str] | None = None,
    interval: bool = False,
) -> dict[str, dict[str, Any]]:
    """Per group (a source, a view): ``n``, ``n_normal``, ``n_abnormal``, ``auroc`` (NaN with one
    class), optionally its 95% interval (whole ``studies`` drawn), and the mean probability of
    abnormal given to the group's normal and to its abnormal images.

    The means are the shortcut check: if the normal films of one view get a much higher
    probability than those of another, the model reads the view, not the disease.
    """
    p, y = check_predictions(probs, labels)
    g = np.asarray([str(x) for x in groups])
    out: dict[str, dict[str, Any]] = {}
    for name in sorted(set(g.tolist())):
        sel = g == name
        ps, ys = p[sel], y[sel]
        n_pos = int(ys.sum())
        row: dict[str, Any] = {
            "n": int(sel.sum()), "n_normal": int(sel.sum()) - n_pos, "n_abnormal": n_pos,
            "auroc": float(roc_auc_score(ys, ps)) if 0 < n_pos < ys.size else math.nan,
            "mean_prob_normal": float(ps[ys == 0].mean()) if (ys == 0).any() else math.nan,
            "mean_prob_abnormal": float(ps[ys == 1].mean()) if n_pos else math.nan,
        }
        if interval:
            row["auroc_ci95"] = auroc_interval(ps, ys, None if studies is None else np.asarray(studies)[sel])
        out[name] = row
    return out


def breakdown(probs: ArrayLike, labels: ArrayLike, sources: Sequence[str], views: Sequence[str],
              train_sources: Sequence[str]) -> dict[str, float]:
    """Flat per-source and per-view numbers for a validation epoch: ``source/NAME/auroc``,
    ``view/VIEW/auroc``, their ``n``, and ``source_mean_auroc``: the mean AUROC over the training
    sources present (the default rule that picks the best checkpoint: a model must do well on
    every source, not on the largest one). With one source it equals that source's AUROC."""
    out: dict[str, float] = {}
    by_source = group_metrics(probs, labels, sources)
    for kind, table in (("source", by_source), ("view", group_metrics(probs, labels, [view_name(v) for v in views]))):
        for name, m in table.items():
            out[f"{kind}/{name}/auroc"] = m["auroc"]
            out[f"{kind}/{name}/n"] = float(m["n"])
    scored = [m["auroc"] for s, m in by_source.items() if s in train_sources and not math.isnan(m["auroc"])]
    out["source_mean_auroc"] = float(np.mean(scored)) if scored else math.nan
    return out


def scalar_metrics(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The scalar entries of a metrics dict as floats, keys prefixed (e.g. ``val/``), for MLflow;
    an AUROC interval (``auroc_ci95``, from evaluate.report) as ``auroc_ci95_low`` / ``_high``;
    the per-source and per-view numbers of :func:`breakdown` as they are."""
    out = {f"{prefix}{k}": float(metrics[k]) for k in SCALAR_KEYS if k in metrics}
    out.update({f"{prefix}{k}": float(v) for k, v in metrics.items()
                if k in ("source_mean_auroc", "findings_macro_auroc") or k.startswith(("source/", "view/", "finding/"))})
    if "auroc_ci95" in metrics:
        out[f"{prefix}auroc_ci95_low"], out[f"{prefix}auroc_ci95_high"] = map(float, metrics["auroc_ci95"])
    return out


def _fmt(value: Any) -> str:
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def summary_line(
    epoch: int,
    phase_name: str,
    train: dict[str, Any],
    val: dict[str, Any],
    total_epochs: int | None = None,
) -> str:
    """One line per epoch, e.g. ``epoch 3/40 [head] train loss 0.610 acc 0.700 f1 0.750 | val ...``.

    ``epoch`` is printed as given (pass it 1-based); metrics missing from a dict are left out.
    """
    def part(name: str, m: dict[str, Any], keys: tuple[tuple[str, str], ...]) -> str:
        items = [f"{short} {_fmt(m[k])}" for k, short in keys if k in m]
        return f"{name} " + " ".join(items) if items else name

    train_keys = (("loss", "loss"), ("accuracy", "acc"), ("f1", "f1"))
    val_keys = train_keys + (("auroc", "auroc"), ("recall", "sens"), ("specificity", "spec"))
    head = f"epoch {epoch}/{total_epochs}" if total_epochs else f"epoch {epoch}"
    line = f"{head} [{phase_name}] {part('train', train, train_keys)} | {part('val', val, val_keys)}"
    # Per source / per view AUROC, only when there is more than one of either (one = the pooled number).
    for kind in ("source", "view"):
        items = [(k.split("/")[1], v) for k, v in val.items() if k.startswith(f"{kind}/") and k.endswith("/auroc")]
        if len(items) > 1:
            line += f" | {kind} " + " ".join(f"{name} {_fmt(v)}" for name, v in items)
    return line

"""Figures of a run, written as PNG files (matplotlib, Agg backend: no display needed on nodes).

- training_figure: loss, accuracy, F1 and AUROC per epoch, train vs validation, with the phase
  boundaries marked (the figure the original experiment published);
- roc_pr_figure: ROC and precision-recall curves of one evaluation;
- confusion_figure: the 2x2 confusion matrix with counts and row percentages;
- reliability_figure: top-label reliability diagram before and after temperature scaling.

Every figure is written atomically (fileio.write_bytes_atomic).
"""
from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # before pyplot: compute nodes have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..fileio import write_bytes_atomic  # noqa: E402

PANELS = (("loss", "Loss"), ("accuracy", "Accuracy"), ("f1", "F1 score"), ("auroc", "AUROC"))
SPLIT_STYLE = {"train": dict(color="tab:blue", marker="o"), "val": dict(color="tab:orange", marker="s")}


def _save(fig: Any, path: str | Path) -> Path:
    """PNG bytes in memory, then one atomic write: a reader (MLflow's artifact upload, a browser,
    a resumed run) sees the old figure or the new one, never half a PNG."""
    out = Path(path)
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    finally:
        plt.close(fig)  # long runs draw many figures; pyplot would keep them all alive
    write_bytes_atomic(out, buf.getvalue())
    return out


def _series(history: list[dict], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for row in history:
        v = row.get(key)
        if v is not None and np.isfinite(float(v)):
            xs.append(float(row["epoch"]))
            ys.append(float(v))
    return xs, ys


def training_figure(history: list[dict], phase_boundaries: Sequence[float], path: str | Path,
                    phase_names: Sequence[str] | None = None, title: str | None = None) -> Path:
    """2x2 panels (loss, accuracy, F1, AUROC) against epoch, train and val lines.

    `history` rows look like {"epoch": 1, "phase": 0, "train/loss": ..., "val/auroc": ...}; missing
    or non-finite values leave a gap. `phase_boundaries` are the first epochs of phases 2, 3, ...
    (e.g. [16] for 15 head-only epochs then fine-tuning): the dashed line goes half-way between
    epochs 15 and 16. A non-integer boundary (15.5) is drawn exactly where given.
    `phase_names` label the lines (default "phase 2", "phase 3", ...).
    """
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), sharex=True)
    names = list(phase_names) if phase_names else [f"phase {i + 2}" for i in range(len(phase_boundaries))]
    for ax, (metric, label) in zip(axes.flat, PANELS):
        for split, style in SPLIT_STYLE.items():
            xs, ys = _series(history, f"{split}/{metric}")
            if xs:
                ax.plot(xs, ys, label=split, markersize=3, linewidth=1.5, **style)
        for i, b in enumerate(phase_boundaries):
            # The boundary sits between the last epoch of one phase and the first of the next.
            x = b - 0.5 if float(b).is_integer() else float(b)
            ax.axvline(x, color="0.4", linestyle="--", linewidth=1)
            ax.text(x, 0.98, f" {names[i] if i < len(names) else ''}", transform=ax.get_xaxis_transform(),
                    va="top", ha="left", fontsize=8, color="0.3")
        ax.set_title(label)
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        if metric != "loss":
            lo = min([y for s in SPLIT_STYLE for y in _series(history, f"{s}/{metric}")[1]] or [0.0])
            ax.set_ylim(min(0.5, lo) - 0.02 if metric == "auroc" else max(0.0, lo - 0.05), 1.01)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="lower right" if metric != "loss" else "upper right", fontsize=9)
    for ax in axes[1]:
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def roc_pr_figure(probs: Sequence[float], labels: Sequence[int], path: str | Path,
                  title: str | None = None) -> Path:
    """ROC curve (with chance diagonal) and precision-recall curve (with prevalence line), side by side."""
    from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_curve

    p, y = np.asarray(probs, dtype=float), np.asarray(labels, dtype=int)
    fig, (ax_roc, ax_pr) = plt.subplots(1, 2, figsize=(11, 5))
    if len(np.unique(y)) < 2:
        # Curves are undefined with one class; say so instead of raising inside a training run.
        for ax in (ax_roc, ax_pr):
            ax.text(0.5, 0.5, "only one class present", ha="center", va="center", transform=ax.transAxes)
    else:
        fpr, tpr, _ = roc_curve(y, p)
        ax_roc.plot(fpr, tpr, color="tab:blue", linewidth=2, label=f"AUROC = {auc(fpr, tpr):.3f}")
        prec, rec, _ = precision_recall_curve(y, p)
        ax_pr.step(rec, prec, where="post", color="tab:orange", linewidth=2,
                   label=f"AP = {average_precision_score(y, p):.3f}")
        prevalence = float(y.mean())
        ax_pr.axhline(prevalence, color="0.5", linestyle="--", label=f"prevalence = {prevalence:.2f}")
    ax_roc.plot([0, 1], [0, 1], color="0.5", linestyle="--", label="chance")
    ax_roc.set(xlabel="false positive rate (1 - specificity)", ylabel="true positive rate (sensitivity)",
               title="ROC", xlim=(0, 1), ylim=(0, 1.01))
    ax_pr.set(xlabel="recall (sensitivity)", ylabel="precision", title="Precision-recall",
              xlim=(0, 1), ylim=(0, 1.01))
    for ax in (ax_roc, ax_pr):
        ax.grid(True, alpha=0.3)
        ax.set_aspect("equal")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="lower right" if ax is ax_roc else "lower left", fontsize=9)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def confusion_figure(confusion: Sequence[Sequence[int]], path: str | Path,
                     class_names: Sequence[str] = ("normal", "abnormal"), title: str | None = None) -> Path:
    """2x2 confusion matrix [[tn, fp], [fn, tp]]: counts and the share of each true class."""
    cm = np.asarray(confusion, dtype=float)
    rows = cm.sum(axis=1, keepdims=True)
    share = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    fig, ax = plt.subplots(figsize=(5, 4.5))
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, f"{int(cm[i, j])}\n({share[i, j]:.0%})", ha="center", va="center", fontsize=12,
                    color="white" if share[i, j] > 0.6 else "black")
    ticks = range(len(class_names))
    ax.set_xticks(ticks, [f"pred. {c}" for c in class_names])
    ax.set_yticks(ticks, [f"true {c}" for c in class_names])
    ax.set_title(title or f"Confusion matrix (n = {int(cm.sum())})")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of true class")
    fig.tight_layout()
    return _save(fig, path)


def reliability_figure(probs_before: Sequence[float], probs_after: Sequence[float], labels: Sequence[int],
                       path: str | Path, bins: int = 15, title: str | None = None) -> Path:
    """Reliability diagram of the same predictions before and after calibration: accuracy against
    mean confidence per bin (calibrate.reliability_bins, the bins of calibrate.ece, whose values
    are in the legend), the diagonal of perfect calibration, and below it how many predictions
    fall in each bin. Points under the diagonal are over-confident."""
    from .calibrate import ece, reliability_bins

    fig, (ax, ax_n) = plt.subplots(2, 1, figsize=(6, 7), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], color="0.5", linestyle="--", label="perfect calibration")
    width = 1.0 / bins
    for i, (name, probs, color) in enumerate((("before", probs_before, "tab:red"), ("after", probs_after, "tab:blue"))):
        r = reliability_bins(probs, labels, bins)
        used = r["count"] > 0
        ax.plot(r["confidence"][used], r["accuracy"][used], marker="o", color=color, linewidth=1.5,
                label=f"{name}: ECE = {ece(probs, labels, bins):.3f}")
        centres = (r["edges"][:-1] + r["edges"][1:]) / 2
        ax_n.bar(centres + (i - 0.5) * width / 2, r["count"], width=width / 2, color=color, alpha=0.7, label=name)
    ax.set(ylabel="accuracy", title=title or "Reliability (top-label confidence)", ylim=(0, 1.01))
    ax.set_xlim(0.45, 1.005)  # a 2-class model's confidence is never below 0.5
    ax.legend(loc="upper left", fontsize=9)
    ax_n.set(xlabel="confidence (probability of the predicted class)", ylabel="predictions")
    for a in (ax, ax_n):
        a.grid(True, alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)

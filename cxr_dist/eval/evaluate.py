"""Evaluation as a library: distributed inference on a split and the reports of its predictions.

    evaluate_split(model, cfg.loader, split, accelerator, index, ...)   all ranks, gathered: training's val, end of run
    predict_split(model, cfg.loader, split, index, views, ...)    one process (GPU when present): `cxr-dist evaluate`
    report(preds, threshold)                                    image + study level, by view and source, baseline

A split's predictions are a dict: `keys`, `uids`, `sources`, `views`, `labels`, `probs` (the
network's P(abnormal), averaged over test-time views), and `features` when asked (the pooled
features of the plain view, for the OOD score). The product's readout (product/readout.py:
temperature, OOD score) is applied on top of them by its callers; `cxr-dist evaluate` (the command,
which loads checkpoints as products) lives in product/evaluate_cli.py.

Averaging probabilities (`average`): over test-time views (`views` > 1: the plain view plus views - 1
with the training augmentation, seeded per view and image: reproducible, the same on any number of
processes), and over an ensemble of checkpoints. `predictions_csv` / `read_predictions` write and read
the per-image CSV that training writes to `RUN_DIR/predictions.csv`; `bench/ensemble.py` averages
such files without the checkpoints.
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import dist
from ..config import DataConfig, LoaderConfig, SourceConfig, replace
from ..data.index import LEGACY_SOURCE, ShardIndex
from ..data.stream import eval_loader, views_loader
from ..errors import UserError
from ..model.classifier import inference_device, logits_of
from .metrics import (always_abnormal, auroc_interval, breakdown, compute_metrics, dedupe, group_metrics,
                      study_level, view_name)
from .per_finding import findings_breakdown, findings_report


@torch.no_grad()
def infer(model: nn.Module, loader, device: torch.device, loss_fn: nn.Module | None = None,
          with_features: bool = False, vocabulary: tuple[str, ...] = ()) -> dict:
    """This rank's predictions: keys, uids, probability of abnormal, labels, summed loss, and with
    `with_features` the pooled features the MLP head received (for the OOD score, ood.py). A model
    with a findings head adds `finding_probs` and the targets and mask of its findings: from the
    batch (columns in the shards' `vocabulary`) or, for cached batches, its findings_table."""
    was_training = model.training
    model.eval()
    raw = getattr(model, "module", model)  # the model inside a DDP/DeepSpeed wrapper
    names = tuple(getattr(raw, "findings", ()))
    keys, uids, sources, views, probs, labels, feats, loss_sum = [], [], [], [], [], [], [], 0.0
    fprobs, ftargets, fmask = [], [], []
    # The head's input is the pooled feature whatever the path (images or a frozen-compute cache):
    # a pre-hook on its first layer sees both.
    hook = (raw.head[0].register_forward_pre_hook(
        lambda _m, inputs: feats.append(inputs[0].float().cpu())) if with_features else None)
    try:
        for batch in loader:
            y = batch["label"].to(device, non_blocking=True)
            if names:
                logits, flogits = logits_of(model, batch, device, return_findings=True)
                fprobs.append(torch.sigmoid(flogits.float()).cpu())
                t, m = _finding_targets(raw, batch, vocabulary)
                ftargets.append(t)
                fmask.append(m)
            else:
                logits = logits_of(model, batch, device)
            logits = logits.float()
            if loss_fn is not None:
                loss_sum += loss_fn(logits, y, batch["source"], batch["view"]).item() * len(y)
            probs.append(torch.softmax(logits, 1)[:, 1].cpu())
            labels.append(y.cpu())
            keys += list(batch["key"])
            uids += list(batch["uid"])
            sources += list(batch["source"])
            views += list(batch["view"])
    finally:
        if hook is not None:
            hook.remove()
    model.train(was_training)
    cat = lambda xs: torch.cat(xs).numpy() if xs else np.zeros(0)  # noqa: E731
    out = {"keys": keys, "uids": uids, "sources": sources, "views": views, "probs": cat(probs),
           "labels": cat(labels).astype(np.int64), "loss_sum": loss_sum}
    if names:
        out["finding_names"] = names
        for name, parts in (("finding_probs", fprobs), ("finding_targets", ftargets), ("finding_mask", fmask)):
            out[name] = torch.cat(parts).numpy() if parts else np.zeros((0, len(names)))
    if with_features:
        out["features"] = torch.cat(feats).numpy() if feats else np.zeros((0, 0), np.float32)
    return out


def _finding_targets(model, batch: dict, vocabulary: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """The targets and mask of `model.findings` for a batch: the batch's own columns (in the shards'
    vocabulary; a finding those shards lack is masked), else the model's findings_table by key,
    else all masked (shards without findings: the probabilities are still reported)."""
    from ..model.findings_head import align

    n = len(batch["key"])
    if "findings" in batch:
        return align(batch["findings"], batch["findings_mask"], vocabulary, model.findings)
    if getattr(model, "findings_table", None) is not None:
        return model.findings_table.lookup(list(batch["key"]))
    return torch.zeros(n, len(model.findings)), torch.zeros(n, len(model.findings), dtype=torch.bool)


FINDING_ARRAYS = ("finding_probs", "finding_targets", "finding_mask")


def merge(parts: list[dict]) -> dict:
    """Predictions of all ranks -> one set, duplicates (same key) removed, sorted by key."""
    keys = [k for p in parts for k in p["keys"]]
    meta = {k: m for p in parts for k, m in zip(p["keys"], zip(p["uids"], p["sources"], p["views"]))}
    probs = np.concatenate([p["probs"] for p in parts])
    labels = np.concatenate([p["labels"] for p in parts])
    keys, probs, labels = dedupe(keys, probs, labels)
    uids, sources, views = (list(col) for col in zip(*(meta[k] for k in keys))) if keys else ([], [], [])
    out = {"keys": keys, "uids": uids, "sources": sources, "views": views, "probs": probs, "labels": labels,
           "loss_sum": sum(p["loss_sum"] for p in parts), "n_seen": sum(len(p["keys"]) for p in parts)}
    if parts and "features" in parts[0]:  # each key's row, in the deduplicated key order
        row = {k: f for p in parts for k, f in zip(p["keys"], p["features"])}
        out["features"] = np.stack([row[k] for k in keys]) if keys else np.zeros((0, 0), np.float32)
    if parts and "finding_probs" in parts[0]:
        out["finding_names"] = parts[0]["finding_names"]
        for name in FINDING_ARRAYS:
            row = {k: r for p in parts for k, r in zip(p["keys"], p[name])}
            out[name] = (np.stack([row[k] for k in keys]) if keys
                         else np.zeros((0, len(out["finding_names"])), parts[0][name].dtype))
    return out


def same_images(sets: list[dict]) -> None:
    """UserError unless the prediction sets cover the same images (in order) with the same labels."""
    first = sets[0]
    for other in sets[1:]:
        if other["keys"] != first["keys"] or not np.array_equal(other["labels"], first["labels"]):
            raise UserError("the prediction sets to combine do not cover the same images with the same labels")


def average(sets: list[dict]) -> dict:
    """Mean probability per image over prediction sets of the same images (an ensemble, or views)."""
    same_images(sets)
    first = sets[0]
    out = {**first, "probs": np.mean([p["probs"] for p in sets], axis=0)}
    if all("finding_probs" in p for p in sets):
        out["finding_probs"] = np.mean([p["finding_probs"] for p in sets], axis=0)
    return out


def view_loaders(loader: LoaderConfig, split: str, rank: int, world: int, index: ShardIndex, views: int = 1,
                 device: torch.device | None = None):
    """Loaders that each show this rank's share of `split` once: the plain view, then views - 1
    views with the training augmentation (test-time augmentation). Each view of an image is seeded
    by (view, image key): the same on every call, whatever the number of processes and workers.
    The plain view is decoded on `device` when `loader.decode_on` says so (device_input.py: on a
    GPU by default; bit-identical to the workers' decode on the CPU)."""
    from ..data.device_input import DeviceInput, decode_where

    on_device = device is not None and decode_where(loader, device) == "device"
    plain = eval_loader(loader, split, rank, world, index, on_device=on_device)
    yield map(DeviceInput(loader, device, augment=False), plain) if on_device else plain
    if views > 1:
        augmented = views_loader(replace(loader, augment=True), [split], rank, world, 0, index, keyed=True)
        for view in range(views - 1):
            augmented.set_epoch(view)
            yield augmented


def predict_split(model: nn.Module, loader: LoaderConfig, split: str, index: ShardIndex, views: int = 1,
                  device: torch.device | None = None, with_features: bool = False) -> dict:
    """One process's predictions on a whole split, averaged over `views` views, on `device`
    (default: model.inference_device(), the GPU when there is one). Moves `model` there."""
    device = device or inference_device()
    model.to(device)
    return average([merge([infer(model, batches, device, with_features=with_features and v == 0,
                                 vocabulary=index.findings)])
                    for v, batches in enumerate(view_loaders(loader, split, 0, 1, index, views, device))])


PREDICTION_COLUMNS = ("split", "key", "uid", "label", "prob_abnormal")
EXTRA_COLUMNS = ("source", "view")  # written since sources exist; older files lack them
# Written when the predictions have them: the probability before calibration (prob_abnormal is
# then the calibrated one) and the out-of-distribution score (ood.py).
OPTIONAL_COLUMNS = ("prob_uncalibrated", "ood_score")


def predictions_csv(by_split: dict[str, dict]) -> str:
    """Per-image predictions of several splits as CSV text (PREDICTION_COLUMNS)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    optional = [c for c in OPTIONAL_COLUMNS if all(c in p for p in by_split.values())]
    w.writerow(PREDICTION_COLUMNS + EXTRA_COLUMNS + tuple(optional))
    for split, p in by_split.items():
        n = len(p["keys"])
        columns = [p["keys"], p["uids"], p["labels"].tolist(), [f"{v:.6f}" for v in p["probs"].tolist()],
                   p.get("sources", [LEGACY_SOURCE] * n), p.get("views", [""] * n),
                   *([f"{v:.6f}" for v in p[c].tolist()] for c in optional)]
        w.writerows([split, *row] for row in zip(*columns))
    return buf.getvalue()


def read_predictions(path: str | Path) -> dict[str, dict]:
    """A predictions CSV (as written by training or `--predictions`), or a run dir (its
    predictions.csv) -> {split: predictions}."""
    path = Path(path) / "predictions.csv" if Path(path).is_dir() else Path(path)
    if not path.is_file():
        raise UserError(f"{path} not found (runs write it at the end of training)")
    try:
        rows = list(csv.DictReader(path.read_text().splitlines()))
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read predictions {path}: {e}") from e
    if not rows or set(PREDICTION_COLUMNS) - set(rows[0]):
        raise UserError(f"{path} is not a predictions CSV (columns {', '.join(PREDICTION_COLUMNS)})")
    out: dict[str, dict] = {}
    for split in dict.fromkeys(r["split"] for r in rows):
        part = sorted((r for r in rows if r["split"] == split), key=lambda r: r["key"])
        try:
            labels = np.array([int(r["label"]) for r in part], dtype=np.int64)
            probs = np.array([float(r["prob_abnormal"]) for r in part])
        except (TypeError, ValueError) as e:
            raise UserError(f"{path}: a label or probability is not a number ({e})") from e
        out[split] = {"keys": [r["key"] for r in part], "uids": [r["uid"] for r in part],
                      "sources": [r.get("source") or LEGACY_SOURCE for r in part],
                      "views": [r.get("view") or "" for r in part], "labels": labels, "probs": probs}
    return out


@dataclass(frozen=True)
class Scoring:
    """How evaluate_split scores a split. `loss_fn`: also the mean loss (training's validation);
    `batches` replaces the shard stream (e.g. this rank's share of a validation cache); `views` > 1
    averages the probabilities over that many views (view_loaders; the loss is the plain view's);
    `with_predictions`: the result also holds the predictions; `with_features`: they also hold each
    image's pooled features (of the plain view)."""
    loss_fn: nn.Module | None = None
    batches: Any = None
    views: int = 1
    with_predictions: bool = False
    with_features: bool = False


def evaluate_split(model: nn.Module, loader: LoaderConfig, split: str, accelerator, index: ShardIndex,
                   scoring: Scoring = Scoring()) -> dict:
    """Metrics of `model` on a shard split, computed once from all ranks' predictions.

    A collective: every rank runs its share of the split (no collectives inside the loop, so
    uneven shares cannot hang), then predictions are gathered and deduplicated, metrics are
    computed on the main process and broadcast so that every rank steps its scheduler alike.
    `index`: the shard index the split is read from (read once by the entry point). The metrics
    include the per-source and per-view AUROC and `source_mean_auroc` (metrics.breakdown), and
    for a findings model the per-finding AUROC (per_finding.findings_breakdown).
    """
    loss_fn, batches, views = scoring.loss_fn, scoring.batches, scoring.views
    with_predictions, with_features = scoring.with_predictions, scoring.with_features
    loaders = [batches] if batches is not None else view_loaders(loader, split, accelerator.process_index,
                                                                 accelerator.num_processes, index, views,
                                                                 accelerator.device)
    sets = []
    for i, view in enumerate(loaders):
        with accelerator.autocast():
            mine = infer(model, view, accelerator.device, loss_fn if i == 0 else None, with_features and i == 0,
                         index.findings)
        parts = dist.gather_objects(mine)
        if accelerator.is_main_process:
            sets.append(merge(parts))
    result = None
    if accelerator.is_main_process:
        preds = average(sets)
        loss = preds["loss_sum"] / max(preds["n_seen"], 1) if loss_fn is not None else None
        result = compute_metrics(preds["probs"], preds["labels"], loss=loss)
        result.update(breakdown(preds["probs"], preds["labels"], preds["sources"], preds["views"],
                                [s.name for s in index.sources if s.role == "train"]))
        if "finding_probs" in preds:  # finding/NAME/auroc, findings_macro_auroc
            result.update(findings_breakdown(preds["finding_probs"], preds["finding_targets"], preds["finding_mask"],
                                             preds["finding_names"], preds["sources"]))
        if with_predictions:
            result["predictions"] = preds
    return dist.broadcast_object(result)


def report(preds: dict, threshold: float = 0.5) -> dict:
    """Image-level and study-level metrics at `threshold` plus the always-abnormal baseline, JSON-ready.

    Each level's `auroc_ci95` is a 95% bootstrap interval that draws whole studies (metrics.auroc_interval).
    """
    image = compute_metrics(preds["probs"], preds["labels"], threshold)
    image["auroc_ci95"] = auroc_interval(preds["probs"], preds["labels"], preds["uids"])
    out = {"threshold": threshold, "image_level": image, "always_abnormal": always_abnormal(preds["labels"])}
    uids, sp, sl = study_level(preds["uids"], preds["probs"], preds["labels"])
    if len(uids) < len(preds["keys"]):  # some studies have several views
        out["study_level"] = {**compute_metrics(sp, sl, threshold), "auroc_ci95": auroc_interval(sp, sl, uids)}
        out["study_level_always_abnormal"] = always_abnormal(sl)
    # Breakdowns (image level): AUROC with its interval and n per view and per source, and the mean
    # probability of normal and abnormal images per view: the shortcut check.
    views = [view_name(v) for v in preds["views"]]
    out["by_view"] = group_metrics(preds["probs"], preds["labels"], views, preds["uids"], interval=True)
    out["by_source"] = group_metrics(preds["probs"], preds["labels"], preds["sources"], preds["uids"], interval=True)
    normal_means = [m["mean_prob_normal"] for m in out["by_view"].values() if m["n_normal"]]
    out["normal_prob_spread_across_views"] = float(max(normal_means) - min(normal_means)) if normal_means else None
    if "finding_probs" in preds:
        out["findings"] = findings_report(preds["finding_probs"], preds["finding_targets"], preds["finding_mask"],
                                          preds["finding_names"], preds["uids"], preds["sources"], preds["views"])
    return out


def external_source(data: DataConfig, path: str, fmt: str, patient_regex: str | None = None,
                    view: str | None = None) -> DataConfig:
    """The run's data settings (image size, preprocessing) with `path` as the one source to score.

    "iu" is the one-folder shorthand (keys as they always were). For another format, the run's own
    source of that format, if it has one, lends its name, label values and patient regex: a
    collection laid out like one the model was trained on is read the same way.
    """
    if fmt == "iu":
        return replace(data, data_dir=path, sources=())
    template = next((s for s in data.sources if s.format == fmt), SourceConfig(name=fmt))
    src = replace(template, format=fmt, path=path, role="external")
    if patient_regex is not None:
        src = replace(src, patient_regex=patient_regex)
    if view is not None:
        src = replace(src, view=view)
    return replace(data, data_dir="", sources=(src,))


def ood_summary(preds: dict, threshold: float | None) -> dict | None:
    """How a split's images score out of distribution: mean and quartiles, and the share flagged."""
    if "ood_score" not in preds or not len(preds["ood_score"]):
        return None
    scores = np.asarray(preds["ood_score"])
    q = np.quantile(scores, [0.25, 0.5, 0.75])
    out = {"n": int(len(scores)), "mean_score": float(scores.mean()), "quartiles": [float(v) for v in q]}
    if threshold is not None:
        out.update(threshold=float(threshold), flagged_frac=float((scores > threshold).mean()))
    return out


if __name__ == "__main__":
    # `python -m cxr_dist.eval.evaluate`: the command's former home, still called by
    # bench/gpu_experiments.sh. The command is product/evaluate_cli.py (`cxr-dist evaluate`); this
    # forwards to it by name only, so eval/ keeps importing nothing above itself. Remove once no
    # script calls the old name.
    import runpy

    runpy.run_module("cxr_dist.product.evaluate_cli", run_name="__main__", alter_sys=True)

"""Evaluation: distributed inference on a split, and `cxr-dist evaluate` for a checkpoint.

    cxr-dist evaluate --checkpoint runs/x/checkpoints/best --shards shards --split test
    cxr-dist evaluate --checkpoint runs/x/checkpoints/best --data /path/to/kaggle-layout-folder
    cxr-dist evaluate --checkpoint runs/x --data /path/to/nih --format nih     # any supported layout

prints one JSON object: image-level metrics, study-level metrics (one prediction per uid, the
mean over its views), `by_view` and `by_source` breakdowns (AUROC, 95% interval, n, and the mean
probability of normal and abnormal images: the shortcut check) and the always-abnormal baseline, at a decision threshold of
0.5 or `--threshold T`; `--threshold val` picks the one with the best balanced accuracy on the
validation split of the same shards (never on the split being evaluated).

Two ways to average probabilities, both off by default:
- several checkpoints (`--checkpoint A B C`): an ensemble, e.g. runs that differ only in seed;
- `--tta N`: each image seen N times, the plain view plus N-1 views with the training
  augmentation (seeded per view and image: reproducible, the same on any number of processes).
`--predictions F` writes the per-image probabilities as CSV, the format training writes to
`RUN_DIR/predictions.csv`; `bench/ensemble.py` averages such files without the checkpoints.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import dist
from .calibrate import apply_temperature
from ..config import DataConfig, ModelConfig, from_dict, replace
from ..errors import UserError, run_main
from ..config import SOURCE_FORMATS, SourceConfig, train_sources
from ..data.index import LEGACY_SOURCE, load_index, train_val_splits
from .metrics import (always_abnormal, auroc_interval, balanced_threshold, breakdown, compute_metrics, dedupe,
                      group_metrics, study_level, view_name)
from ..model.classifier import inference_device, logits_of
from ..data.stream import eval_loader, views_loader


@torch.no_grad()
def infer(model: nn.Module, loader, device: torch.device, loss_fn: nn.Module | None = None,
          with_features: bool = False) -> dict:
    """This rank's predictions: keys, uids, probability of abnormal, labels, summed loss, and with
    `with_features` the pooled features the MLP head received (for the OOD score, ood.py)."""
    was_training = model.training
    model.eval()
    keys, uids, sources, views, probs, labels, feats, loss_sum = [], [], [], [], [], [], [], 0.0
    # The head's input is the pooled feature whatever the path (images or a frozen-compute cache):
    # a pre-hook on it sees both. getattr(.., "module"): the model inside a DDP/DeepSpeed wrapper.
    hook = (getattr(model, "module", model).head.register_forward_pre_hook(
        lambda _m, inputs: feats.append(inputs[0].float().cpu())) if with_features else None)
    try:
        for batch in loader:
            y = batch["label"].to(device, non_blocking=True)
            logits = logits_of(model, batch, device).float()
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
    if with_features:
        out["features"] = torch.cat(feats).numpy() if feats else np.zeros((0, 0), np.float32)
    return out


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
    return out


def average(sets: list[dict]) -> dict:
    """Mean probability per image over prediction sets of the same images (an ensemble, or views)."""
    first = sets[0]
    for other in sets[1:]:
        if other["keys"] != first["keys"] or not np.array_equal(other["labels"], first["labels"]):
            raise UserError("the prediction sets to average do not cover the same images with the same labels")
    return {**first, "probs": np.mean([p["probs"] for p in sets], axis=0)}


def view_loaders(data: DataConfig, split: str, rank: int, world: int, views: int = 1, index: dict | None = None,
                 device: torch.device | None = None):
    """Loaders that each show this rank's share of `split` once: the plain view, then views - 1
    views with the training augmentation (test-time augmentation). Each view of an image is seeded
    by (view, image key): the same on every call, whatever the number of processes and workers.
    The plain view is decoded on `device` when `data.decode_on` says so (device_input.py: on a
    GPU by default; bit-identical to the workers' decode on the CPU)."""
    from ..data.device_input import DeviceInput, decode_where

    on_device = device is not None and decode_where(data, device) == "device"
    plain = eval_loader(data, split, rank, world, index=index, on_device=on_device)
    yield map(DeviceInput(data, device, augment=False), plain) if on_device else plain
    if views > 1:
        loader = views_loader(replace(data, augment=True), [split], rank, world, seed=0, keyed=True, index=index)
        for view in range(views - 1):
            loader.set_epoch(view)
            yield loader


def predict_split(model: nn.Module, data: DataConfig, split: str, views: int = 1, index: dict | None = None,
                  device: torch.device | None = None, with_features: bool = False) -> dict:
    """One process's predictions on a whole split, averaged over `views` views, on `device`
    (default: model.inference_device(), the GPU when there is one). Moves `model` there."""
    device = device or inference_device()
    model.to(device)
    return average([merge([infer(model, loader, device, with_features=with_features and v == 0)])
                    for v, loader in enumerate(view_loaders(data, split, 0, 1, views, index, device))])


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


def evaluate_split(model: nn.Module, data: DataConfig, split: str, accelerator, loss_fn=None,
                   with_predictions: bool = False, batches=None, views: int = 1, index: dict | None = None,
                   with_features: bool = False) -> dict:
    """Metrics of `model` on a shard split, computed once from all ranks' predictions.

    A collective: every rank runs its share of the split (no collectives inside the loop, so
    uneven shares cannot hang), then predictions are gathered and deduplicated, metrics are
    computed on the main process and broadcast so that every rank steps its scheduler alike.
    `batches` replaces the shard stream (e.g. this rank's share of a validation cache); `views`
    > 1 averages the probabilities over that many views (view_loaders; the loss is the plain view's).
    The metrics include the per-source and per-view AUROC and `source_mean_auroc` (metrics.breakdown).
    `with_features`: the predictions also hold each image's pooled features (of the plain view).
    """
    loaders = [batches] if batches is not None else view_loaders(data, split, accelerator.process_index,
                                                                 accelerator.num_processes, views, index,
                                                                 accelerator.device)
    sets = []
    for i, loader in enumerate(loaders):
        with accelerator.autocast():
            mine = infer(model, loader, accelerator.device, loss_fn if i == 0 else None, with_features and i == 0)
        parts = dist.gather_objects(mine)
        if accelerator.is_main_process:
            sets.append(merge(parts))
    result = None
    if accelerator.is_main_process:
        preds = average(sets)
        loss = preds["loss_sum"] / max(preds["n_seen"], 1) if loss_fn is not None else None
        result = compute_metrics(preds["probs"], preds["labels"], loss=loss)
        result.update(breakdown(preds["probs"], preds["labels"], preds["sources"], preds["views"],
                                train_sources(data)))
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
    return out


def _threshold_arg(text: str, shards: str | None) -> float | None:
    """--threshold as a number in [0, 1], or None for 'val' (picked later on the val split)."""
    if text == "val":
        if not shards:
            raise UserError("--threshold val needs --shards (a prepared folder with a validation split)")
        return None
    try:
        threshold = float(text)
    except ValueError:
        raise UserError(f"--threshold must be a number in [0, 1] or 'val', not {text!r}") from None
    if not 0.0 <= threshold <= 1.0:
        raise UserError(f"--threshold must be in [0, 1], not {threshold}")
    return threshold


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


def product_outputs(preds: dict, temperature: float, density=None, ood_threshold: float | None = None) -> dict:
    """Predictions as the product gives them: `probs` calibrated with `temperature` (the network's
    own in `prob_uncalibrated`) and, given a density (ood.FeatureDensity), the `ood_score` of each
    image from its `features` (which are dropped: they are large and said once by the score)."""
    out = {k: v for k, v in preds.items() if k != "features"}
    out["prob_uncalibrated"] = preds["probs"]
    out["probs"] = apply_temperature(preds["probs"], temperature)
    if density is not None and "features" in preds:
        out["ood_score"] = density.score(preds["features"])
        if ood_threshold is not None:
            out["ood_flag"] = out["ood_score"] > ood_threshold
    return out


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


def _fast_runner(model: nn.Module, backend: str, input_size: int, work_dir: Path):
    """The run's fast CPU runtime for the frozen part (frozen_fast.py), exported from the loaded
    weights into `work_dir`; None on a GPU, for "eager", and for "int8" (its calibration needs the
    training shards, which evaluate may not have: it runs the fp32 eager path instead)."""
    from ..model.frozen_runtime import build_runner

    if inference_device().type != "cpu" or backend in ("eager", "int8"):
        return None
    return build_runner(model, backend, model.depth, input_size, work_dir)


def main(argv: list[str] | None = None) -> int:
    from .calibrate import temperature_of
    from ..model.frozen_runtime import attached
    from ..model.checkpoint import load_extra, load_model_state
    from ..model.classifier import build_model
    from .ood import FeatureDensity

    ap = argparse.ArgumentParser(prog="cxr-dist evaluate", description="Metrics of a checkpoint, as JSON.")
    ap.add_argument("--checkpoint", required=True, nargs="+",
                    help="checkpoint dir (e.g. runs/x/checkpoints/best) or a run dir (its best checkpoint); "
                         "several: an ensemble, the mean of their probabilities")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--shards", help="a folder written by `cxr-dist prepare`")
    src.add_argument("--data", help="a collection in a supported layout (--format): all its images are evaluated "
                                    "(prepared on the fly with the run's preprocessing)")
    ap.add_argument("--format", default="iu", choices=SOURCE_FORMATS,
                    help="layout of --data: iu (Kaggle IU X-ray, default), nih (ChestX-ray14), folder (a folder "
                         "per class), csv (a table: path,label,patient[,view,findings,study,report])")
    ap.add_argument("--patient-regex", help="with --format folder: regex whose group 'patient' (or first group) "
                                            "pulls the patient id out of a file name")
    ap.add_argument("--view", help="view of every image of --data when its layout does not record it (PA, AP, LATERAL)")
    ap.add_argument("--split", default="test", help="with --shards: which split (default test)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threshold", default="0.5",
                    help="probability from which an image is called abnormal (default 0.5), or 'val': the one "
                         "that maximises balanced accuracy on the validation split of --shards")
    ap.add_argument("--tta", type=int, default=1, metavar="N",
                    help="test-time augmentation: mean over N views per image, the plain one and N-1 with the "
                         "training augmentation (default 1: the plain view only)")
    ap.add_argument("--uncalibrated", action="store_true",
                    help="the network's own probabilities (default: calibrated with the run's temperature)")
    ap.add_argument("--out", help="also write the JSON here")
    ap.add_argument("--predictions", help="also write the per-image probabilities here (CSV)")
    args = ap.parse_args(argv)
    threshold = _threshold_arg(args.threshold, args.shards)
    if args.tta < 1:
        raise UserError(f"--tta must be at least 1 (views per image), not {args.tta}")

    models, product, backends = [], [], []
    for path in args.checkpoint:
        state, meta = load_model_state(path, tag="best")
        model = build_model(replace(from_dict(ModelConfig, meta["config"]["model"]), pretrained=False, weights=""))
        model.load_state_dict(state)  # the weights come from the checkpoint
        models.append((model, replace(from_dict(DataConfig, meta["config"]["data"]), batch_size=args.batch_size)))
        backends.append(from_dict(ModelConfig, meta["config"]["model"]).frozen_backend)
        # Calibration per checkpoint (an ensemble averages calibrated probabilities); the OOD score
        # only for one checkpoint (each run has its own feature space).
        ood = meta.get("ood") if len(args.checkpoint) == 1 else None
        product.append((1.0 if args.uncalibrated else temperature_of(meta),
                        FeatureDensity.from_tensors(load_extra(path)) if ood else None, (ood or {}).get("threshold")))
    with tempfile.TemporaryDirectory(prefix="cxr-eval-") as tmp:
        shards = args.shards
        if args.data:
            from ..data.shards import write_shards

            data = external_source(models[0][1], args.data, args.format, args.patient_regex, args.view)
            write_shards(data, Path(tmp), single_split=args.split)
            shards = tmp
        models = [(m, replace(d, shards_dir=shards)) for m, d in models]
        index = load_index(shards)
        splits = list(dict.fromkeys([args.split] + (["val"] if threshold is None else [])))
        runners = [_fast_runner(m, b, d.input_size, Path(tmp) / f"frozen-{i}")
                   for i, ((m, d), b) in enumerate(zip(models, backends))]
        preds = {}
        for name in splits:
            split = train_val_splits(models[0][1])[1] if name == "val" else name
            sets = []
            for (m, d), (t, dens, ot), runner in zip(models, product, runners):
                with attached(m, runner):
                    sets.append(product_outputs(predict_split(m, d, split, args.tta, index, with_features=dens is not None),
                                                t, dens, ot))
            preds[name] = average(sets)
            if len(sets) > 1:  # an ensemble: these columns belong to one model each
                preds[name] = {k: v for k, v in preds[name].items() if k not in ("prob_uncalibrated", "ood_score", "ood_flag")}
    if threshold is None:
        threshold = balanced_threshold(preds["val"]["probs"], preds["val"]["labels"])
    out = {"checkpoint": args.checkpoint[0] if len(args.checkpoint) == 1 else args.checkpoint,
           "split": args.split, "tta": args.tta, "calibrated": not args.uncalibrated,
           **report(preds[args.split], threshold)}
    ood = ood_summary(preds[args.split], product[0][2])
    if ood is not None:
        out["ood"] = ood
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    if args.predictions:
        Path(args.predictions).write_text(predictions_csv(preds))
    return 0


if __name__ == "__main__":
    sys.exit(run_main("cxr-dist evaluate", main))

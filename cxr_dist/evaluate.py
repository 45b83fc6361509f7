"""Evaluation: distributed inference on a split, and `cxr-dist evaluate` for a checkpoint.

    cxr-dist evaluate --checkpoint runs/x/checkpoints/best --shards shards --split test
    cxr-dist evaluate --checkpoint runs/x/checkpoints/best --data /path/to/kaggle-layout-folder

prints one JSON object: image-level metrics, study-level metrics (one prediction per uid, the
mean over its views) and the always-abnormal baseline for reference, at a decision threshold of
0.5 or `--threshold T`; `--threshold val` picks the one with the best balanced accuracy on the
validation split of the same shards (never on the split being evaluated).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import dist
from .config import DataConfig, ModelConfig, from_dict, replace
from .errors import UserError
from .metrics import always_abnormal, balanced_threshold, compute_metrics, dedupe, study_level
from .split import train_val_splits
from .stream import eval_loader


def logits_of(model: nn.Module, batch: dict, device: torch.device) -> torch.Tensor:
    """Images, or cached frozen features (train.cache_views > 0), through the model."""
    if "features" in batch:
        return model(batch["features"].to(device, non_blocking=True), cached=True)
    return model(batch["image"].to(device, non_blocking=True))


@torch.no_grad()
def infer(model: nn.Module, loader, device: torch.device, loss_fn: nn.Module | None = None) -> dict:
    """This rank's predictions: keys, uids, probability of abnormal, labels, summed loss."""
    was_training = model.training
    model.eval()
    keys, uids, probs, labels, loss_sum = [], [], [], [], 0.0
    for batch in loader:
        y = batch["label"].to(device, non_blocking=True)
        logits = logits_of(model, batch, device).float()
        if loss_fn is not None:
            loss_sum += loss_fn(logits, y).item() * len(y)
        probs.append(torch.softmax(logits, 1)[:, 1].cpu())
        labels.append(y.cpu())
        keys += list(batch["key"])
        uids += list(batch["uid"])
    model.train(was_training)
    cat = lambda xs: torch.cat(xs).numpy() if xs else np.zeros(0)  # noqa: E731
    return {"keys": keys, "uids": uids, "probs": cat(probs), "labels": cat(labels).astype(np.int64), "loss_sum": loss_sum}


def merge(parts: list[dict]) -> dict:
    """Predictions of all ranks -> one set, duplicates (same key) removed, sorted by key."""
    keys = [k for p in parts for k in p["keys"]]
    uid_of = {k: u for p in parts for k, u in zip(p["keys"], p["uids"])}
    probs = np.concatenate([p["probs"] for p in parts])
    labels = np.concatenate([p["labels"] for p in parts])
    keys, probs, labels = dedupe(keys, probs, labels)
    return {"keys": keys, "uids": [uid_of[k] for k in keys], "probs": probs, "labels": labels,
            "loss_sum": sum(p["loss_sum"] for p in parts), "n_seen": sum(len(p["keys"]) for p in parts)}


def evaluate_split(model: nn.Module, data: DataConfig, split: str, accelerator, loss_fn=None,
                   with_predictions: bool = False, batches=None) -> dict:
    """Metrics of `model` on a shard split, computed once from all ranks' predictions.

    A collective: every rank runs its share of the split (no collectives inside the loop, so
    uneven shares cannot hang), then predictions are gathered and deduplicated, metrics are
    computed on the main process and broadcast so that every rank steps its scheduler alike.
    `batches` replaces the shard stream (e.g. this rank's share of a validation cache).
    """
    loader = batches if batches is not None else eval_loader(data, split, accelerator.process_index,
                                                             accelerator.num_processes)
    with accelerator.autocast():
        mine = infer(model, loader, accelerator.device, loss_fn)
    parts = dist.gather_objects(mine)
    result = None
    if accelerator.is_main_process:
        preds = merge(parts)
        loss = preds["loss_sum"] / max(preds["n_seen"], 1) if loss_fn is not None else None
        result = compute_metrics(preds["probs"], preds["labels"], loss=loss)
        if with_predictions:
            result["predictions"] = preds
    return dist.broadcast_object(result)


def report(preds: dict, threshold: float = 0.5) -> dict:
    """Image-level and study-level metrics at `threshold` plus the always-abnormal baseline, JSON-ready."""
    out = {"threshold": threshold,
           "image_level": compute_metrics(preds["probs"], preds["labels"], threshold),
           "always_abnormal": always_abnormal(preds["labels"])}
    uids, sp, sl = study_level(preds["uids"], preds["probs"], preds["labels"])
    if len(uids) < len(preds["keys"]):  # some studies have several views
        out["study_level"] = compute_metrics(sp, sl, threshold)
        out["study_level_always_abnormal"] = always_abnormal(sl)
    return out


def main(argv: list[str] | None = None) -> int:
    from .checkpoint import load_model_state
    from .model import build_model

    ap = argparse.ArgumentParser(prog="cxr-dist evaluate", description="Metrics of a checkpoint, as JSON.")
    ap.add_argument("--checkpoint", required=True, help="checkpoint dir (e.g. runs/x/checkpoints/best) or a run dir (its best checkpoint)")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--shards", help="a folder written by `cxr-dist prepare`")
    src.add_argument("--data", help="a Kaggle-layout folder: all its images are evaluated (prepared on the fly)")
    ap.add_argument("--split", default="test", help="with --shards: which split (default test)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threshold", default="0.5",
                    help="probability from which an image is called abnormal (default 0.5), or 'val': the one "
                         "that maximises balanced accuracy on the validation split of --shards")
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args(argv)
    if args.threshold != "val":
        try:
            threshold = float(args.threshold)
        except ValueError:
            raise UserError(f"--threshold must be a number in [0, 1] or 'val', not {args.threshold!r}") from None
        if not 0.0 <= threshold <= 1.0:
            raise UserError(f"--threshold must be in [0, 1], not {threshold}")
    elif not args.shards:
        raise UserError("--threshold val needs --shards (a prepared folder with a validation split)")

    state, meta = load_model_state(args.checkpoint, tag="best")
    model_cfg = from_dict(ModelConfig, meta["config"]["model"])
    data_cfg = replace(from_dict(DataConfig, meta["config"]["data"]), batch_size=args.batch_size)
    model = build_model(replace(model_cfg, pretrained=False, weights=""))  # weights come from the checkpoint
    model.load_state_dict(state)
    with tempfile.TemporaryDirectory(prefix="cxr-eval-") as tmp:
        if args.data:
            from .shards import write_shards

            write_shards(replace(data_cfg, data_dir=args.data), Path(tmp), single_split=args.split)
            data_cfg = replace(data_cfg, shards_dir=tmp)
        else:
            data_cfg = replace(data_cfg, shards_dir=args.shards)
        preds = merge([infer(model, eval_loader(data_cfg, args.split, 0, 1), torch.device("cpu"))])
        if args.threshold == "val":
            _, val_split = train_val_splits(data_cfg)
            val = merge([infer(model, eval_loader(data_cfg, val_split, 0, 1), torch.device("cpu"))])
            threshold = balanced_threshold(val["probs"], val["labels"])
    out = {"checkpoint": str(args.checkpoint), "split": args.split, **report(preds, threshold)}
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

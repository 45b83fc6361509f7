"""Does a frozen backend change the metrics? A trained model's test AUROC through eager and each
backend, and the paired bootstrap difference (runs/paired.py, as `cxr-dist compare --paired`).

    .venv/bin/python bench/frozen_auroc.py out/sources/runs/iu_only \\
        --shards out/sources/shards/iu_kermany_ext --split test --backends int8,openvino

The run's best checkpoint (weights and head as trained) predicts `--split` once in plain eager
fp32 PyTorch on the CPU and once per backend, with the frozen part (depth 0: the whole backbone)
run by that backend (frozen_runtime.attached, as evaluation would); int8 is calibrated on the
first 128 images of the shards' train split. For each: AUROC, max |prob difference|, and the
AUROC difference from eager with its paired 95% interval over 2,000 draws of whole studies, per
image and per study. An interval that contains 0 and is narrow says the backend does not move the
metric beyond the luck of which studies are in the test split.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cxr_dist.config import replace
from cxr_dist.data.index import load_index
from cxr_dist.eval.evaluate import predict_split
from cxr_dist.eval.metrics import compute_metrics
from cxr_dist.model.frozen_runtime import attached, build_runner, calibration_batches
from cxr_dist.product.inference import Product
from cxr_dist.runs.paired import gain, levels


def shown(g: dict) -> str:
    """runs.paired.gain's result as "+0.0012 (-0.0031 to +0.0050)"."""
    return f"{g['gain']:+.4f} ({g['ci95'][0]:+.4f} to {g['ci95'][1]:+.4f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="a run dir (its best checkpoint) or a checkpoint dir")
    ap.add_argument("--shards", required=True)
    ap.add_argument("--split", default="test")
    ap.add_argument("--backends", default="int8")
    ap.add_argument("--calibration-split", default="train")
    ap.add_argument("--work-dir", default="", help="where exports are kept (default: a temporary folder)")
    args = ap.parse_args()

    cpu = torch.device("cpu")
    # The network's own probabilities (uncalibrated: a temperature would not move an AUROC).
    product = Product.load(args.run, calibrated=False, views=1, device=cpu)
    model = product.model
    loader = replace(product.loader, num_workers=1)
    index = load_index(args.shards)
    print(f"{args.run}: {args.split} split of {args.shards}, {torch.get_num_threads()} threads")

    t0 = time.time()
    base = predict_split(model, loader, args.split, index, device=cpu)
    print(f"eager      AUROC {compute_metrics(base['probs'], base['labels'])['auroc']:.4f} "
          f"({len(base['keys'])} images, {time.time() - t0:.0f} s)")
    base_levels = levels(base)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="frozen-auroc-"))
    for backend in args.backends.split(","):
        calib = calibration_batches(loader, args.calibration_split, index) if backend == "int8" else None
        runner = build_runner(model, backend, model.depth, loader.input_size, work, calibration=calib)
        t0 = time.time()
        with attached(model, runner):
            preds = predict_split(model, loader, args.split, index, device=cpu)
        assert preds["keys"] == base["keys"]
        other = levels(preds)
        auroc = compute_metrics(preds["probs"], preds["labels"])["auroc"]
        print(f"{backend:10s} AUROC {auroc:.4f} ({time.time() - t0:.0f} s, build {runner.build_s:.0f} s); "
              f"max |prob diff| {np.abs(preds['probs'] - base['probs']).max():.4f}; "
              f"difference vs eager, image level {shown(gain(base_levels['image'], other['image']))}, "
              f"study level {shown(gain(base_levels['study'], other['study']))}")


if __name__ == "__main__":
    main()

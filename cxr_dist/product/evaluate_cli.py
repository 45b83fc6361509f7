"""`cxr-dist evaluate`: the metrics of a trained product (one checkpoint, or an ensemble) on a split.

    cxr-dist evaluate --checkpoint runs/x/checkpoints/best --shards shards --split test
    cxr-dist evaluate --checkpoint runs/x/checkpoints/best --data /path/to/kaggle-layout-folder
    cxr-dist evaluate --checkpoint runs/x --data /path/to/nih --format nih     # any supported layout

prints one JSON object: image-level metrics, study-level metrics (one prediction per uid, the
mean over its views), `by_view` and `by_source` breakdowns (AUROC, 95% interval, n, and the mean
probability of normal and abnormal images: the shortcut check) and the always-abnormal baseline, at
a decision threshold of 0.5 or `--threshold T`; `--threshold val` picks the one with the best
balanced accuracy on the validation split of the same shards (never on the split being evaluated).
The probabilities are the product's (inference.Product.load, readout.py): calibrated with the run's
temperature unless `--uncalibrated`, with the OOD score of each image and the share flagged (`ood`)
for a single checkpoint.

Two ways to average probabilities, both off by default:
- several checkpoints (`--checkpoint A B C`): an ensemble, e.g. runs that differ only in seed
  (each checkpoint's probabilities calibrated with its own temperature, then averaged; no OOD
  score, as each run has its own feature space);
- `--tta N`: each image seen N times, the plain view plus N-1 views with the training
  augmentation (seeded per view and image: reproducible, the same on any number of processes).
`--predictions F` writes the per-image probabilities as CSV, the format training writes to
`RUN_DIR/predictions.csv`; `bench/ensemble.py` averages such files without the checkpoints.

The command lives in product/ because it loads checkpoints as products; the library it runs on
(predict_split, report, predictions_csv...) is eval/evaluate.py. Only argparse and the standard
library are imported at module level, so that `--help` is instant.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from ..config import SOURCE_FORMATS, replace
from ..errors import UserError, run_main

PROG = "cxr-dist evaluate"


def threshold_arg(text: str, shards: str | None) -> float | None:
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


def fast_runner(product, work_dir: Path):
    """The run's fast CPU runtime for the frozen part (model.frozen_backend, frozen_runtime.py),
    exported from the loaded weights into `work_dir`; None on a GPU, for "eager", and for "int8"
    (its calibration needs the training shards, which evaluate may not have: it runs the fp32 eager
    path instead)."""
    from ..model.classifier import inference_device
    from ..model.frozen_runtime import build_runner

    backend = product.model_config.frozen_backend
    if inference_device().type != "cpu" or backend in ("eager", "int8"):
        return None
    return build_runner(product.model, backend, product.model.depth, product.loader.input_size, work_dir)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=PROG, description="Metrics of a checkpoint (or an ensemble) on a split, as JSON.")
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
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    threshold = threshold_arg(args.threshold, args.shards)
    if args.tta < 1:
        raise UserError(f"--tta must be at least 1 (views per image), not {args.tta}")

    from ..data.index import load_index, train_val_splits
    from ..eval.evaluate import average, external_source, ood_summary, predict_split, predictions_csv, report
    from ..eval.metrics import balanced_threshold
    from ..model.frozen_runtime import attached
    from .inference import Product

    products = [Product.load(path, calibrated=not args.uncalibrated, views=args.tta) for path in args.checkpoint]
    # The OOD score only for one checkpoint (each run has its own feature space).
    with_features = len(products) == 1 and products[0].density is not None
    with tempfile.TemporaryDirectory(prefix="cxr-eval-") as tmp:
        shards = args.shards
        if args.data:
            from ..data.shards import write_shards

            # Prepared with the model's findings (its head's, whatever the run's config said): an
            # outside collection is scored on every finding its labels map to.
            data = external_source(replace(products[0].data, findings=products[0].model.findings), args.data,
                                   args.format, args.patient_regex, args.view)
            write_shards(data, Path(tmp), single_split=args.split)
            shards = tmp
        datas = [replace(p.data, shards_dir=shards) for p in products]
        loaders = [replace(p.loader, batch_size=args.batch_size) for p in products]
        index = load_index(shards)
        splits = list(dict.fromkeys([args.split] + (["val"] if threshold is None else [])))
        for path, product in zip(args.checkpoint, products):  # films read as the run read them
            index.check_read_settings(product.data, f"checkpoint {path}")
        for product, data in zip(products, datas):  # models that read text: the shards' texts
            product.attach_text(index, [train_val_splits(data)[1] if s == "val" else s for s in splits])
        runners = [fast_runner(p, Path(tmp) / f"frozen-{i}") for i, p in enumerate(products)]
        preds = {}
        for name in splits:
            split = train_val_splits(datas[0])[1] if name == "val" else name
            sets = []
            for product, loader, runner in zip(products, loaders, runners):
                with attached(product.model, runner):
                    raw = predict_split(product.model, loader, split, index, args.tta, with_features=with_features)
                sets.append(product.readout.apply_split(raw))  # calibration per checkpoint, then the mean
            preds[name] = average(sets)
            if len(sets) > 1:  # an ensemble: these columns belong to one model each
                preds[name] = {k: v for k, v in preds[name].items() if k not in ("prob_uncalibrated", "ood_score", "ood_flag")}
    if threshold is None:
        threshold = balanced_threshold(preds["val"]["probs"], preds["val"]["labels"])
    out = {"checkpoint": args.checkpoint[0] if len(args.checkpoint) == 1 else args.checkpoint,
           "split": args.split, "tta": args.tta, "calibrated": not args.uncalibrated,
           **report(preds[args.split], threshold)}
    ood = ood_summary(preds[args.split], products[0].ood_threshold if with_features else None)
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
    sys.exit(run_main(PROG, main))

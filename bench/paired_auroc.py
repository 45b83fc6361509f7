"""Is a model better than another on the same test images? The paired bootstrap of the AUROC gain.

    .venv/bin/python bench/paired_auroc.py BASELINE OTHER [OTHER...]   (run dirs or predictions CSVs)

For each OTHER: its test AUROC minus the baseline's, per image and per study, with a 95% interval
from 2,000 draws of whole studies, both models scored on every draw (metrics.auroc_interval with
`baseline`). Two models' separate intervals overlap even when one is better on nearly every
draw; the paired interval is the one that answers. An interval above 0 says the gain is not the
luck of which studies landed in the test split. It says nothing about the luck of training
(another seed may do worse): for that, compare several runs (bench/ensemble.py, k folds).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cxr_dist.errors import UserError  # noqa: E402
from cxr_dist.evaluate import read_predictions  # noqa: E402
from cxr_dist.metrics import auroc_interval, compute_metrics, study_level  # noqa: E402


def levels(preds: dict) -> dict[str, tuple[np.ndarray, np.ndarray, list[str]]]:
    """{'image': (probs, labels, groups), 'study': ...}: what the two levels score."""
    uids, probs, labels = study_level(preds["uids"], preds["probs"], preds["labels"])
    return {"image": (preds["probs"], preds["labels"], preds["uids"]), "study": (probs, labels, uids)}


def gain(base: tuple, other: tuple) -> str:
    """'+0.0578 (+0.0312 to +0.0860)': AUROC(other) - AUROC(base) and its paired 95% interval,
    from one level of `levels()` of each."""
    (bp, labels, groups), op = base, other[0]
    diff = compute_metrics(op, labels)["auroc"] - compute_metrics(bp, labels)["auroc"]
    low, high = auroc_interval(op, labels, groups, baseline=bp)
    return f"{diff:+.4f} ({low:+.4f} to {high:+.4f})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("baseline", help="run dir (with predictions.csv) or predictions CSV")
    ap.add_argument("others", nargs="+", help="run dirs or CSVs scored against the baseline")
    ap.add_argument("--split", default="test")
    args = ap.parse_args(argv)
    base = read_predictions(args.baseline).get(args.split)
    if base is None:
        raise UserError(f"{args.baseline} has no {args.split} predictions")
    base_levels = levels(base)
    print(f"| against {args.baseline} | test AUROC, image | gain, image (95% CI) | gain, study (95% CI) |")
    print("|---|---|---|---|")
    for path in args.others:
        other = read_predictions(path).get(args.split)
        if other is None or other["keys"] != base["keys"] or not np.array_equal(other["labels"], base["labels"]):
            raise UserError(f"{path} does not cover the baseline's {args.split} images with the same labels")
        auroc = compute_metrics(other["probs"], other["labels"])["auroc"]
        gains = [gain(base_levels[level], theirs) for level, theirs in levels(other).items()]
        print(f"| {path} | {auroc:.4f} | {gains[0]} | {gains[1]} |")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as e:
        print(f"paired_auroc.py: {e}", file=sys.stderr)
        sys.exit(2)

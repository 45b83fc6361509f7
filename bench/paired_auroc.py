"""Is a model better than another on the same test images? The paired bootstrap of the AUROC gain.

    .venv/bin/python bench/paired_auroc.py BASELINE OTHER [OTHER...]   (run dirs or predictions CSVs)
    .venv/bin/python bench/paired_auroc.py A B --source iu                    (one source's images)
    .venv/bin/python bench/paired_auroc.py A B --source kermany --split external --other-split test --common

For each OTHER: its test AUROC minus the baseline's, per image and per study, with a 95% interval
from 2,000 draws of whole studies, both models scored on every draw (metrics.auroc_interval with
`baseline`). Two models' separate intervals overlap even when one is better on nearly every
draw; the paired interval is the one that answers. An interval above 0 says the gain is not the
luck of which studies landed in the test split. It says nothing about the luck of training
(another seed may do worse): for that, compare several runs (bench/ensemble.py, k folds).

Runs over several sources: `--source NAME` scores one source's images only. `--common` scores
the images both runs have (e.g. an IU-only run's Kermany "external" split against a mixed run's
Kermany test split: `--split external --other-split test`); without it, different images are refused.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cxr_dist.errors import UserError  # noqa: E402
from cxr_dist.eval.evaluate import read_predictions  # noqa: E402
from cxr_dist.eval.metrics import auroc_interval, compute_metrics, study_level  # noqa: E402


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


def select(preds: dict, source: str | None = None, keys: set[str] | None = None) -> dict:
    """The predictions of one source and/or of the given keys (order kept: sorted by key)."""
    keep = [i for i, (k, s) in enumerate(zip(preds["keys"], preds["sources"]))
            if (source is None or s == source) and (keys is None or k in keys)]
    return {"keys": [preds["keys"][i] for i in keep], "uids": [preds["uids"][i] for i in keep],
            "sources": [preds["sources"][i] for i in keep], "views": [preds["views"][i] for i in keep],
            "probs": preds["probs"][keep], "labels": preds["labels"][keep]}


def _split(path: str, split: str, source: str | None) -> dict:
    preds = read_predictions(path).get(split)
    if preds is None:
        raise UserError(f"{path} has no {split} predictions")
    preds = select(preds, source)
    if not preds["keys"]:
        raise UserError(f"{path} has no {split} predictions of source {source!r}")
    return preds


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("baseline", help="run dir (with predictions.csv) or predictions CSV")
    ap.add_argument("others", nargs="+", help="run dirs or CSVs scored against the baseline")
    ap.add_argument("--split", default="test", help="the baseline's split (default test)")
    ap.add_argument("--other-split", help="the others' split (default: --split)")
    ap.add_argument("--source", help="score only this source's images")
    ap.add_argument("--common", action="store_true", help="score the images both runs have (else they must match)")
    args = ap.parse_args(argv)
    base_all = _split(args.baseline, args.split, args.source)
    print(f"| against {args.baseline} | n images | AUROC, image | gain, image (95% CI) | gain, study (95% CI) |")
    print("|---|---|---|---|---|")
    for path in args.others:
        other = _split(path, args.other_split or args.split, args.source)
        base = base_all
        if args.common:
            shared = set(base["keys"]) & set(other["keys"])
            base, other = select(base, keys=shared), select(other, keys=shared)
        if other["keys"] != base["keys"] or not np.array_equal(other["labels"], base["labels"]):
            raise UserError(f"{path} does not cover the baseline's images with the same labels "
                            "(--common scores the images both have)")
        auroc = compute_metrics(other["probs"], other["labels"])["auroc"]
        gains = [gain(level_b, level_o) for level_b, level_o in zip(levels(base).values(), levels(other).values())]
        print(f"| {path} | {len(base['keys'])} | {auroc:.4f} | {gains[0]} | {gains[1]} |")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as e:
        print(f"paired_auroc.py: {e}", file=sys.stderr)
        sys.exit(2)

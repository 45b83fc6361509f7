"""An ensemble of finished runs, from the predictions.csv each run wrote: no model, no GPU.

    .venv/bin/python bench/ensemble.py out/runs/a out/runs/b ...   [--out ensemble.json]

The ensemble's probability for an image is the mean of the runs' probabilities (the same rule as
`cxr-dist evaluate --checkpoint A B ...`, which needs the checkpoints). Prints one markdown row
per run and one for the ensemble (test AUROC per image and per study with their 95% bootstrap
intervals, balanced accuracy at 0.5), and writes the ensemble's full report as JSON with --out:
test metrics at 0.5 and at the threshold picked on val. The runs must have evaluated the same
images (same shards and split). Given one run, it scores that run alone (no mean row).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


from cxr_dist.errors import UserError
from cxr_dist.eval.evaluate import average, read_predictions, report
from cxr_dist.eval.metrics import balanced_threshold


def _auroc(level: dict | None) -> str:
    """'0.8040 (0.7674-0.8388)': the AUROC and its 95% bootstrap interval."""
    if level is None:
        return "n/a"
    low, high = level["auroc_ci95"]
    return f"{level['auroc']:.4f} ({low:.4f}-{high:.4f})"


def row(name: str, preds: dict) -> str:
    r = report(preds)
    return (f"| {name} | {_auroc(r['image_level'])} | {_auroc(r.get('study_level'))} | "
            f"{r['image_level']['balanced_accuracy']:.4f} |")


def ensemble(runs: dict[str, dict[str, dict]]) -> tuple[dict, dict]:
    """{run: {split: predictions}} -> (the ensemble's report: test at 0.5 and at the val threshold,
    val; its mean predictions per split)."""
    for split in ("val", "test"):
        if any(split not in r for r in runs.values()):
            raise UserError(f"every run needs {split} predictions (a run without a test split cannot be scored)")
    mean = {split: average([r[split] for r in runs.values()]) for split in ("val", "test")}
    threshold = balanced_threshold(mean["val"]["probs"], mean["val"]["labels"])
    result = {"runs": list(runs), "test": report(mean["test"]),
              "test_at_val_threshold": report(mean["test"], threshold), "val": report(mean["val"])}
    return result, mean


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="run directories (with predictions.csv) or predictions CSV files")
    ap.add_argument("--out", help="write the ensemble's report here (JSON)")
    args = ap.parse_args(argv)
    runs = {path: read_predictions(path) for path in args.runs}
    result, mean = ensemble(runs)
    print("| run | test AUROC, image (95% CI) | test AUROC, study (95% CI) | balanced accuracy (image, 0.5) |")
    print("|---|---|---|---|")
    for name, preds in runs.items():
        print(row(name, preds["test"]))
    if len(runs) > 1:
        print(row(f"**mean of {len(runs)}**", mean["test"]))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as e:
        print(f"ensemble.py: {e}", file=sys.stderr)
        sys.exit(2)

"""An ensemble of finished runs, from the predictions.csv each run wrote: no model, no GPU.

    .venv/bin/python bench/ensemble.py out/runs/a out/runs/b ...   [--out ensemble.json]
    .venv/bin/python bench/ensemble.py out/runs/image out/runs/text --weigh --write out/fused
    cxr-dist compare --paired out/runs/image out/fused            # the fused gain, paired

The ensemble's probability for an image is the mean of the runs' probabilities (the same rule as
`cxr-dist evaluate --checkpoint A B ...`, which needs the checkpoints). Prints one markdown row
per run and one for the ensemble (test AUROC per image and per study with their 95% bootstrap
intervals, balanced accuracy at 0.5), and writes the ensemble's full report as JSON with --out:
test metrics at 0.5 and at the threshold picked on val. The runs must have evaluated the same
images (same shards and split). Given one run, it scores that run alone (no mean row).

--weigh (two runs, e.g. an image model and a text model: late fusion) replaces the mean by
sigmoid(w * logit(p_a) + (1 - w) * logit(p_b)), with w the weight on a 0.05 grid that gives the best
study-level AUROC on **val**: test is never looked at, so its score stays honest. A run with
nothing to read for an image (a text model on a film without text) gives every such image the same
probability, so on those images the fused ranking is the other run's. --write DIR writes the
fused predictions of every split both runs scored to DIR/predictions.csv, which `cxr-dist compare
--paired` scores like a run, and DIR/ensemble.json, which tells compare what the members read
(and marks the ensemble LEAK when one of them reads its label). `cxr-dist fuse IMAGE_RUN TEXT_RUN
--out DIR` applies the same rule and makes the pair one late-fusion checkpoint (predict, serve).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cxr_dist.errors import UserError
from cxr_dist.eval.evaluate import average, predictions_csv, read_predictions, report
from cxr_dist.eval.metrics import balanced_threshold
from cxr_dist.fileio import write_bytes_atomic, write_json_atomic
# The late-fusion rule and its weight on val: the same code as `cxr-dist fuse`, which makes the pair one checkpoint.
from cxr_dist.runs.fuse import fuse, pick_weight


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


def ensemble(runs: dict[str, dict[str, dict]], weigh: bool = False) -> tuple[dict, dict]:
    """{run: {split: predictions}} -> (the ensemble's report: test at 0.5 and at the val threshold,
    val, and with `weigh` the weight picked on val; its predictions for every split all runs have)."""
    for split in ("val", "test"):
        if any(split not in r for r in runs.values()):
            raise UserError(f"every run needs {split} predictions (a run without a test split cannot be scored)")
    splits = [s for s in next(iter(runs.values())) if all(s in r for r in runs.values())]
    extra: dict = {}
    if weigh:
        if len(runs) != 2:
            raise UserError(f"--weigh fuses exactly two runs (an image run and a text run, say), got {len(runs)}")
        a, b = runs.values()
        w, scores = pick_weight(a["val"], b["val"])
        combined = {s: fuse(a[s], b[s], w) for s in splits}
        extra = {"weight": w, "weight_of": next(iter(runs)), "val_study_auroc_by_weight": scores}
    else:
        combined = {s: average([r[s] for r in runs.values()]) for s in splits}
    threshold = balanced_threshold(combined["val"]["probs"], combined["val"]["labels"])
    result = {"runs": list(runs), **extra, "test": report(combined["test"]),
              "test_at_val_threshold": report(combined["test"], threshold), "val": report(combined["val"])}
    return result, combined


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="run directories (with predictions.csv) or predictions CSV files")
    ap.add_argument("--out", help="write the ensemble's report here (JSON)")
    ap.add_argument("--weigh", action="store_true",
                    help="two runs: fuse their logits with the weight that scores best on val (late fusion)")
    ap.add_argument("--write", metavar="DIR", help="write the ensemble's predictions to DIR/predictions.csv")
    args = ap.parse_args(argv)
    runs = {path: read_predictions(path) for path in args.runs}
    result, combined = ensemble(runs, weigh=args.weigh)
    print("| run | test AUROC, image (95% CI) | test AUROC, study (95% CI) | balanced accuracy (image, 0.5) |")
    print("|---|---|---|---|")
    for name, preds in runs.items():
        print(row(name, preds["test"]))
    if args.weigh:
        print(row(f"**{result['weight']:.2f} x {args.runs[0]} + {1 - result['weight']:.2f} x {args.runs[1]}"
                  " (logits; weight picked on val)**", combined["test"]))
    elif len(runs) > 1:
        print(row(f"**mean of {len(runs)}**", combined["test"]))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    if args.write:
        out = Path(args.write)
        if any((out / f).exists() for f in ("predictions.csv", "config.toml", "ensemble.json")):
            raise UserError(f"{out} already holds a run's predictions; --write needs a new or empty folder")
        out.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(out / "predictions.csv", predictions_csv(combined).encode())
        # what the members read, for `cxr-dist compare` (runs/paired.reads): a member that reads
        # its label (LEAK) makes the ensemble a leak too
        members = [str(Path(r).resolve()) for r in args.runs]
        rule = {"weight_of_first": result["weight"]} if args.weigh else {"rule": "mean of probabilities"}
        write_json_atomic(out / "ensemble.json", {"members": members, **rule})
        print(f"wrote {out / 'predictions.csv'} ({', '.join(combined)})")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as e:
        print(f"ensemble.py: {e}", file=sys.stderr)
        sys.exit(2)

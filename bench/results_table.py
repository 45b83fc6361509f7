"""Print the per-epoch table and final metrics of a run folder as Markdown (for docs/results.md).

    .venv/bin/python bench/results_table.py out/runs/iu_xray_cached
    .venv/bin/python bench/results_table.py --summary RUN_DIR...     # one row per run (experiments)
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def main(run_dir: str) -> int:
    run = Path(run_dir)
    history = json.loads((run / "history.json").read_text())
    print("| epoch | phase | train loss | train acc | train F1 | train AUROC | val loss | val acc | val F1 | val AUROC | lr head |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in history:
        print(f"| {r['epoch']} | {r['phase']} | {r['train/loss']:.3f} | {r['train/accuracy']:.3f} | {r['train/f1']:.3f} | "
              f"{r['train/auroc']:.3f} | {r['val/loss']:.3f} | {r['val/accuracy']:.3f} | {r['val/f1']:.3f} | "
              f"{r['val/auroc']:.3f} | {r['lr/head']:.1e} |")
    ev = json.loads((run / "test_evaluation.json").read_text())
    keys = ("accuracy", "f1", "auroc", "balanced_accuracy", "recall", "specificity", "precision", "n")
    print("\n| test split | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for name in ("image_level", "study_level", "always_abnormal", "study_level_always_abnormal"):
        if name in ev:
            m = ev[name]
            print(f"| {name} | " + " | ".join(f"{m[k]:.3f}" if isinstance(m[k], float) else str(m[k]) for k in keys) + " |")
    intervals = [f"{level.split('_')[0]} {ev[level]['auroc_ci95'][0]:.3f}-{ev[level]['auroc_ci95'][1]:.3f}"
                 for level in ("image_level", "study_level") if "auroc_ci95" in ev.get(level, {})]
    if intervals:
        print(f"\n95% bootstrap intervals of the test AUROCs (whole studies drawn): {', '.join(intervals)}")
    return 0


def summary(run_dirs: list[str]) -> int:
    """One row per run: best epoch (by val AUROC), val and test metrics of that checkpoint, time."""
    print("| run | best val AUROC phase 1 / phase 2 | best epoch | val AUROC | test AUROC image | test AUROC study | test bal. acc image "
          "| test bal. acc study | test acc image | s/epoch phase 2 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for run_dir in run_dirs:
        run = Path(run_dir)
        history = json.loads((run / "history.json").read_text())
        ev = json.loads((run / "evaluation.json").read_text())
        best = json.loads((run / "checkpoints" / "best" / "meta.json").read_text())["progress"]["epoch"]
        p2 = [r["epoch_time_s"] for r in history if r["phase"] == 2]
        img, study = ev["test"]["image_level"], ev["test"]["study_level"]
        per_phase = " / ".join(f"{max(r['val/auroc'] for r in history if r['phase'] == k):.3f}"
                               for k in sorted({r["phase"] for r in history}))
        print(f"| {run.name} | {per_phase} | {best} | {ev['val']['image_level']['auroc']:.3f} | {img['auroc']:.3f} | "
              f"{study['auroc']:.3f} | {img['balanced_accuracy']:.3f} | {study['balanced_accuracy']:.3f} | "
              f"{img['accuracy']:.3f} | {sum(p2) / max(len(p2), 1):.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(summary(sys.argv[2:]) if sys.argv[1] == "--summary" else main(sys.argv[1]))

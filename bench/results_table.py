"""Print the per-epoch table and final metrics of a run folder as Markdown (for docs/results.md).

    .venv/bin/python bench/results_table.py out/runs/iu_xray_cached
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
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))

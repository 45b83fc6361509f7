"""The tables of docs/results.md "Several sources", from the runs of bench/sources_experiments.sh.

    .venv/bin/python bench/sources_table.py out/sources

Reads OUT/runs/<run>/evaluation.json and predictions.csv (whatever runs exist) and OUT/times.tsv,
and prints markdown: per run and source, the AUROC per image and per study with 95% intervals
(test split for training sources, the "external" split for held-out ones); per view, the AUROC
and the mean probability of abnormal given to normal and to abnormal films (the shortcut check);
the paired gains of bench/paired_auroc.py between runs on the same images; the wall times.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from cxr_dist.eval.evaluate import read_predictions, report
from cxr_dist.runs.paired import gain, levels, select

# (baseline run, other run, source, baseline split, other split): the comparisons worth making.
PAIRS = [
    ("iu_only", "iu_kermany", "iu", "test", "test"),  # does adding Kermany cost IU?
    ("iu_only", "iu_kermany", "kermany", "external", "test"),  # Kermany never seen vs trained on
    ("kermany_only", "iu_kermany", "iu", "external", "test"),
    ("kermany_only", "iu_kermany", "kermany", "test", "test"),  # does adding IU cost Kermany?
    ("iu_only", "iu_only_equalize", "iu", "test", "test"),
    ("iu_only", "iu_only_equalize", "kermany", "external", "external"),
    ("iu_only", "iu_only_shift", "iu", "test", "test"),
    ("iu_only", "iu_only_shift", "kermany", "external", "external"),
]


def _ci(m: dict) -> str:
    low, high = m.get("auroc_ci95", [math.nan, math.nan])
    return f"{m['auroc']:.3f} ({low:.3f}-{high:.3f})"


def scored(run_dir: Path) -> dict[str, tuple[str, dict]]:
    """{source: (split, report of that source's images)}: test for trained sources, external else."""
    preds = read_predictions(run_dir)
    out = {}
    for split in ("test", "external"):
        if split not in preds:
            continue
        for source in sorted(set(preds[split]["sources"])):
            out[source] = (split, report(select(preds[split], source)))
    return out


def _fmt(g: dict) -> str:
    return f"{g['gain']:+.4f} ({g['ci95'][0]:+.4f} to {g['ci95'][1]:+.4f})"


def main(out_dir: str) -> int:
    root = Path(out_dir)
    runs = sorted(p.parent.name for p in root.glob("runs/*/predictions.csv"))
    if not runs:
        print(f"no finished runs under {root}/runs", file=sys.stderr)
        return 1
    tables = {run: scored(root / "runs" / run) for run in runs}
    print("| run | source | split | n | AUROC image (95% CI) | AUROC study (95% CI) | normal-film prob. spread across views |")
    print("|---|---|---|---|---|---|---|")
    for run, by_source in tables.items():
        for source, (split, rep) in by_source.items():
            study = _ci(rep["study_level"]) if "study_level" in rep else "-"
            spread = rep["normal_prob_spread_across_views"]
            print(f"| {run} | {source} | {split} | {rep['image_level']['n']} | {_ci(rep['image_level'])} | {study} "
                  f"| {'-' if spread is None else f'{spread:.3f}'} |")
    print("\n| run | source | view | n | AUROC | mean prob. abnormal: normal films | abnormal films |")
    print("|---|---|---|---|---|---|---|")
    for run, by_source in tables.items():
        for source, (_, rep) in by_source.items():
            for view, m in rep["by_view"].items():
                print(f"| {run} | {source} | {view} | {m['n']} | {_ci(m)} | {m['mean_prob_normal']:.3f} "
                      f"| {m['mean_prob_abnormal']:.3f} |")
    print("\n| baseline -> other | source (splits) | n | gain, image (95% CI) | gain, study (95% CI) |")
    print("|---|---|---|---|---|")
    for base_run, other_run, source, base_split, other_split in PAIRS:
        if base_run not in tables or other_run not in tables:
            continue
        base = select(read_predictions(root / "runs" / base_run)[base_split], source)
        other = select(read_predictions(root / "runs" / other_run)[other_split], source)
        shared = set(base["keys"]) & set(other["keys"])
        base, other = select(base, keys=shared), select(other, keys=shared)
        gains = [_fmt(gain(b, o)) for b, o in zip(levels(base).values(), levels(other).values())]
        print(f"| {base_run} -> {other_run} | {source} ({base_split} / {other_split}) | {len(shared)} "
              f"| {gains[0]} | {gains[1]} |")
    times = root / "times.tsv"
    if times.is_file():
        print("\n| run | prepare s | train + final evaluation s |\n|---|---|---|")
        for line in times.read_text().splitlines():
            run, prep, train = line.split("\t")
            print(f"| {run} | {prep} | {train} |")
    for run in runs:
        history = json.loads((root / "runs" / run / "history.json").read_text())
        best = max(history, key=lambda r: r.get("val/source_mean_auroc", -1))
        print(f"\n{run}: {len(history)} epochs run (of the schedule's 40), best epoch {best['epoch']} "
              f"(val source_mean_auroc {best['val/source_mean_auroc']:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "out/sources"))

#!/usr/bin/env bash
# Normal mode against the frozen-compute cache on the same data, same seed, same schedule:
# wall time per epoch and final validation metrics, side by side in one invocation.
#
#   SEEDS="42 43" bash bench/bench_cache.sh [SHARDS_DIR] [extra overrides...]
#
# SEEDS (default 42): one normal and one cached run per training seed (head init, stream order,
# cached views); the spread between seeds is the noise that "cached matches normal" is judged by.
# SHARDS_DIR: shards of the real data (bash bench/reproduce_results.sh makes out/shards).
# A reduced schedule (input 128 px, 3 + 3 epochs) keeps the normal mode under ~15 min on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARDS="${1:-out/shards}"
shift || true
OUT="${OUT:-out/bench_cache}"
COMMON=(--config configs/iu_xray_cached.toml --data.shards_dir "$SHARDS" --loader.input_size 128
        --train.phases.0.epochs 3 --train.phases.1.epochs 3 --tracking.uri "sqlite:///$PWD/$OUT/mlflow.db"
        --tracking.experiment bench-cache)
SEEDS="${SEEDS:-42}"
mkdir -p "$OUT"
: > "$OUT/summary.txt"
for seed in $SEEDS; do
    for mode in normal cached; do
        views=0; [ "$mode" = cached ] && views=3
        run="$OUT/$mode-seed$seed"
        rm -rf "$run"  # this script's own output: a leftover run would be resumed, not rerun
        start=$(date +%s)
        .venv/bin/python -m cxr_dist.train "${COMMON[@]}" --train.seed "$seed" --train.cache_views "$views" \
            --train.run_dir "$run" "$@" > "$run.log" 2>&1
        echo "$mode seed $seed: $(( $(date +%s) - start )) s in all" | tee -a "$OUT/summary.txt"
    done
done
.venv/bin/python - "$OUT" $SEEDS <<'PY'
import json, sys
from pathlib import Path
out, seeds = Path(sys.argv[1]), sys.argv[2:]
print("| mode | seed | s/epoch phase 1 | s/epoch phase 2 | best val AUROC | final val AUROC | final val F1 | final val bal. acc | test AUROC (best ckpt) |")
print("|---|---|---|---|---|---|---|---|---|")
for mode, seed in [(m, s) for m in ("normal", "cached") for s in seeds]:
    h = json.loads((out / f"{mode}-seed{seed}" / "history.json").read_text())
    ev = json.loads((out / f"{mode}-seed{seed}" / "evaluation.json").read_text())
    p1 = [r["epoch_time_s"] for r in h if r["phase"] == 1]
    p2 = [r["epoch_time_s"] for r in h if r["phase"] == 2]
    last = h[-1]
    print(f"| {mode} | {seed} | {sum(p1)/len(p1):.1f} | {sum(p2)/len(p2):.1f} | {max(r['val/auroc'] for r in h):.3f} | "
          f"{last['val/auroc']:.3f} | {last['val/f1']:.3f} | {last['val/balanced_accuracy']:.3f} | "
          f"{ev['test']['image_level']['auroc']:.3f} |")
PY

#!/usr/bin/env bash
# How far does fine-tuning with fresh augmentation every epoch (the normal, uncached mode) get on
# IU X-ray? The question docs/results.md could not answer on a 2-core CPU. On one CUDA GPU:
#   prepare shards -> bench/bench_gpu.py (step throughput) -> the variants below, all at once on
#   the one GPU (bf16, 40 epochs, same shards and split) -> one summary row per run.
#
#   bash bench/gpu_experiments.sh DATA_DIR [extra config overrides for every run...]
#
# Environment: PY (default .venv/bin/python, else python3), WEIGHTS (model.weights, default
# lite1-package; a .safetensors path works), OUT (default out/gpu), RUN_LIMIT (seconds per run,
# default 330: a run still going is stopped and its best checkpoint so far evaluated), WORKERS
# (data workers per run, default 3), RUNS (which variants run at once; default: the default
# schedule and the four all16 seeds), BENCH (0: skip bench_gpu.py), ENSEMBLE (runs whose mean
# probability is scored as an ensemble when two or more finished; default the four all16 seeds).
# docs/results.md's table (one H200, before all16 evaluated with 8 views, hence the override):
#   RUNS="default deep6 all16 all16-s43 all16-s44" bash bench/gpu_experiments.sh DATA --product.tta_views 1
#   RUNS="all16-s45 all16-bnstats all16-bnstats-s43" BENCH=0 RUN_LIMIT=265 ...   (same machine)
set -uo pipefail  # no -e: one failed run must not stop the others or the summary
cd "$(dirname "$0")/.."
DATA="${1:?usage: bash bench/gpu_experiments.sh DATA_DIR [overrides...]}"
shift
PY="${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
WEIGHTS="${WEIGHTS:-lite1-package}"
OUT="${OUT:-out/gpu}"
RUN_LIMIT="${RUN_LIMIT:-330}"
WORKERS="${WORKERS:-3}"
SHARDS="$OUT/shards"

# Each variant: a config, then overrides; all run uncached (--train.cache_views 0).
declare -A VARIANT=(
    # the default schedule: 15 head epochs, then 25 with the last block (lr 1e-3 head / 1e-4 block)
    [default]="configs/iu_xray_cached.toml"
    # phase 2 unfreezes the last two stages (6 blocks), lr 1e-4, ImageNet BN statistics kept
    [deep6]="configs/iu_xray_deep6.toml --train.phases.1.epochs 25"
    # phase 2 fine-tunes all 16 blocks of Lite1 (only the stem stays frozen), lr 1e-4, BN statistics
    # kept; four seeds (head init, data order, augmentation; the split stays)
    [all16]="configs/iu_xray_all16.toml"
    [all16-s43]="configs/iu_xray_all16.toml --train.seed 43"
    [all16-s44]="configs/iu_xray_all16.toml --train.seed 44"
    [all16-s45]="configs/iu_xray_all16.toml --train.seed 45"
    # all 16 blocks, their BatchNorm layers re-estimating statistics on X-rays (plain train mode)
    [all16-bnstats]="configs/iu_xray_all16.toml --model.freeze_bn_stats false"
    [all16-bnstats-s43]="configs/iu_xray_all16.toml --model.freeze_bn_stats false --train.seed 43"
)
read -r -a names <<< "${RUNS:-default all16 all16-s43 all16-s44 all16-s45}"
mkdir -p "$OUT/runs"
start=$(date +%s)
stamp() { echo "[$(( $(date +%s) - start )) s] $*"; }

"$PY" -m cxr_dist.data.prepare --config configs/iu_xray_cached.toml --data "$DATA" --out "$SHARDS" \
    --data.prepare_workers "$(nproc)" || exit 1
stamp "shards ready"
[ "${BENCH:-1}" = 1 ] && timeout 120 "$PY" bench/bench_gpu.py | tee "$OUT/bench_gpu.md"
stamp "bench_gpu done"

for name in "${names[@]}"; do
    [ -n "${VARIANT[$name]+x}" ] || { echo "unknown variant $name (have: ${!VARIANT[*]})" >&2; exit 2; }
    read -r config overrides <<< "${VARIANT[$name]}"
    # Few intra-op threads: the GPU computes; the runs and their data workers share the cores.
    # shellcheck disable=SC2086  # the variant's overrides are meant to split into words
    OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" timeout -k 120 "$RUN_LIMIT" "$PY" -m cxr_dist.train --config "$config" \
        --data.shards_dir "$SHARDS" --train.run_dir "$OUT/runs/$name" --train.cache_views 0 \
        --train.mixed_precision bf16 --loader.num_workers "$WORKERS" --model.weights "$WEIGHTS" \
        --tracking.enabled false $overrides "$@" > "$OUT/runs/$name.log" 2>&1 &
done
wait
stamp "runs done"

# A run stopped by RUN_LIMIT has no history.json / evaluation.json / predictions.csv: write them
# from its latest checkpoint and an evaluation of its best one, so the summary still shows how far
# it got and the ensemble below can use it.
for name in "${names[@]}"; do
    run="$OUT/runs/$name"
    [ -f "$run/evaluation.json" ] && continue
    echo "$name: stopped before the end: $(tr '\r' '\n' < "$run.log" | grep -v '^[[:space:]]*$' | tail -n 1 | cut -c1-200)"
    "$PY" - "$run" "$SHARDS" <<'EOF'  # from the repository root, so cxr_dist imports
import json, subprocess, sys
from pathlib import Path
from cxr_dist.model.checkpoint import latest_checkpoint
from cxr_dist.eval.evaluate import read_predictions, report
run, shards = Path(sys.argv[1]), sys.argv[2]
latest = latest_checkpoint(run)
if latest is None:
    sys.exit(f"{run.name}: no checkpoint (stopped in its first epoch)")
meta = json.loads((latest / "meta.json").read_text())
(run / "history.json").write_text(json.dumps(meta["progress"]["history"]))
# test, and val for the threshold, over the run's product.tta_views: the three reports training writes
views = str(meta["config"]["train"].get("tta_views", 1))
at_val = json.loads(subprocess.run([sys.executable, "-m", "cxr_dist.eval.evaluate", "--checkpoint", str(run), "--shards",
                                    shards, "--split", "test", "--threshold", "val", "--tta", views, "--predictions",
                                    str(run / "predictions.csv")], capture_output=True, text=True, check=True).stdout)
preds = read_predictions(run / "predictions.csv")
ev = {"val": report(preds["val"]), "test": report(preds["test"]), "test_at_val_threshold": at_val}
(run / "evaluation.json").write_text(json.dumps(ev))
print(f"{run.name}: evaluated its best checkpoint after {meta['progress']['epoch']} epochs")
EOF
done
done_runs=()
for name in "${names[@]}"; do [ -f "$OUT/runs/$name/evaluation.json" ] && done_runs+=("$OUT/runs/$name"); done
[ ${#done_runs[@]} -gt 0 ] || { echo "no run finished or could be evaluated (logs: $OUT/runs/*.log)" >&2; exit 1; }
"$PY" bench/results_table.py --summary "${done_runs[@]}" | tee "$OUT/summary.md"
# The seeds of one variant, averaged (an ensemble), from the runs' predictions.csv.
members=()
for name in ${ENSEMBLE:-all16 all16-s43 all16-s44 all16-s45}; do
    [ -f "$OUT/runs/$name/predictions.csv" ] && members+=("$OUT/runs/$name")
done
if [ ${#members[@]} -ge 2 ]; then
    "$PY" bench/ensemble.py "${members[@]}" --out "$OUT/ensemble.json" | tee "$OUT/ensemble.md"
fi
stamp "all done"

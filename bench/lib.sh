# shellcheck shell=bash
# Shared by bench/findings_experiments.sh, bench/text_experiments.sh and bench/densenet_run.sh:
#   source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
# Defines functions only. They read the caller's variables when called (from the repository root):
#   BIN     folder of the venv's console scripts (.venv/bin)
#   CFG     the TOML config of the runs
#   SHARDS  the prepared shards
#   OUT     the output folder: the frozen-compute cache OUT/cache, the MLflow store OUT/mlflow.db,
#           and one "NAME: SECONDS s" line per run appended to OUT/times.txt

# train_timed RUN_DIR NAME [overrides...]: one training process on the CPU (or the GPU when there is
# one), run directory RUN_DIR, output in RUN_DIR.log, MLflow run name NAME, timed into OUT/times.txt.
# The run directory is a parameter because the scripts differ there: the experiment scripts put each
# run in OUT/runs/NAME (`run` below), densenet_run.sh its one run in OUT/run.
train_timed() {
    local dir="$1" name="$2"; shift 2
    local t0=$SECONDS
    "$BIN/accelerate" launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
        -m cxr_dist.train --config "$CFG" --data.shards_dir "$SHARDS" --train.run_dir "$dir" \
        --train.cache_dir "$OUT/cache" --tracking.uri "sqlite:///$OUT/mlflow.db" --tracking.run_name "$name" "$@" \
        > "$dir.log" 2>&1
    echo "$name: $((SECONDS - t0)) s" | tee -a "$OUT/times.txt"
}

# run NAME [overrides...]: train_timed in OUT/runs/NAME (log OUT/runs/NAME.log; OUT/runs must exist).
run() {
    train_timed "$OUT/runs/$1" "$@"
}

#!/usr/bin/env bash
# The multi-source measurements of docs/results.md ("Several sources"), on the 2-core CPU:
#
#   bash bench/sources_experiments.sh            # OUT=out/sources, RUNS = all below, in this order
#   RUNS="iu_only iu_kermany" bash bench/sources_experiments.sh
#
# Each run = one config (+ overrides), prepared if its shards are missing, trained with
# `accelerate launch` on the CPU like run.sh, and timed (OUT/times.tsv: run, prepare s, train s).
# Runs of one seed share the IU split (each source is split on its own), so their IU test images
# are the same and bench/paired_auroc.py can compare them. Then bench/sources_table.py OUT prints
# the tables of docs/results.md.
#   iu_only          IU trains; Kermany is external (scored, never trained on)  configs/iu_kermany_external.toml
#   iu_kermany       both train, half and half                               configs/iu_kermany.toml
#   kermany_only     Kermany trains; IU is external                            configs/kermany_iu_external.toml
#   iu_only_equalize iu_only with histogram equalisation of every film          --data.intensity equalize
#   iu_only_shift    iu_only with the augmentation aimed at the shift between sources  --loader.shift_augment true
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-out/sources}"
RUNS="${RUNS:-iu_only iu_kermany kermany_only iu_only_equalize iu_only_shift}"
mkdir -p "$OUT"
export MLFLOW_TRACKING_URI="${MLFLOW_TRACKING_URI:-sqlite:///$PWD/$OUT/mlflow.db}" MLFLOW_DISABLE_TELEMETRY=true

spec() {  # run name -> "config|shards name|overrides"
    case "$1" in
        iu_only) echo "configs/iu_kermany_external.toml|iu_kermany_ext|" ;;
        iu_kermany) echo "configs/iu_kermany.toml|iu_kermany|" ;;
        kermany_only) echo "configs/kermany_iu_external.toml|kermany_iu_ext|" ;;
        iu_only_equalize) echo "configs/iu_kermany_external.toml|iu_kermany_ext_eq|--data.intensity equalize" ;;
        iu_only_shift) echo "configs/iu_kermany_external.toml|iu_kermany_ext|--loader.shift_augment true" ;;
        *) echo "unknown run $1" >&2; exit 2 ;;
    esac
}

for run in $RUNS; do
    IFS='|' read -r config shards extra <<<"$(spec "$run")"
    # shellcheck disable=SC2206
    extra=($extra)
    t0=$(date +%s)
    if [ ! -f "$OUT/shards/$shards/index.json" ]; then
        .venv/bin/cxr-dist prepare --config "$config" --out "$OUT/shards/$shards" "${extra[@]}"
    fi
    t1=$(date +%s)
    .venv/bin/accelerate launch --cpu --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
        -m cxr_dist.train --config "$config" --data.shards_dir "$OUT/shards/$shards" \
        --train.run_dir "$OUT/runs/$run" --train.cache_dir "$OUT/cache" --tracking.run_name "$run" "${extra[@]}" \
        2>&1 | grep -v "it/s\]" | tee "$OUT/$run.log"
    t2=$(date +%s)
    printf '%s\t%s\t%s\n' "$run" $((t1 - t0)) $((t2 - t1)) >> "$OUT/times.tsv"
done
.venv/bin/python bench/sources_table.py "$OUT"

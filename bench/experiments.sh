#!/usr/bin/env bash
# What moves test AUROC on IU X-ray: variants of the full two-phase schedule of
# configs/iu_xray_cached.toml on the same shards and seed, one run each, then one summary row per
# run (best epoch by val AUROC; val and test metrics of that checkpoint). docs/results.md.
#
#   bash bench/experiments.sh [SHARDS_DIR] [VARIANT...]       # default: all variants below
#
# Variants with the same frozen part share the cache (CACHE_DIR, default: the cache of
# bench/reproduce_results.sh's run, so that run's cache is reused rather than recomputed).
set -euo pipefail
cd "$(dirname "$0")/.."
SHARDS="${1:-out/shards}"
shift || true
OUT="${OUT:-out/experiments}"
CACHE_DIR="${CACHE_DIR:-out/runs/iu_xray_cached/cache}"

# Each variant: a config, then overrides (the same phase 1, so the same cache).
declare -A VARIANT=(
    # phase 2 at a tenth of the learning rates, light weight decay: does phase 2 stop overfitting?
    [gentle]="configs/iu_xray_cached.toml --train.phases.1.lr 1e-4 --train.phases.1.backbone_lr 1e-5 --optimizer.weight_decay 1e-4"
    # the default schedule, but unfrozen blocks keep their ImageNet BatchNorm statistics
    [bnfrozen]="configs/iu_xray_cached.toml --model.freeze_bn_stats true"
    # phase 2 unfreezes all of the last two stages (6 blocks of Lite1) at lr 1e-4, for 10 epochs
    [deep6]="configs/iu_xray_deep6.toml"
)
names=("$@")
[ ${#names[@]} -eq 0 ] && names=(bnfrozen deep6 gentle)
mkdir -p "$OUT"
for name in "${names[@]}"; do
    [ -n "${VARIANT[$name]+x}" ] || { echo "unknown variant $name (have: ${!VARIANT[*]})" >&2; exit 2; }
    read -r config overrides <<< "${VARIANT[$name]}"
    start=$(date +%s)
    # shellcheck disable=SC2086  # the variant's overrides are meant to split into words
    .venv/bin/python -m cxr_dist.train --config "$config" --data.shards_dir "$SHARDS" \
        --train.run_dir "$OUT/$name" --train.cache_dir "$CACHE_DIR" $overrides \
        --tracking.uri "sqlite:///$PWD/$OUT/mlflow.db" --tracking.experiment cxr-dist-iu-xray-experiments \
        > "$OUT/$name.log" 2>&1
    echo "$name: $(( $(date +%s) - start )) s ($OUT/$name.log)"
done
.venv/bin/python bench/results_table.py --summary "${names[@]/#/$OUT/}"

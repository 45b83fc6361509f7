#!/usr/bin/env bash
# Reproduces docs/results.md end to end and prints the wall time:
#   prepare (shards) -> train the full 40-epoch two-phase schedule (configs/iu_xray_cached.toml)
#   -> evaluate the best checkpoint on the test split (image and study level) -> figures.
#
#   bash bench/reproduce_results.sh [DATA_DIR] [config overrides...]
#
# DATA_DIR defaults to ../shared/data/iu_xray_small (the team's copy); OUT (default out/) holds
# shards, the run folder (checkpoints, figures, history.json, evaluation.json) and mlflow.db.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${1:-../shared/data/iu_xray_small}"
shift || true
OUT="${OUT:-out}"
RUN="$OUT/runs/iu_xray_cached"
start=$(date +%s)
.venv/bin/cxr-dist prepare --config configs/iu_xray_cached.toml --data "$DATA" --out "$OUT/shards"
.venv/bin/python -m cxr_dist.train --config configs/iu_xray_cached.toml --data.shards_dir "$OUT/shards" \
    --train.run_dir "$RUN" --tracking.uri "sqlite:///$PWD/$OUT/mlflow.db" "$@"
.venv/bin/cxr-dist evaluate --checkpoint "$RUN" --shards "$OUT/shards" --split test --out "$RUN/test_evaluation.json" >/dev/null
end=$(date +%s)
echo "total wall time: $((end - start)) s (prepare + train + evaluate)"
.venv/bin/python bench/results_table.py "$RUN"

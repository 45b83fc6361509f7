#!/usr/bin/env bash
# Set everything up and run the main job on a Kaggle-layout IU X-ray folder:
#
#   ./run.sh /path/to/chest-xrays-indiana-university [--train.seed 3 ...]
#
# = install .venv, `cxr-dist prepare` (shards in $OUT/shards), train with every local CPU core
# or GPU through `accelerate launch`, evaluate the best checkpoint on the test split.
# CONFIG picks the config (default configs/iu_xray_cached.toml: offline ImageNet weights and the
# frozen-compute cache, ~30 min on a 2-core CPU; configs/offline.toml is the same without the cache,
# configs/original.toml downloads EfficientNet-B1 weights from timm's hub). OUT defaults to ./out.
set -euo pipefail
cd "$(dirname "$0")"
DATA="${1:-}"
if [ -z "$DATA" ] || [ ! -f "$DATA/indiana_reports.csv" ]; then
    cat >&2 <<MSG
usage: ./run.sh DATA_DIR [config overrides]

DATA_DIR must be the IU X-ray collection in the Kaggle layout: indiana_reports.csv,
indiana_projections.csv and the images under DATA_DIR/images/ (images/images_normalized/ on Kaggle).
${DATA:+"$DATA" has no indiana_reports.csv. }Get it from the Kaggle dataset raddar/chest-xrays-indiana-university
(kaggle datasets download -d raddar/chest-xrays-indiana-university; unzip it into a folder).
MSG
    exit 2
fi
shift
CONFIG="${CONFIG:-configs/iu_xray_cached.toml}"
OUT="${OUT:-out}"
bash scripts/setup.sh
mkdir -p "$OUT"
.venv/bin/cxr-dist prepare --config "$CONFIG" --data "$DATA" --out "$OUT/shards"
if .venv/bin/python -c "import torch, sys; sys.exit(0 if torch.cuda.device_count() > 1 else 1)"; then
    LAUNCH=(--config_file launch/gpu_multi.yaml)
elif .venv/bin/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    LAUNCH=(--config_file launch/gpu_1.yaml)
else  # CPU only: one process with all cores as threads, fp32 (the setting of docs/results.md;
    # bf16 is several times slower on CPUs without bf16 units, docs/performance.md)
    LAUNCH=(--cpu --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no)
fi
RUN_DIR="$OUT/runs/$(basename "$CONFIG" .toml)"
.venv/bin/accelerate launch "${LAUNCH[@]}" -m cxr_dist.train --config "$CONFIG" \
    --data.shards_dir "$OUT/shards" --train.run_dir "$RUN_DIR" "$@"
.venv/bin/cxr-dist evaluate --checkpoint "$RUN_DIR" --shards "$OUT/shards" --split test --out "$RUN_DIR/test_evaluation.json"
echo "done: $RUN_DIR (checkpoints, figures, evaluation); MLflow: .venv/bin/mlflow ui --backend-store-uri sqlite:///$PWD/mlflow.db"

#!/usr/bin/env bash
# Set everything up and run the main job: prepare shards, train with every local CPU core or GPU
# through `accelerate launch`, evaluate the best checkpoint on the test split, log it all to MLflow.
#
#   ./run.sh                                   # the demo: ~300 Kermany films shipped in demo/ (CC BY 4.0),
#                                              # configs/demo.toml, a few minutes on a 2-core CPU, no download
#   ./run.sh -- --train.phases.0.epochs 1      # the demo with config overrides
#   ./run.sh /path/to/chest-xrays-indiana-university [--train.seed 3 ...]   # your IU X-ray copy
#
# CONFIG picks the config: for DATA_DIR default configs/iu_xray_cached.toml (offline ImageNet
# weights and the frozen-compute cache, ~10 min on a 2-core CPU; configs/offline.toml is the same
# without the cache, configs/original.toml downloads EfficientNet-B1 weights from timm's hub); for
# the demo default configs/demo.toml. OUT defaults to ./out: shards in $OUT/shards and runs in
# $OUT/runs/CONFIG_NAME for DATA_DIR, $OUT/demo/shards and $OUT/demo/runs/CONFIG_NAME for the demo.
# MLflow: $MLFLOW_TRACKING_URI, else ./mlflow.db.
set -euo pipefail
cd "$(dirname "$0")"
OUT="${OUT:-out}"

usage() {  # usage EXIT_CODE [PROBLEM]: the problem first, then how to call run.sh
    { [ -z "${2:-}" ] || echo "run.sh: $2"
    cat <<MSG
usage: ./run.sh                               the demo (demo/kermany, configs/demo.toml), no download
       ./run.sh -- [config overrides]         the demo with overrides (--train.phases.0.epochs 1 ...)
       ./run.sh DATA_DIR [config overrides]   your IU X-ray copy (configs/iu_xray_cached.toml)

DATA_DIR must be the IU X-ray collection in the Kaggle layout: indiana_reports.csv,
indiana_projections.csv and the images under DATA_DIR/images/ (images/images_normalized/ on Kaggle).
Get it from the Kaggle dataset raddar/chest-xrays-indiana-university
(kaggle datasets download -d raddar/chest-xrays-indiana-university; unzip it into a folder).
MSG
    } >&$(( $1 == 0 ? 1 : 2 ))
    exit "$1"
}

# main_job SHARDS PREPARE_ARGS... -- TRAIN_OVERRIDES...: prepare, train, evaluate (sets RUN_DIR)
main_job() {
    local shards="$1" prepare=()
    shift
    while [ "$1" != "--" ]; do prepare+=("$1"); shift; done
    shift
    bash scripts/setup.sh
    mkdir -p "$OUT"
    .venv/bin/cxr-dist prepare --config "$CONFIG" "${prepare[@]}" --out "$shards"
    local gpus
    gpus="$(.venv/bin/python -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")"
    if [ "$gpus" -gt 1 ]; then
        LAUNCH=(--config_file launch/gpu_multi.yaml)
    elif [ "$gpus" -eq 1 ]; then
        LAUNCH=(--config_file launch/gpu_1.yaml)
    else  # CPU only: one process with all cores as threads, fp32 (the setting of docs/results.md;
        # bf16 is several times slower on CPUs without bf16 units, docs/performance.md)
        LAUNCH=(--cpu --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no)
    fi
    .venv/bin/accelerate launch "${LAUNCH[@]}" -m cxr_dist.train --config "$CONFIG" \
        --data.shards_dir "$shards" --train.run_dir "$RUN_DIR" "$@"
    .venv/bin/cxr-dist evaluate --checkpoint "$RUN_DIR" --shards "$shards" --split test --out "$RUN_DIR/test_evaluation.json"
}

MLFLOW_UI=".venv/bin/mlflow ui --backend-store-uri ${MLFLOW_TRACKING_URI:-sqlite:///$PWD/mlflow.db}"
case "${1:-}" in
    "" | --)  # the demo, on the films shipped in demo/kermany
        [ $# -gt 0 ] && shift
        CONFIG="${CONFIG:-configs/demo.toml}"
        RUN_DIR="$OUT/demo/runs/$(basename "$CONFIG" .toml)"
        main_job "$OUT/demo/shards" -- "$@"
        cat <<MSG
done: the demo ran on $(find demo/kermany -name '*.jpeg' | wc -l) Kermany films (demo/README.md). Where to look next:
  run folder   $RUN_DIR (checkpoints, history.json, figures, predictions.csv)
  evaluation   $RUN_DIR/test_evaluation.json (test split: AUROC, balanced accuracy, bootstrap interval)
  MLflow       $MLFLOW_UI   (experiment cxr-dist-demo, model cxr-dist-demo@best, http://127.0.0.1:5000)
  your data    ./run.sh /path/to/chest-xrays-indiana-university   (README.md)
MSG
        ;;
    -h | --help) usage 0 ;;
    -*) usage 2 "$1 is not a folder; config overrides for the demo go after --: ./run.sh -- $*" ;;
    *)  # the user's IU X-ray copy
        DATA="$1"
        [ -f "$DATA/indiana_reports.csv" ] || usage 2 "\"$DATA\" has no indiana_reports.csv"
        shift
        CONFIG="${CONFIG:-configs/iu_xray_cached.toml}"
        RUN_DIR="$OUT/runs/$(basename "$CONFIG" .toml)"
        main_job "$OUT/shards" --data "$DATA" -- "$@"
        echo "done: $RUN_DIR (checkpoints, figures, evaluation); MLflow: $MLFLOW_UI"
        ;;
esac

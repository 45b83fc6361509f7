#!/usr/bin/env bash
# DenseNet-121, both phases, on IU X-ray (docs/results.md, "DenseNet-121, both phases"): the
# schedule of configs/iu_xray_cached.toml on another timm family, timed. No package ships
# DenseNet-121 ImageNet weights offline (docs/training.md, "Other backbones"), so without
# WEIGHTS=/path/to/densenet121.safetensors the backbone starts from random init: the run then
# measures that both phases work at full scale and what they cost, not what DenseNet can score.
#
#   bash bench/densenet_run.sh                     # OUT=out/densenet; SHARDS=prepared IU shards
set -euo pipefail
# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"  # train_timed RUN_DIR NAME [overrides...]: one timed run
cd "$(dirname "$0")/.."
OUT="${OUT:-out/densenet}"
SHARDS="${SHARDS:-$OUT/shards}"
CFG=configs/iu_xray_cached.toml
BIN=.venv/bin
mkdir -p "$OUT"
[ -f "$SHARDS/index.json" ] || "$BIN/cxr-dist" prepare --config "$CFG" --data "${IU_DIR:-../shared/data/iu_xray_small}" \
    --out "$SHARDS"
if [ -n "${WEIGHTS:-}" ]; then W=(--model.weights "$WEIGHTS"); else W=(--model.pretrained false --model.weights ""); fi
# Phase 2 trains denseblock4 whole (16 dense layers + norm5: 2,423,554 parameters with the head,
# about what EfficientNet-B1's last block trains); from random init the backbone's rate is the head's.
PHASES='[{name = "head", epochs = 15, unfreeze_blocks = 0, lr = 1e-3},
         {name = "finetune", epochs = 25, unfreeze_blocks = 16, lr = 1e-3, backbone_lr = 1e-3}]'
# Run directory OUT/run, log OUT/run.log, "densenet121: N s" appended to OUT/times.txt.
train_timed "$OUT/run" densenet121 --model.backbone densenet121 "${W[@]}" \
    --train.phases "$PHASES" --train.cache_views 1 --selection.early_stop_patience 3

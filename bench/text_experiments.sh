#!/usr/bin/env bash
# Image + report on IU X-ray (docs/results.md, "Image + report"): the text audit, then five runs on
# the same shards, seed and schedule (configs/iu_text.toml: IU trained on, Kermany held out as an
# external source without text), and the paired AUROC gains over the image-only run.
#
#   bash bench/text_experiments.sh                 # OUT=out/text; RUNS="image image_text ..." picks runs
#   RUNS="text_tuned text_lora" bash bench/text_experiments.sh   # the text encoder trained (not by default)
#   RUNS=image_text_late bash bench/text_experiments.sh           # late fusion in one model (model.fusion)
#
# With the image and text runs done it also fuses them late into one checkpoint (`cxr-dist fuse`: the
# weight picked on val) in OUT/runs/late_fusion, which the paired tables compare too.
#
# The runs share one frozen-compute cache and one text-embedding cache (OUT/cache).
set -euo pipefail
# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"  # run NAME [overrides...]: one timed run in OUT/runs/NAME
cd "$(dirname "$0")/.."
OUT="${OUT:-out/text}"
SHARDS="${SHARDS:-$OUT/shards}"
RUNS="${RUNS:-image image_text image_text_late report_sup text leak}"
CFG=configs/iu_text.toml
BIN=.venv/bin
mkdir -p "$OUT/runs"
[ -f "$SHARDS/index.json" ] || "$BIN/cxr-dist" prepare --config "$CFG" --out "$SHARDS"
"$BIN/cxr-dist" audit-text --shards "$SHARDS" --fields indication comparison | tee "$OUT/audit.txt"

HEAD='{name = "head", epochs = 5, unfreeze_blocks = 0, lr = 1e-3}'  # configs/iu_text.toml's phase, shorter
for name in $RUNS; do
    case "$name" in
        image) run image --model.kind image ;;
        image_text) run image_text ;;                                        # + indication, comparison
        image_text_late) run image_text_late --model.fusion late ;;          # the same, fused late
        report_sup) run report_sup --model.kind image --model.report_supervision 0.5 ;;
        text) run text --model.kind text ;;
        leak) run leak --loader.text_fields '["findings", "impression"]' --loader.allow_label_leakage true ;;
        # The head on cached embeddings for 5 epochs (image_text's best validation epoch: the head
        # overfits after it), then 5 with the text encoder training: its last two layers whole, or
        # LoRA adapters (rank 8) on its attention; the CNN stays frozen.
        text_tuned) run text_tuned --train.phases "[$HEAD, {name = \"text\", epochs = 5, unfreeze_blocks = 0, unfreeze_text_layers = 2, lr = 1e-4, text_lr = 2e-5}]" ;;
        text_lora) run text_lora --model.text_lora_rank 8 \
            --train.phases "[$HEAD, {name = \"lora\", epochs = 5, unfreeze_blocks = 0, text_lora = true, lr = 1e-4, text_lr = 5e-4}]" ;;
        *) echo "unknown run $name" >&2; exit 2 ;;
    esac
done
if [ -f "$OUT/runs/image/predictions.csv" ] && [ -f "$OUT/runs/text/predictions.csv" ] \
        && [ ! -e "$OUT/runs/late_fusion" ]; then
    "$BIN/cxr-dist" fuse "$OUT/runs/image" "$OUT/runs/text" --out "$OUT/runs/late_fusion" | tee "$OUT/late_fusion.md"
fi
others=()
for name in image_text image_text_late late_fusion text_tuned text_lora report_sup text leak; do [ -f "$OUT/runs/$name/predictions.csv" ] && others+=("$OUT/runs/$name"); done
echo "## IU test, against the image-only run" | tee "$OUT/paired.md"
"$BIN/cxr-dist" compare --paired "$OUT/runs/image" "${others[@]}" | tee -a "$OUT/paired.md"
echo "## Kermany (external, no text), against the image-only run" | tee -a "$OUT/paired.md"
"$BIN/cxr-dist" compare --paired "$OUT/runs/image" "${others[@]}" --split external | tee -a "$OUT/paired.md"

#!/usr/bin/env bash
# Findings against one flag (docs/results.md, "Findings"): the same shards (IU X-ray prepared with
# NIH's 14 findings), seed and schedule (configs/iu_xray_cached.toml), trained as the binary model
# (train.findings_weight 0: no findings head) and with the findings head; the paired AUROC gain of
# the abnormal output on IU test, and the per-finding table of the findings run.
#
#   bash bench/findings_experiments.sh              # OUT=out/findings; RUNS="binary multi" picks runs
#   SOURCES=iu_kermany bash bench/findings_experiments.sh   # IU + Kermany (pneumonia as a finding)
#
# The runs share one frozen-compute cache (OUT/cache): the frozen part is computed once.
set -euo pipefail
# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"  # run NAME [overrides...]: one timed run in OUT/runs/NAME
cd "$(dirname "$0")/.."
SOURCES="${SOURCES:-iu}"
OUT="${OUT:-out/findings-$SOURCES}"
SHARDS="${SHARDS:-$OUT/shards}"
RUNS="${RUNS-binary multi}"  # RUNS="" (set, empty): only the tables of earlier runs
BIN=.venv/bin
case "$SOURCES" in
    iu) CFG=configs/iu_xray_cached.toml; DATA=(--data "${IU_DIR:-../shared/data/iu_xray_small}") ;;
    iu_kermany) CFG=configs/iu_kermany.toml; DATA=() ;;
    *) echo "SOURCES is iu or iu_kermany, not $SOURCES" >&2; exit 2 ;;
esac
mkdir -p "$OUT/runs"
[ -f "$SHARDS/index.json" ] || "$BIN/cxr-dist" prepare --config "$CFG" "${DATA[@]}" --out "$SHARDS" \
    --data.findings '["nih14"]'

for name in $RUNS; do
    case "$name" in
        binary) run binary --train.findings_weight 0 ;;
        multi) run multi ;;
        *) echo "unknown run $name" >&2; exit 2 ;;
    esac
done
{
    echo "## abnormal output on test, paired against the binary model"
    for source in iu $([ "$SOURCES" = iu_kermany ] && echo kermany); do
        echo "### $source"
        "$BIN/cxr-dist" compare --paired "$OUT/runs/binary" "$OUT/runs/multi" --split test --source "$source"
    done
    echo "## per finding and source (multi, test)"
    "$BIN/python" - "$OUT/runs/multi/evaluation.json" <<'EOF'
import json, sys
rep = json.load(open(sys.argv[1]))["test"]["findings"]
print("| finding | source | AUROC [95% CI] | positives / annotated |")
print("|---|---|---|---|")
for name, m in rep["by_finding"].items():
    for source, r in m["by_source"].items():  # one collection at a time: a pooled AUROC mixes them
        ci = r.get("auroc_ci95") or [float("nan")] * 2
        auroc = float("nan") if r["auroc"] is None else r["auroc"]
        print(f"| {name} | {source} | {auroc:.3f} [{ci[0]:.3f}, {ci[1]:.3f}] | {r['n_pos']} / {r['n']} |")
print(f"| macro mean over {len(rep['macro_over'])} (>= {rep['min_positives']} positives) | {rep['macro_auroc']:.3f} | |")
EOF
} | tee "$OUT/results.md"

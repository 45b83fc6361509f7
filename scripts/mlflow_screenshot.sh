#!/usr/bin/env bash
# Reproduce docs/img/mlflow_compare.png (and docs/img/mlflow_metric.png): two short real trainings
# that differ in one hyper-parameter, logged to a real `mlflow server`, shown side by side by
# MLflow's own UI, photographed by headless Chromium.
#
#   apt-get install -y chromium          # Debian's package; any Chromium/Chrome >= 120 works
#   scripts/mlflow_screenshot.sh [WORKDIR]
#
# CPU only, about 3 minutes on 2 cores. WORKDIR (default: a new temporary folder) keeps the
# synthetic data, the shards, the MLflow store and the run folders for a look afterwards.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
BIN="$(dirname "$PY")"
WORK="${1:-$(mktemp -d -t cxr-mlflow-shot-XXXX)}"
OUT="$ROOT/docs/img"
EXP="cxr-dist-compare-demo"
CHROMIUM="${CHROMIUM:-$(command -v chromium || command -v chromium-browser || command -v google-chrome)}"
mkdir -p "$WORK" "$OUT"
echo "work folder: $WORK"

export MLFLOW_DISABLE_TELEMETRY=true OMP_NUM_THREADS=1 ACCELERATE_USE_CPU=true
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
unset MLFLOW_TRACKING_URI

# 1. Synthetic Kaggle-layout data (the test generator, a few more patients) and shards.
if [ ! -f "$WORK/shards/index.json" ]; then
  "$PY" -c "from pathlib import Path; from tests.datagen import make_dataset; \
make_dataset(Path('$WORK/ds'), n_uids=80, size=64)"
  "$BIN/cxr-dist" prepare --config "$ROOT/configs/tiny.toml" --data "$WORK/ds" --out "$WORK/shards"
fi

# 2. A real server, lean settings (docs/tracking.md): 2 processes, healthy in ~5 s.
PORT="$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
URL="http://127.0.0.1:$PORT"
MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false "$BIN/mlflow" server \
  --backend-store-uri "sqlite:///$WORK/mlflow.db" --artifacts-destination "$WORK/mlartifacts" \
  --host 127.0.0.1 --port "$PORT" --workers 1 >"$WORK/server.log" 2>&1 &
SERVER=$!
cleanup() { kill "$SERVER" 2>/dev/null || true; wait "$SERVER" 2>/dev/null || true; }
trap cleanup EXIT
for _ in $(seq 1 120); do curl -sf "$URL/health" >/dev/null && break; sleep 0.5; done
curl -sf "$URL/health" >/dev/null || { echo "mlflow server did not start:"; tail -20 "$WORK/server.log"; exit 1; }

# 3. Two runs, 3 + 2 epochs (so curves show and the phase change is visible), lr 1e-3 vs 3e-3.
sed "s#launch/#$ROOT/launch/#g" "$ROOT/launch/cpu_2proc.yaml" >"$WORK/launch.yaml"
for LR in 1e-3 3e-3; do
  "$BIN/accelerate" launch --config_file "$WORK/launch.yaml" -m cxr_dist.train \
    --config "$ROOT/configs/tiny.toml" --data.shards_dir "$WORK/shards" \
    --train.run_dir "$WORK/runs/head-lr-$LR" --train.resume false \
    --train.phases.0.epochs 3 --train.phases.1.epochs 2 --train.phases.0.lr "$LR" \
    --tracking.uri "$URL" --tracking.experiment "$EXP" --tracking.run_name "head-lr-$LR" \
    >"$WORK/train-$LR.log" 2>&1 || { tail -30 "$WORK/train-$LR.log"; exit 1; }
done

# 4. The UI's own routes (MLflow 3.17: ModelTrackingRoutes.getCompareRunPageRoute / getMetricPageRoute).
read -r EXP_ID RUNS < <("$PY" - "$URL" "$EXP" <<'EOF'
import json, sys, urllib.parse, urllib.request
url, name = sys.argv[1], sys.argv[2]
api = url + "/api/2.0/mlflow/"
exp = json.load(urllib.request.urlopen(api + "experiments/get-by-name?" + urllib.parse.urlencode({"experiment_name": name})))
eid = exp["experiment"]["experiment_id"]
req = urllib.request.Request(api + "runs/search", json.dumps({"experiment_ids": [eid], "order_by": ["attributes.start_time ASC"]}).encode(),
                             {"Content-Type": "application/json"})
runs = [r["info"]["run_id"] for r in json.load(urllib.request.urlopen(req))["runs"]]
print(eid, json.dumps(runs[-2:], separators=(",", ":")))
EOF
)
EXPS="[\"$EXP_ID\"]"
COMPARE="$URL/#/compare-runs?runs=$RUNS&experiments=$EXPS"
METRIC="$URL/#/metric?runs=$RUNS&metric=%22val%2Fauroc%22&experiments=$EXPS&plot_metric_keys=%5B%22val%2Fauroc%22%2C%22train%2Fauroc%22%5D&plot_layout=%7B%7D&x_axis=step&y_axis_scale=linear&line_smoothness=1&show_point=true&deselected_curves=%5B%5D&last_linear_y_axis_range=%5B%5D"

shot() {  # shot FILE URL HEIGHT
  local profile; profile="$(mktemp -d)"
  "$CHROMIUM" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
    --disable-background-networking --disable-component-update --disable-sync \
    --hide-scrollbars --user-data-dir="$profile" --window-size="1600,$3" \
    --virtual-time-budget="${BUDGET_MS:-20000}" --screenshot="$1" "$2" >/dev/null 2>&1
  rm -rf "$profile"
  echo "$1: $(stat -c %s "$1") bytes"
}
shot "$OUT/mlflow_compare.png" "$COMPARE" 2050
shot "$OUT/mlflow_metric.png" "$METRIC" 900
# A fresh browser profile on a local server opens MLflow's "Assistant" side panel (right ~400 px):
# crop it away, and the compare page below its Metrics table (artifact previews, empty here).
"$PY" - "$OUT" <<'EOF'
import sys
from pathlib import Path
from PIL import Image
for name, box in {"mlflow_compare.png": (0, 0, 1190, 2030), "mlflow_metric.png": (0, 0, 1190, 900)}.items():
    path = Path(sys.argv[1]) / name
    Image.open(path).convert("RGB").crop(box).save(path, optimize=True)
    print(f"{path}: {path.stat().st_size} bytes after cropping")
EOF
echo "compare page: $COMPARE"

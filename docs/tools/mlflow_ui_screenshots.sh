#!/bin/bash
# What a user sees in the MLflow UI, as headless Chromium renders it: a short charseg run
# (validation, held-out pages, registration) into a throw-away sqlite store, `mlflow ui`
# on it, then screenshots of the run's Overview and System metrics and of the registered
# version. Needs `apt-get install chromium` and the project's venv.
#   docs/tools/mlflow_ui_screenshots.sh [WORK_DIR]   -> WORK_DIR/shots/{overview,system,model}.png
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
WORK="$(mkdir -p "${1:-/tmp/charseg-ui}" && cd "${1:-/tmp/charseg-ui}" && pwd)"
PORT="${PORT:-5077}"
source "$ROOT/.venv/bin/activate"
cd "$WORK"
rm -rf store data held out shots && mkdir -p store shots
export MLFLOW_TRACKING_URI="sqlite:///$WORK/store/mlflow.db" MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL=2
charseg -q generate data --layout lines --num-images 16 --size 160x160 --chars-per-image 10-40 --font-size 14-28 --seed 3
charseg -q generate held --held-out --num-images 4 --seed 2026
(cd "$ROOT" && charseg train "$WORK/data" --weights none --backbone resnet18 --norm group --fpn-channels 64 \
  --mask-pixels --lr-schedule cosine --lr 0.02 --epochs 3 --min-size 160 --max-size 160 --roi-samples 64 \
  --rpn-proposals-train 200 --val-fraction 0.25 --heldout-dir "$WORK/held" --output-dir "$WORK/out" \
  --experiment-name charseg-demo --register-as charseg-demo) > train.log 2>&1
RUN=$(grep -o "MLflow run [0-9a-f]*" train.log | awk '{print $3}')
EXP=$(python -c "from mlflow import MlflowClient; print(MlflowClient().get_run('$RUN').info.experiment_id)")
mlflow ui --backend-store-uri "$MLFLOW_TRACKING_URI" --host 127.0.0.1 --port "$PORT" > ui.log 2>&1 &
UI=$!
trap 'kill $UI' EXIT
for _ in $(seq 1 60); do curl -s -o /dev/null "http://127.0.0.1:$PORT/" && break; sleep 1; done
shoot() { chromium --headless=new --no-sandbox --disable-gpu --hide-scrollbars --window-size="1500,$3" \
  --virtual-time-budget=20000 --screenshot="shots/$1.png" "$2" > /dev/null 2>&1; }
shoot overview "http://127.0.0.1:$PORT/#/experiments/$EXP/runs/$RUN" 1700
shoot system "http://127.0.0.1:$PORT/#/experiments/$EXP/runs/$RUN/system-metrics" 1100
shoot model "http://127.0.0.1:$PORT/#/models/charseg-demo/versions/1" 1000
ls "$WORK/shots"

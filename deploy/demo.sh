#!/usr/bin/env bash
# The main job on the bundled Wikipedia data, from nothing: Python environment, a local
# Apache Kafka (KRaft) on 127.0.0.1, the topics, a JODIE model trained on the first 80 % of
# the events, then the rest streamed through the pipeline (produce → router → worker) with
# live recommendations, and the model's offline figures on the same events.
# The broker keeps running afterwards; the script prints how to stop it.
#   JODIE_DEMO_EPOCHS  training epochs (default 2; `jodie train` alone defaults to 10)
#   JODIE_DEMO_EVENTS  events streamed after the training data (default 2000)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=$(bash "$ROOT/deploy/bootstrap.sh")
export PATH="$VENV/bin:$PATH"
cd "$ROOT"
# The demo's topics and worker state have their own prefix and folder, reset on every run.
export JODIE_TOPIC_PREFIX=${JODIE_TOPIC_PREFIX:-demo-}
export JODIE_STATE_DIR=${JODIE_STATE_DIR:-$ROOT/runs/demo/state}
EPOCHS=${JODIE_DEMO_EPOCHS:-2}
EVENTS=${JODIE_DEMO_EVENTS:-2000}
MODEL=$ROOT/runs/demo/model
rm -rf "$JODIE_STATE_DIR"

echo "== broker";   jodie broker up
echo "== topics";   jodie topics delete --yes && jodie topics apply
echo "== train ($EPOCHS epochs on the first 80 %)"
jodie train --epochs "$EPOCHS" --out "$MODEL"
START=$(python -c "import json,sys; print(json.load(open(sys.argv[1]))['log_offsets']['events'])" "$MODEL/checkpoint.json")
echo "== produce $EVENTS events after the model's $START"
jodie produce --start "$START" --limit "$EVENTS"
echo "== router";   jodie router --until-idle 2
echo "== worker (serving $MODEL)"
jodie worker --checkpoint "$MODEL" > "$ROOT/runs/demo/worker.log" 2>&1 &
WORKER=$!
trap 'kill $WORKER 2>/dev/null || true; wait $WORKER 2>/dev/null || true' EXIT
for _ in $(seq 1 600); do
  N=$(jodie recommendations 2>/dev/null | wc -l)
  echo -ne "\r   recommendations committed: $N / $EVENTS"
  [ "$N" -ge "$EVENTS" ] && break
  sleep 2
done
echo
echo "== a few live recommendations"
jodie recommendations --limit 5
echo "== the same model offline on the test split (frozen weights, exact replay)"
jodie evaluate --checkpoint "$MODEL" --protocol frozen --split test
echo
echo "The broker is still running. Stop it with: $VENV/bin/jodie broker down"

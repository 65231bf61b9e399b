#!/usr/bin/env bash
# The main job on the bundled Wikipedia data, from nothing: Python environment, a local
# Apache Kafka (KRaft) on 127.0.0.1, the topics, a JODIE model trained on the first 80 % of
# the events, then the remaining 20 % streamed live through the pipeline (produce → router →
# workers) with recommendations and the online MRR, next to the same model offline.
# The broker keeps running afterwards; the script prints how to stop it.
#   JODIE_DEMO_EPOCHS   training epochs (default 2; `jodie train` alone defaults to 10)
#   JODIE_DEMO_EVENTS   events streamed after the training data (default: all the rest)
#   JODIE_DEMO_WORKERS  streaming workers (default 2)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=$(bash "$ROOT/deploy/bootstrap.sh")
export PATH="$VENV/bin:$PATH"
cd "$ROOT"
# The demo's topics and worker state have their own prefix and folder, reset on every run.
export JODIE_TOPIC_PREFIX=${JODIE_TOPIC_PREFIX:-demo-}
export JODIE_STATE_DIR=${JODIE_STATE_DIR:-$ROOT/runs/demo/state}
export JODIE_MODEL_STORE=${JODIE_MODEL_STORE:-$ROOT/runs/demo/store}
EPOCHS=${JODIE_DEMO_EPOCHS:-2}
WORKERS=${JODIE_DEMO_WORKERS:-2}
MODEL=$ROOT/runs/demo/model
LOGS=$ROOT/runs/demo
rm -rf "$JODIE_STATE_DIR"
mkdir -p "$LOGS"

echo "== broker";   jodie broker up
echo "== topics";   jodie topics delete --yes && jodie topics apply
echo "== train ($EPOCHS epochs on the first 80 %)"
jodie train --epochs "$EPOCHS" --out "$MODEL"
START=$(python -c "import json,sys; print(json.load(open(sys.argv[1]))['log_offsets']['events'])" "$MODEL/checkpoint.json")
TOTAL=$(python -c "from operators.dataset import bundled_wikipedia, load_interactions; print(len(load_interactions(bundled_wikipedia())))")
EVENTS=${JODIE_DEMO_EVENTS:-$((TOTAL - START))}

# The pipeline runs first and waits; then the events arrive, as they would in production.
PIDS=()
stop_all() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap stop_all EXIT
echo "== announce the model on the models topic and promote it"
jodie models announce "$MODEL" --promote > /dev/null
jodie models list
echo "== router and $WORKERS workers (serving the promoted version; logs in $LOGS)"
jodie router --grace 0.2 --model jodie > "$LOGS/router.log" 2>&1 &
PIDS+=($!)
for ((n = 0; n < WORKERS; n++)); do
  jodie worker --id "$n" --model jodie > "$LOGS/worker-$n.log" 2>&1 &
  PIDS+=($!)
done
echo "== produce $EVENTS events after the model's first $START"
jodie produce --after "$MODEL" --limit "$EVENTS"
BEGAN=$(date +%s)
for _ in $(seq 1 900); do
  LINE=$(jodie metrics --workers "$WORKERS" 2>/dev/null || true)
  N=$(python -c "import json,sys; print(json.loads(sys.argv[1] or '{}').get('events', 0))" "$LINE" 2>/dev/null || echo 0)
  # An event is evaluated once every item's state at it has reached its user's worker: a
  # little after its recommendation, so wait for the last evaluations too.
  P=$(python -c "import json,sys; print(json.loads(sys.argv[1] or '{}').get('evaluation_pending', 1))" "$LINE" 2>/dev/null || echo 1)
  echo "   $LINE"
  [ "$N" -ge "$EVENTS" ] && [ "$P" -eq 0 ] && break
  sleep 5
done
echo "   streamed in $(( $(date +%s) - BEGAN )) s"
echo "== a few live recommendations"
jodie recommendations --limit 5
echo "== what a read_committed consumer saw (MRR / Recall@10 from the evaluations topic;"
echo "   served: each event's item in the list its user got before it, and the heuristic's)"
jodie recommendations --summary
stop_all
trap - EXIT
echo "== the same model offline on the same events (frozen weights, the default ranker the"
echo "   workers serve; then the test split next to plain JODIE and the two baselines)"
jodie evaluate --checkpoint "$MODEL" --protocol frozen --split valid
jodie evaluate --checkpoint "$MODEL" --protocol frozen --split test --compare
# What to export to use what the demo left (README, "After the demo"): every variable it set,
# and the broker's ports as the settings resolved them.
PORTS=$(python -c "from streams.settings import get_settings as g; s = g(); print(f'JODIE_BROKER_PORT={s.broker_port} JODIE_CONTROLLER_PORT={s.controller_port}')")
q() { printf %q "$1"; }
echo
echo "The broker is still running, with the demo's topics, models and state. To use them:"
echo "  cd $(q "$ROOT")"
echo "  export PATH=$(q "$VENV/bin"):\$PATH"
echo "  export JODIE_TOPIC_PREFIX=$(q "$JODIE_TOPIC_PREFIX") JODIE_MODEL_STORE=$(q "$JODIE_MODEL_STORE") JODIE_STATE_DIR=$(q "$JODIE_STATE_DIR") $PORTS"
echo "  jodie recommendations --user 1087 --limit 3   # more in README.md, \"After the demo\""
echo "Stop the broker with:"
echo "  $PORTS $(q "$VENV/bin/jodie") broker down"

#!/usr/bin/env bash
# The main job on the bundled Wikipedia data, from nothing: Python environment, a local
# Apache Kafka (KRaft) on 127.0.0.1, the topics, every event produced as Avro, then a look
# at what landed in the topic. The broker keeps running afterwards; stop it with
# `jodie broker down` (the script prints the full command).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=$(bash "$ROOT/deploy/bootstrap.sh")
export PATH="$VENV/bin:$PATH"
cd "$ROOT"
# The demo's topics have their own prefix, reset on every run, so re-runs start clean.
export JODIE_TOPIC_PREFIX=${JODIE_TOPIC_PREFIX:-demo-}

echo "== broker";   jodie broker up
echo "== topics";   jodie topics delete --yes && jodie topics apply
echo "== produce";  jodie produce "${1:-$ROOT/data/wikipedia.csv.gz}"
echo "== what is in the topic"
jodie topics show interactions --sample 2 --count
echo
echo "The broker is still running. Stop it with: $VENV/bin/jodie broker down"

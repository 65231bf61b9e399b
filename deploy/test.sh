#!/usr/bin/env bash
# Runs every check of jodie-stream: lint, types, unit tests and integration tests against a
# real local Apache Kafka (KRaft) that this script starts and always stops. Extra arguments
# go to pytest (e.g. `bash deploy/test.sh -k codec`).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=$(bash "$ROOT/deploy/bootstrap.sh")
export PATH="$VENV/bin:$PATH"
cd "$ROOT"

# A port pair of its own, so the tests never touch a broker a developer runs on 9092.
export JODIE_BROKER_PORT=${JODIE_TEST_BROKER_PORT:-19092}
export JODIE_CONTROLLER_PORT=$((JODIE_BROKER_PORT + 1))
unset JODIE_BOOTSTRAP JODIE_TOPIC_PREFIX

echo "== ruff"; ruff check .
echo "== mypy"; mypy operators schemas deploy streams

jodie broker up
trap 'jodie broker down --purge' EXIT
echo "== pytest"
python -m pytest "$@"

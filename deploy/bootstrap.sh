#!/usr/bin/env bash
# Creates or reuses the Python environment of jodie-stream and prints its path on stdout.
# The environment lives outside the checkout, keyed by the dependency spec, so a re-run (or
# another clone) downloads nothing; a fresh machine gets everything from PyPI. Java 17 and
# Maven (needed by the local Kafka broker) are installed with apt when missing and allowed.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${JODIE_CACHE_DIR:-$HOME/.cache/jodie}
PY=${JODIE_PYTHON:-python3}
log() { echo "[bootstrap] $*" >&2; }

if ! command -v java >/dev/null || ! command -v mvn >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    log "installing Java 17 and Maven with apt"
    apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openjdk-17-jre-headless maven >&2
  else
    log "Java 17+ and Maven are required (e.g. apt-get install openjdk-17-jre-headless maven)"
    exit 1
  fi
fi

"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { log "Python 3.11+ required ($PY)"; exit 1; }

# Key: Python version + the declared dependencies (not the whole pyproject, so editing tool
# settings does not rebuild a multi-GB environment).
KEY=$("$PY" - "$ROOT/pyproject.toml" <<'PYEOF'
import hashlib, json, sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
spec = {"python": sys.version_info[:2], "deps": project["dependencies"],
        "extras": project.get("optional-dependencies", {})}
print(hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12])
PYEOF
)
VENV=${JODIE_VENV:-$CACHE/venv-$KEY}

if [ ! -f "$VENV/.complete" ]; then
  log "creating $VENV (first run: downloads PyTorch and friends, several minutes)"
  rm -rf "$VENV"
  mkdir -p "$CACHE"
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip >&2
  "$VENV/bin/pip" install -q -e "$ROOT[test]" >&2
  touch "$VENV/.complete"
else
  # Point the environment at this checkout (cheap: no dependency is touched).
  "$VENV/bin/pip" install -q --no-deps --no-build-isolation -e "$ROOT" >&2
fi
echo "$VENV"

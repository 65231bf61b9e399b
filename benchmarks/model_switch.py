"""Time from announcement to switch, and the serving gap, on the Wikipedia history.

A live pipeline (router --model, N workers --model, a producer streaming the bundled file at
--rate events/s) serves v1, trained from the log's first --history rows. While the stream
runs, v2 is trained on the whole log as it then is, announced and promoted; later v1 is
rolled back to (its catch-up then replays everything since its own training). For each
switch it prints:

- promotion → the router's first event of the new epoch (the switch delay) and → the first
  recommendation by the new version;
- each worker's catch-up (events replayed, seconds) and how long its stream waited for it
  (the serving gap: 0 when the catch-up finished within the switch delay);
- produce → recommendation latency of the events just before and just after the switch,
  against the steady state (Kafka timestamps of the input event and of its recommendation).

    jodie broker up
    python benchmarks/model_switch.py [--rate 60] [--delay 10] [--epochs 1]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from operators.dataset import bundled_wikipedia, load_interactions
from operators.model.config import TrainConfig
from schemas import INTERACTION, RECOMMENDATION, Codec
from streams.children import Child, spawn, stop_children_on_sigterm
from streams.cli.common import script_main
from streams.codecs import make_codec
from streams.models import Registry
from streams.peek import Bounded
from streams.produce import produce_rows
from streams.router import read_log
from streams.runtime.clients import committed_reader
from streams.settings import Settings
from streams.topics import scratch_topics
from streams.trainer import log_size, train_once

PORT = 17366


def _timed(settings: Settings, topic: str) -> list[tuple[bytes, int]]:
    """(value, Kafka timestamp in ms) of every committed message of ``topic``."""
    consumer = committed_reader(settings, group_id=f"jodie-bench-{uuid.uuid4().hex[:8]}")
    out = []
    try:
        bounded = Bounded(consumer, topic)
        while bounded.pending:
            messages = bounded.take(5000, 10.0)
            if messages is None:
                break
            out += [(m.value(), m.timestamp()[1]) for m in messages if m.value() is not None]
    finally:
        consumer.close()
    return out


def _wait(what: str, done: Any, timeout_s: float, step_s: float = 1.0) -> float:
    began = time.monotonic()
    while time.monotonic() - began < timeout_s:
        if done():
            return time.monotonic() - began
        time.sleep(step_s)
    raise TimeoutError(f"{what}: not within {timeout_s:.0f} s")


def _metrics(workers: int) -> list[dict[str, Any]]:
    """Every worker's /metrics.json page (fewer while some do not answer)."""
    pages = []
    for n in range(workers):
        url = f"http://127.0.0.1:{PORT + n}/metrics.json"
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                pages.append(json.loads(r.read()))
        except OSError:
            continue
    return pages


def _serving(workers: int, version: str) -> bool:
    pages = _metrics(workers)
    return len(pages) == workers and all(
        p["epochs"] and p["epochs"][-1]["version"] == version for p in pages
    )


def _pct(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    a = np.asarray(values)
    return {
        "n": len(values),
        "p50_ms": round(float(np.percentile(a, 50)), 1),
        "p99_ms": round(float(np.percentile(a, 99)), 1),
        "max_ms": round(float(a.max()), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--history", type=float, default=0.5, help="share routed before v1")
    parser.add_argument("--rate", type=float, default=60.0, help="events/s while switching")
    parser.add_argument("--delay", type=float, default=10.0, help="JODIE_SWITCH_DELAY_S")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=1, help="training epochs per version")
    parser.add_argument("--settle", type=float, default=20.0, help="seconds between stages")
    args = parser.parse_args()
    stop_children_on_sigterm()

    n_rows = len(load_interactions(bundled_wikipedia()))
    history = int(n_rows * args.history)
    tmp = Path(tempfile.mkdtemp(prefix="jodie-switch-"))
    os.environ.update(
        {
            "JODIE_STATE_DIR": str(tmp / "state"),
            "JODIE_MODEL_STORE": str(tmp / "store"),
            "JODIE_SWITCH_DELAY_S": str(args.delay),
            "JODIE_WEB_PORT": str(PORT),
        }
    )
    config = TrainConfig(epochs=args.epochs)
    procs: list[Child] = []
    report: dict[str, Any] = {"history": history, "rate": args.rate, "delay_s": args.delay}
    with scratch_topics("switch") as settings:
        registry = Registry(settings)
        logs = tmp / "logs"
        logs.mkdir()

        def start(name: str, *cmd: str) -> None:
            procs.append(spawn(name, cmd, logs, append=True))

        try:
            start("router", "router", "--model", "jodie")
            topic = settings.topic("interactions")
            produce_rows(settings, limit=history)
            _wait("routing the history", lambda: log_size(settings) >= history, 600)
            v1 = train_once(settings, config, margin=1.0)
            report["v1"] = {"log_seq": v1.record["log_seq"]}
            for w in range(args.workers):
                start(f"worker{w}", "worker", "--model", "jodie", "--id", str(w))
            start(
                "producer",
                "produce",
                "--start",
                str(history),
                "--rate",
                str(args.rate),
            )
            _wait("the workers serving v1", lambda: _serving(args.workers, "v1"), 600)
            time.sleep(args.settle)

            stages = []
            for stage in ("v2", "rollback"):
                announced = time.time()
                if stage == "v2":
                    run = train_once(settings, config, margin=1.0)  # announce + promote
                    version = str(run.record["version"])
                    announced = run.record["created_at_ms"] / 1000
                else:
                    version = str(registry.rollback()["version"])
                promoted = time.time()
                _wait(
                    f"{stage}: the workers serving {version}",
                    lambda v=version: _serving(args.workers, v),
                    600,
                )
                time.sleep(args.settle)
                pages = _metrics(args.workers)
                stages.append(
                    {
                        "stage": stage,
                        "version": version,
                        "announced_at": announced,
                        "promoted_at": promoted,
                        "workers": [p["epochs"][-1] for p in pages],
                    }
                )
        finally:
            # All told at once (the last started first), so they stop in parallel.
            for child in reversed(procs):
                if child.alive():
                    child.proc.send_signal(signal.SIGTERM)
            for child in procs:
                child.stop()

        seq_of = {}
        for e in read_log(settings):
            seq_of[e.event.event_id] = e.seq
        sent = {}
        in_codec = make_codec(settings, INTERACTION, topic)
        for value, ts in _timed(settings, topic):
            sent[in_codec.decode(value)["event_id"]] = ts
        rec_codec = Codec(RECOMMENDATION)
        recs = []
        for value, ts in _timed(settings, settings.topic("recommendations")):
            r = rec_codec.decode(value)
            recs.append((seq_of[r["event_id"]], r["model_version"], ts - sent[r["event_id"]], ts))
        recs.sort()
        report["recommendations"] = len(recs)
        report["distinct_events"] = len({s for s, *_ in recs})

    for st in stages:
        version = st["version"]
        since = st["workers"][0]["since"]
        after = [r for r in recs if r[0] >= since]
        before = [r for r in recs if r[0] < since]
        assert all(r[1] == version for r in after[: 10 * args.workers]), "wrong version served"
        first_new_ts = min((r[3] for r in after), default=None)
        st["epoch_since"] = since
        st["promotion_to_first_new_recommendation_s"] = (
            round(first_new_ts / 1000 - st["promoted_at"], 2) if first_new_ts else None
        )
        st["announcement_to_first_new_recommendation_s"] = (
            round(first_new_ts / 1000 - st["announced_at"], 2) if first_new_ts else None
        )
        st["latency_steady_before"] = _pct([r[2] for r in before[-2000:-200]])
        st["latency_last_200_before"] = _pct([r[2] for r in before[-200:]])
        st["latency_first_200_after"] = _pct([r[2] for r in after[:200]])
        st["catch_up"] = [
            {k: w[k] for k in ("replayed", "catch_up_s", "waited_s")} for w in st["workers"]
        ]
        del st["workers"], st["announced_at"], st["promoted_at"]
    report["stages"] = stages
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    script_main(main)

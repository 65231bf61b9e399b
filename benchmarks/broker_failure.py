"""Broker failure: a broker killed with SIGKILL mid-stream and restarted; how the pipeline recovers.

A local broker of its own (--port; with --nodes 3 a three-node cluster, see `jodie broker up
--nodes`), the router and one worker as processes (as an operator runs them), --events rows of
the bundled Wikipedia file after the checkpoint's produced at --rate events/s. --kill-at
seconds in, one broker is killed with SIGKILL (with --nodes 3: node --victim, by default the
workers' group coordinator), kept down --down seconds and started again as `jodie broker up`
does. A read_committed consumer follows
`recommendations` throughout. Prints:

- restart: how long the restarted broker took to answer metadata requests;
- recovery: from then to the first recommendation committed after the kill, as that consumer
  received it (a recommendation created after the kill can only commit after the restart);
- the longest gap between recommendations, and the whole stall (kill → first new one);
- events without a recommendation (lost) and with more than one (duplicated); exit 1 unless
  both are 0.

    python benchmarks/broker_failure.py --checkpoint CKPT [--nodes 1|3] [--events 6000]
        [--rate 300] [--kill-at 8] [--down 3] [--victim N] [--grace S]

CKPT: any checkpoint whose states end at a row of the bundled file, e.g. the tests' small one
(tests/streams/harness.py `make_checkpoint`).
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from deploy.kafka import broker, cluster
from operators.dataset import bundled_wikipedia, iter_rows
from operators.model.checkpoint import load_checkpoint
from schemas import INTERACTION
from schemas.codec import Codec
from streams.children import Child, spawn, stop_children_on_sigterm
from streams.cli.common import script_main
from streams.codecs import TOPIC_SCHEMAS, make_codec
from streams.produce import event_id, produce_file, source_tag
from streams.runtime.clients import committed_reader, idempotent_producer
from streams.settings import Settings, read_settings
from streams.topics import scratch_topics

_RECOVERY_WORDS = ("retrying", "replacing", "starting over", "aborted", "resumed from", "hung")


@dataclass
class Follower:
    """A read_committed consumer of `recommendations` in a thread: (received at, created at,
    event id) of each, in wall-clock seconds."""

    settings: Settings
    seen: list[tuple[float, float, str]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        topic = self.settings.topic("recommendations")
        codec = Codec(TOPIC_SCHEMAS["recommendations"])
        consumer = committed_reader(
            self.settings, f"failure-follow-{uuid.uuid4().hex[:8]}", **{"fetch.wait.max.ms": 10}
        )
        consumer.subscribe([topic])
        try:
            while not self.stop.is_set():
                msg = consumer.poll(0.2)
                if msg is None or msg.error() is not None:
                    continue
                created = msg.timestamp()[1] / 1000.0
                rec = codec.decode(msg.value() or b"")
                self.seen.append((time.time(), created, str(rec["event_id"])))
        finally:
            consumer.close()


def _wait_ready(logs: Path, procs: list[Child], timeout_s: float = 120) -> None:
    """Until the router says it is ready and the worker holds its partitions."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        router = (logs / "router.log").read_text()
        worker = (logs / "worker-0.log").read_text()
        assigned = [line for line in worker.splitlines() if " assigned [" in line]
        if "router ready" in router and assigned and "assigned []" not in assigned[-1]:
            return
        if not all(p.alive() for p in procs):
            break
        time.sleep(0.2)
    raise SystemExit(f"router or worker not ready; see {logs}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--nodes", type=int, choices=(1, 3), default=1)
    parser.add_argument("--events", type=int, default=6000)
    parser.add_argument("--rate", type=float, default=300.0)
    parser.add_argument("--kill-at", type=float, default=8.0, help="seconds into the stream")
    parser.add_argument("--down", type=float, default=3.0, help="seconds the broker stays dead")
    parser.add_argument("--victim", type=int, default=None, help="node to kill (--nodes 3)")
    parser.add_argument("--port", type=int, default=59092, help="client port of (first) node")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument(
        "--grace",
        type=float,
        default=None,
        help="router's --grace; default 0.2 on one node, 8 on a cluster, where it must "
        "outlast a leader failover (else delayed events are rejected as time_backwards)",
    )
    args = parser.parse_args()
    stop_children_on_sigterm()

    scratch = Path(tempfile.mkdtemp(prefix="jodie-broker-failure-"))
    os.environ.update(
        JODIE_BROKER_PORT=str(args.port),
        JODIE_CONTROLLER_PORT=str(args.port + 1),
        JODIE_BROKER_NODES=str(args.nodes),
        JODIE_STATE_DIR=str(scratch / "state"),
        JODIE_WEB_PORT=str(args.port + 1000),
    )
    os.environ.pop("JODIE_BOOTSTRAP", None)
    settings = read_settings()
    nodes = cluster.node_configs(broker.BrokerConfig.from_settings(settings), args.nodes)
    cluster.up(nodes)
    print(f"{args.nodes} node(s) up at {settings.bootstrap_servers}")
    ckpt = load_checkpoint(args.checkpoint)
    start = int(ckpt.meta["log_offsets"]["events"])
    path = bundled_wikipedia()
    tag = source_tag(path)
    rows = list(iter_rows(path))[start : start + args.events]
    wanted = {event_id(tag, r.line) for r in rows}
    procs: list[Child] = []
    try:
        with scratch_topics("fail") as topics:
            follower = Follower(topics)
            follow = threading.Thread(target=follower.run, daemon=True)
            follow.start()
            grace = args.grace if args.grace is not None else (0.2 if args.nodes == 1 else 8.0)
            procs.append(spawn("router", ["router", "--grace", str(grace)], scratch, append=True))
            worker = ["worker", "--checkpoint", str(args.checkpoint), "--id", "0"]
            procs.append(spawn("worker-0", worker, scratch, append=True))
            topic = topics.topic("interactions")
            codec = make_codec(topics, INTERACTION, topic)
            feeder = threading.Thread(
                target=produce_file,
                args=(path, idempotent_producer(topics), codec, topic),
                kwargs={"start": start, "limit": args.events, "rate": args.rate},
                daemon=True,
            )
            _wait_ready(scratch, procs)
            began = time.monotonic()
            feeder.start()
            time.sleep(args.kill_at)
            victim = nodes[0] if args.victim is None else nodes[args.victim]
            if args.nodes > 1 and args.victim is None:
                victim = cluster.pick_victim(nodes, topics, f"{topics.topic_prefix}jodie-workers")
            killed_at = time.time()
            pid = cluster.kill(victim)
            before = len(follower.seen)
            print(f"killed node at {victim.bootstrap} (pid {pid}) after {before} recommendations")
            time.sleep(args.down)
            restart = time.time()
            cluster.up(nodes)  # as `jodie broker up`: waits until it answers metadata requests
            ready = time.time()
            print(f"restart: answering {ready - restart:.1f} s after its start")
            deadline = time.monotonic() + args.timeout
            while len({e for _r, _c, e in follower.seen}) < len(wanted):
                if time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            time.sleep(3.0)  # a duplicate would show now
            follower.stop.set()
            follow.join(timeout=10)
            feeder.join(timeout=10)
            seen = list(follower.seen)
            exited = [p.name for p in procs if not p.alive()]
    finally:
        for proc in procs:
            proc.stop()
        cluster.down(nodes, purge=True)
    took = time.monotonic() - began
    counts = Counter(e for _r, _c, e in seen)
    lost = len(wanted - set(counts))
    duplicated = sum(1 for n in counts.values() if n > 1)
    new = [received for received, created, _e in seen if created > killed_at]
    received = sorted(r for r, _c, _e in seen)
    gap = max((b - a for a, b in itertools.pairwise(received)), default=0.0)
    print(f"recommendations: {len(seen)} for {len(counts)} events of {len(wanted)} ({took:.0f} s)")
    if new:
        print(f"recovery: {min(new) - ready:.1f} s from the broker answering again")
        print(f"stall: {min(new) - killed_at:.1f} s from the kill; longest gap {gap:.1f} s")
    else:
        print("recovery: none; the pipeline did not resume")
    print(f"lost: {lost}, duplicated: {duplicated}; processes that exited: {exited or 'none'}")
    if lost:
        print(f"  without a recommendation: {sorted(wanted - set(counts))[:20]}")
    print(f"logs: {scratch}")
    for name in ("router.log", "worker-0.log"):
        # What the router and the worker did to recover (their own lines, not librdkafka's).
        lines = (scratch / name).read_text().splitlines()
        steps = [line for line in lines if any(w in line for w in _RECOVERY_WORDS)]
        print(f"{name}: {len(steps)} recovery steps")
        for step in steps[:8]:
            print(f"  {step[:200]}")
    sys.exit(0 if new and lost == 0 and duplicated == 0 else 1)


if __name__ == "__main__":
    script_main(main)

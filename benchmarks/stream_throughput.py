"""End-to-end streaming throughput: produce → router → Faust worker(s) → recommendations.

Measures, on the real local broker (`jodie broker up` first), with a checkpoint given by
--checkpoint (its states must cover the first --start events of the bundled Wikipedia file):

- router events/s (interactions → interactions.log + inboxes, exactly once);
- worker events/s: wall time from the first worker start until every event has a committed
  recommendation (read_committed), for --workers processes.

    python benchmarks/stream_throughput.py --checkpoint CKPT --start 3000 --events 2000
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from operators.dataset import bundled_wikipedia
from schemas import INTERACTION
from streams.codecs import make_codec
from streams.kafka import admin, idempotent_producer
from streams.produce import produce_file
from streams.router import Router
from streams.settings import Settings
from streams.tail import tail_recommendations
from streams.topics import apply_topics, declared_topics, delete_topics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--start", type=int, default=3000)
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args()

    prefix = f"bench{uuid.uuid4().hex[:6]}-"
    os.environ["JODIE_TOPIC_PREFIX"] = prefix
    settings = Settings()
    client = admin(settings)
    specs = declared_topics(settings)
    apply_topics(client, specs, settings.replication_factor)
    state_dir = Path(tempfile.mkdtemp(prefix="jodie-bench-"))
    workers: list[subprocess.Popen[bytes]] = []
    try:
        topic = settings.topic("interactions")
        produce_file(
            bundled_wikipedia(),
            idempotent_producer(settings),
            make_codec(settings, INTERACTION, topic),
            topic,
            start=args.start,
            limit=args.events,
        )
        began = time.monotonic()
        stats = Router(settings, grace_s=0.2).run(until_idle_s=0.5, max_seconds=args.timeout)
        routed = time.monotonic() - began - 0.5
        rate = stats.sequenced / routed
        print(f"router: {stats.sequenced} events in {routed:.2f} s = {rate:,.0f} events/s")

        env = {**os.environ, "JODIE_STATE_DIR": str(state_dir)}
        began = time.monotonic()
        for w in range(args.workers):
            workers.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "streams",
                        "worker",
                        "--checkpoint",
                        str(args.checkpoint),
                        "--id",
                        str(w),
                    ],
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        seen = 0
        while time.monotonic() - began < args.timeout:
            seen = sum(1 for _ in tail_recommendations(settings, idle_timeout_s=1.0))
            if seen >= args.events:
                break
            time.sleep(0.5)
        took = time.monotonic() - began
        print(
            f"workers ({args.workers}): {seen} recommendations in {took:.1f} s "
            f"(including start-up) = {seen / took:,.1f} events/s"
        )
    finally:
        for proc in workers:
            proc.send_signal(signal.SIGTERM)
        for proc in workers:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        delete_topics(client, [s.name for s in specs])


if __name__ == "__main__":
    main()

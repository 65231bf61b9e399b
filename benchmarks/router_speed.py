"""Router throughput alone: events/s from a pre-produced backlog to the last committed batch.

Each run takes fresh topics (a unique JODIE_TOPIC_PREFIX, deleted at the end) on the local
broker (`jodie broker up` first), produces --events rows of the bundled Wikipedia file (or
--data, a JODIE CSV of the same shape, e.g. one whose events carry features) to
`interactions`, then runs the router in this process until it is idle. Printed per run:

- events/s from the router being ready (clients up, state restored, partitions assigned) to
  its last commit, and from its first commit to its last (the steady rate, without the first
  batch's fill);
- the router's CPU seconds (this process: Python and librdkafka's threads) and what they
  give, events per CPU second: the rate of a router with a core to itself, which the
  wall-clock rate reaches only on an idle machine; the broker's CPU seconds meanwhile;
- the 1-minute load average before and after, since the machine is shared.

With --profile FILE the last run is profiled (cProfile) and the functions with the most own
time are printed, grouped into decode / sequence / encode / Kafka / other shares.

    jodie broker up
    python benchmarks/router_speed.py --events 50000 --runs 3
    python benchmarks/router_speed.py --events 50000 --runs 1 --profile router.prof
    python benchmarks/router_speed.py --events 50000 --runs 3 --data featured.csv
    jodie broker down
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from deploy.kafka.broker import BrokerConfig
from operators.dataset import bundled_wikipedia
from schemas import INTERACTION
from streams.cli.common import script_main
from streams.codecs import make_codec
from streams.produce import produce_file
from streams.router import Router
from streams.runtime.clients import idempotent_producer
from streams.settings import Settings
from streams.topics import scratch_topics

# Where a function's own time goes, by the file it is defined in (cProfile's key).
_SHARES = {
    "decode": ("fastavro", "schemas/codec.py", "_read", "read_"),
    "sequence": ("operators/protocol/", "spill.py", "heapq"),
    "encode": ("_write", "write_", "records.py"),
    "kafka": ("cimpl", "confluent_kafka", "transactions.py", "produce", "flush", "poll"),
}


def broker_cpu(settings: Settings) -> float | None:
    """User + system CPU seconds of the local broker (Linux /proc), None when unknown."""
    try:
        pid = int(BrokerConfig.from_settings(settings).pid_file.read_text().strip())
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def one_run(data: Path, events: int, grace: float, profile: str | None) -> dict[str, Any]:
    with scratch_topics("rs") as settings:
        topic = settings.topic("interactions")
        produced = produce_file(
            data,
            idempotent_producer(settings),
            make_codec(settings, INTERACTION, topic),
            topic,
            limit=events,
        )
        load0 = os.getloadavg()[0]
        router = Router(settings, grace_s=grace)
        ready: list[float] = []
        profiler = cProfile.Profile() if profile else None
        cpu0, broker0 = time.process_time(), broker_cpu(settings)
        if profiler is not None:
            profiler.enable()
        stats = router.run(until_idle_s=0.5, on_ready=lambda: ready.append(time.monotonic()))
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(profile)
        cpu = time.process_time() - cpu0
        broker1 = broker_cpu(settings)
        if stats.sequenced != produced.events:
            raise RuntimeError(f"router sequenced {stats.sequenced} of {produced.events}")
        first, last = stats.first_commit_at, stats.last_commit_at
        assert first is not None and last is not None
        ready_s = last - ready[0]
        return {
            "events": stats.sequenced,
            "events_per_s": stats.sequenced / ready_s,
            "steady_events_per_s": (
                (stats.sequenced - stats.first_batch) / (last - first) if last > first else None
            ),
            "seconds": ready_s,
            "cpu_s": cpu,
            "events_per_cpu_s": stats.sequenced / cpu,
            "broker_cpu_s": None if broker0 is None or broker1 is None else broker1 - broker0,
            "transactions": stats.transactions,
            "load_before": load0,
            "load_after": os.getloadavg()[0],
        }


def print_profile(path: str, top: int) -> None:
    st = pstats.Stats(path)
    rows = st.stats  # type: ignore[attr-defined]
    total = sum(tt for (_cc, _nc, tt, _ct, _callers) in rows.values())
    shares = dict.fromkeys([*_SHARES, "other"], 0.0)
    for (file, _line, name), (_cc, _nc, tt, _ct, _callers) in rows.items():
        where = f"{file}:{name}"
        group = next((g for g, marks in _SHARES.items() if any(m in where for m in marks)), None)
        shares[group or "other"] += tt
    print(
        f"profile: {total:.2f} s of own time; "
        + ", ".join(f"{g} {100 * t / total:.0f} %" for g, t in shares.items())
    )
    st.sort_stats("tottime").print_stats(top)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument(
        "--data", type=Path, default=bundled_wikipedia(), help="a JODIE CSV to produce from"
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--grace", type=float, default=0.05, help="router grace period (s)")
    parser.add_argument("--profile", help="cProfile the last run into this file")
    parser.add_argument("--top", type=int, default=25, help="profile rows to print")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = parser.parse_args()
    if not args.data.is_file():
        parser.error(f"no data file at {args.data}")
    results = []
    for i in range(args.runs):
        profile = args.profile if i == args.runs - 1 else None
        r = one_run(args.data, args.events, args.grace, profile)
        results.append(r)
        steady = r["steady_events_per_s"]
        broker = "?" if r["broker_cpu_s"] is None else f"{r['broker_cpu_s']:.1f}"
        print(
            f"run {i + 1}: {r['events']} events in {r['seconds']:.2f} s = "
            f"{r['events_per_s']:,.0f} events/s (first → last commit "
            f"{'-' if steady is None else f'{steady:,.0f}'} events/s), CPU {r['cpu_s']:.2f} s "
            f"= {r['events_per_cpu_s']:,.0f} events/CPU-s, broker CPU "
            f"{broker} s, "
            f"{r['transactions']} transactions, load {r['load_before']:.2f} → "
            f"{r['load_after']:.2f}",
            file=sys.stderr if args.json else sys.stdout,
            flush=True,
        )
    rates = [r["events_per_s"] for r in results]
    per_cpu = [r["events_per_cpu_s"] for r in results]
    summary = {
        "runs": results,
        "median_events_per_cpu_s": statistics.median(per_cpu),
        "median_events_per_s": statistics.median(rates),
        "min_events_per_s": min(rates),
        "max_events_per_s": max(rates),
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print(
            f"router: median {summary['median_events_per_s']:,.0f} events/s "
            f"(min {summary['min_events_per_s']:,.0f}, max {summary['max_events_per_s']:,.0f}) "
            f"over {args.runs} run(s) of {args.events} events; "
            f"{summary['median_events_per_cpu_s']:,.0f} events per CPU second "
            f"(min {min(per_cpu):,.0f}, max {max(per_cpu):,.0f})"
        )
    if args.profile:
        print_profile(args.profile, args.top)


if __name__ == "__main__":
    script_main(main)

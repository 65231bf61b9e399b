"""Where one worker's time goes: cProfile of a worker applying N Wikipedia events.

On fresh topics of the local broker (`jodie broker up` first), produces and routes rows
[--start, --start + N) of the bundled file, then runs one worker in this process under
cProfile (and a worker process's cycle-collector schedule) until it has applied all of them,
and prints the wall time, the live MRR, the share of the worker loop's CPU each stage took
(cumulative, so a stage includes what it calls; cProfile's own cost inflates the many small
calls) and the functions by cumulative time.

--timers measures without cProfile: each stage's function is wrapped in a timer of its own
thread's CPU (``time.thread_time``: the Kafka client's threads and the commit thread, which
run beside the loop, are not counted in the stages they overlap), and the figures are
microseconds of CPU per event, about what the worker costs when nothing observes it.

    python benchmarks/profile_worker.py --checkpoint CKPT --events 10000
    python benchmarks/profile_worker.py --checkpoint CKPT --events 20000 --timers
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import importlib
import inspect
import os
import pstats
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from streams.cli.common import script_main
from streams.runtime.collector import CycleCollector


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--start", type=int, default=125_979)
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--top", type=int, default=35)
    parser.add_argument("--sort", default="cumulative", help="pstats order: cumulative, tottime")
    parser.add_argument(
        "--timers", action="store_true", help="CPU µs per event of each stage, no cProfile"
    )
    args = parser.parse_args()
    spent = install_timers() if args.timers else None
    os.environ["JODIE_STATE_DIR"] = tempfile.mkdtemp(prefix="jodie-profile-")

    from streams.produce import produce_rows
    from streams.router import Router
    from streams.topics import scratch_topics
    from streams.worker import Worker

    with scratch_topics("prof") as settings:
        produce_rows(settings, start=args.start, limit=args.events)
        Router(settings, grace_s=0.2).run(until_idle_s=0.5, max_seconds=300)
        collector = CycleCollector(settings.gc_full_every_s)
        worker = Worker(settings, 0, args.checkpoint, collector=collector)
        collector.freeze()
        began = time.monotonic()

        def stop_when_done() -> None:
            while worker.stats.user_events < args.events and time.monotonic() - began < 600:
                time.sleep(0.2)
            worker.stop()

        threading.Thread(target=stop_when_done, daemon=True).start()
        profile = cProfile.Profile(time.process_time)
        cpu = time.process_time()
        if spent is None:
            profile.enable()
        worker.run()
        profile.disable()
        took, cpu = time.monotonic() - began, time.process_time() - cpu
        online = worker.stats.ranks.summary()
        events = worker.stats.user_events
        print(
            f"{events} events in {took:.1f} s "
            f"({events / took:,.0f} events/s, start-up included), "
            f"{worker.loop.stats.transactions} transactions, live MRR {online['mrr']:.4f}"
        )
        if spent is not None:
            print(f"the process's CPU, all threads: {1e6 * cpu / max(events, 1):,.0f} µs/event")
            for (what, _module, _name), seconds in zip(TIMED, spent, strict=True):
                print(f"  {1e6 * seconds / max(events, 1):7.1f} µs/event  {what}")
            collector.close()
            return
        stats = pstats.Stats(profile)
        print_stages(stats)
        collector.close()
        stats.sort_stats(args.sort).print_stats(args.top)


#: The worker loop's stages: what, and the (file, function) calls that do it. An indented
#: stage is part of the one above it.
STAGES: list[tuple[str, list[tuple[str, str]]]] = [
    ("decode the inbox messages", [("streams/worker.py", "prepare")]),
    ("the processor, in all", [("streams/app/processor.py", "process")]),
    (
        "  the model: both sides' steps, queries, states",
        [("operators/protocol/exchange.py", "drive")],
    ),
    (
        "  retrieval and ranking of the served lists",
        [("streams/app/serving.py", "recommendations")],
    ),
    ("  live evaluation", [("streams/app/processor.py", "_evaluate")]),
    ("table rows encoded for the changelogs", [("streams/runtime/loop.py", "_send_changes")]),
    ("rows into RocksDB after the commit", [("streams/runtime/loop.py", "_persist")]),
    ("feeds: item vectors, the log for co-occurrence", [("streams/feeds.py", "poll")]),
    (
        "Kafka: offsets and commit",
        [
            ("streams/runtime/transactions.py", "send_offsets"),
            ("streams/runtime/transactions.py", "commit"),
        ],
    ),
]


#: What --timers times: what, and the function (module, class.method). An indented stage is
#: part of the one above it; each counts the CPU of the thread that runs it.
TIMED: list[tuple[str, str, str]] = [
    ("the loop's batches, in all (its thread)", "streams.runtime.loop", "TransactionalLoop._batch"),
    ("  decode the inbox messages", "streams.worker", "Worker.prepare"),
    ("  the processor, in all", "streams.app.processor", "Processor.process"),
    (
        "    the user side: model steps, queries, rows",
        "operators.protocol.sides",
        "StreamModel.apply_users",
    ),
    ("    the item side: model steps, rows", "operators.protocol.sides", "StreamModel.apply_items"),
    (
        "    the served lists: ranked, tallied, their records encoded",
        "streams.app.processor",
        "Processor._recommendations",
    ),
    ("      retrieval and ranking", "streams.app.serving", "Serving.recommendations"),
    ("    live evaluation", "operators.evaluation.live", "LiveRanks.ready"),
    (
        "  table rows encoded for the changelogs",
        "streams.runtime.loop",
        "TransactionalLoop._send_changes",
    ),
    ("  rows into RocksDB after the commit", "streams.runtime.loop", "TransactionalLoop._persist"),
    ("feeds: item vectors, the log for co-occurrence", "streams.feeds", "Feeds.poll"),
    (
        "Kafka: offsets and commit (the commit thread)",
        "streams.runtime.transactions",
        "Transactions.commit",
    ),
]


def install_timers() -> list[float]:
    """Wrap each ``TIMED`` function in a timer of its thread's CPU; the seconds, in order."""
    spent = [0.0] * len(TIMED)
    for at, (_what, module, name) in enumerate(TIMED):
        owner_name, method = name.split(".")
        owner = getattr(importlib.import_module(module), owner_name)
        timed = _timed(getattr(owner, method), spent, at)
        static = isinstance(inspect.getattr_static(owner, method), staticmethod)
        setattr(owner, method, staticmethod(timed) if static else timed)
    return spent


def _timed(function: Any, spent: list[float], at: int) -> Any:
    @functools.wraps(function)
    def run(*args: Any, **kwargs: Any) -> Any:
        began = time.thread_time()
        try:
            return function(*args, **kwargs)
        finally:
            spent[at] += time.thread_time() - began

    return run


def print_stages(stats: pstats.Stats) -> None:
    """Each stage's cumulative CPU as a share of the worker loop's."""
    cumulative: dict[tuple[str, str], float] = {}
    for (path, _line, name), row in stats.stats.items():  # type: ignore[attr-defined]
        key = (path.replace(os.sep, "/"), name)
        cumulative[key] = cumulative.get(key, 0.0) + row[3]

    def of(calls: list[tuple[str, str]]) -> float:
        return sum(
            t
            for (p, n), t in cumulative.items()
            for path, name in calls
            if p.endswith(path) and n == name
        )

    loop = of([("streams/runtime/loop.py", "run")])
    if loop <= 0:
        return
    print(f"the worker loop: {loop:.2f} s of CPU; by stage (cumulative):")
    shown = 0.0
    for what, calls in STAGES:
        t = of(calls)
        print(f"  {100 * t / loop:5.1f} %  {what}")
        if not what.startswith("  "):
            shown += t
    print(f"  {100 * (loop - shown) / loop:5.1f} %  the rest (produce calls, the loop itself, ...)")


if __name__ == "__main__":
    script_main(main)

"""Soak: RSS of the broker, the router and the workers under a steady open-world stream.

A producer thread sends --rate events/s for --minutes to `interactions` (fresh topics, a
unique JODIE_TOPIC_PREFIX, deleted at the end), through a router and --workers workers started
as `jodie` processes (python -m streams), on the local broker (`jodie broker up` first). The
stream is open-world: a share --fresh of the events come from users never seen before (ids
from a counter), the others from one of the last 50,000 users; items are drawn from
--items ids, each of them once in a shuffled first pass and then half uniformly, half from a
hot thousand. Timestamps are the wall clock. Every 10 s the resident set size (VmRSS, Linux
/proc) of every process with what it is made of (anonymous memory, pages of mapped files)
and its threads, the events the workers applied and their inbox lag, and where each
worker's heap is (Python's allocated blocks, glibc malloc's bytes in use and those it holds
free, and RocksDB's part: memtables, index blocks, block cache; their /metrics.json), are
written to OUT/rss.csv; at the end OUT/rss.png plots RSS above and events sent against
events applied below (whether the workers kept up), and the
summary gives the events sent, the distinct users and items, each process's RSS at 10, 20 and
30 minutes (for a shorter run: at a third, two thirds and the end) and its growth over the
last two thirds — the last 20 minutes of a 30-minute run. The memory bounds (JODIE_ROW_CACHE,
JODIE_ROUTER_ENTITIES, JODIE_DEDUP_WINDOW, JODIE_COOCCURRENCE_*, JODIE_FEED_*) are the
settings in force, printed.

Without --checkpoint the workers serve a model of random weights and no states (what is
measured is memory, not quality); JODIE_EVALUATE_EVERY defaults to 100 here, since every
evaluated event is ranked against all --items items.

    jodie broker up
    python benchmarks/soak.py --minutes 30 --rate 650 --workers 2 --out soak-30
    python benchmarks/soak.py --minutes 3 --rate 200 --workers 1 --out soak-3   # a quick check
    # a worker left behind, then 6 minutes with nothing sent: does its memory come back?
    python benchmarks/soak.py --minutes 7 --rest 6 --rate 1000 --fresh 0.95 --out soak-rest
    jodie broker down
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import shutil
import tempfile
import textwrap
import threading
import time
import urllib.request
from collections import deque
from pathlib import Path
from typing import Any

from deploy.kafka.broker import BrokerConfig
from operators.model.config import ModelConfig
from operators.model.synthetic import synthetic_checkpoint
from schemas import INTERACTION
from streams.children import spawn, stop_children_on_sigterm
from streams.cli.common import script_main
from streams.codecs import make_codec
from streams.runtime.clients import idempotent_producer
from streams.settings import Settings
from streams.topics import scratch_topics

SAMPLE_S = 10.0
RECENT_USERS = 50_000
HOT_ITEMS = 1_000
HEAP_COLUMNS = ("python blocks", "malloc MiB", "malloc free MiB", "rocksdb MiB")
# What RSS is made of (Linux /proc/PID/status): anonymous memory (heaps, thread stacks, any
# mmap without a file), pages of mapped files, and the threads (each one a stack).
PROC_COLUMNS = ("anon MiB", "file MiB", "threads")
_STATUS_FIELDS = {"RssAnon:": "anon MiB", "RssFile:": "file MiB", "Threads:": "threads"}


def proc_status(pid: int) -> dict[str, float]:
    """VmRSS in MiB under "rss", and PROC_COLUMNS, of a live process; empty when gone."""
    found: dict[str, float] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            words = line.split()
            if len(words) < 2:
                continue
            if words[0] == "VmRSS:":
                found["rss"] = int(words[1]) / 1024
            elif words[0] in _STATUS_FIELDS:
                value = int(words[1])
                found[_STATUS_FIELDS[words[0]]] = value if words[0] == "Threads:" else value / 1024
    except (OSError, ValueError, IndexError):
        return {}
    return found


class Stream:
    """The open-world producer: a thread sending at a steady rate, counting what it sent."""

    def __init__(self, settings: Settings, rate: float, fresh: float, items: int, seed: int):
        self.settings, self.rate, self.fresh, self.items = settings, rate, fresh, items
        self.rng = random.Random(seed)
        self.first_pass = list(range(items))
        self.rng.shuffle(self.first_pass)
        self.sent = 0
        self.users: set[int] = set()  # user numbers sent (ints: the counting costs little)
        self.items_seen: set[int] = set()
        self.recent: deque[int] = deque(maxlen=RECENT_USERS)
        self.next_user = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="soak-producer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    def _event(self) -> tuple[int, int]:
        if not self.recent or self.rng.random() < self.fresh:
            user = self.next_user
            self.next_user += 1
            self.recent.append(user)
        else:
            user = self.recent[self.rng.randrange(len(self.recent))]
        n = self.sent
        if n < self.items:
            item = self.first_pass[n]
        elif self.rng.random() < 0.5:
            item = self.rng.randrange(self.items)
        else:
            item = self.rng.randrange(min(HOT_ITEMS, self.items))
        return user, item

    def _run(self) -> None:
        try:
            topic = self.settings.topic("interactions")
            codec = make_codec(self.settings, INTERACTION, topic)
            producer = idempotent_producer(self.settings)
            began = time.monotonic()
            while not self._stop.is_set():
                due = int((time.monotonic() - began) * self.rate)
                while self.sent < due:
                    user, item = self._event()
                    record: dict[str, Any] = {
                        "event_id": f"soak:{self.sent}",
                        "user_id": f"u{user}",
                        "item_id": f"i{item}",
                        "timestamp": time.time(),
                        "features": [],
                        "state_label": None,
                    }
                    producer.produce(topic, key=f"u{user}", value=codec.encode(record))
                    self.users.add(user)
                    self.items_seen.add(item)
                    self.sent += 1
                producer.poll(0)
                time.sleep(0.02)
            producer.flush(30)
        except BaseException as exc:  # reported by the main thread
            self.error = exc


def metrics(port: int) -> dict[str, Any]:
    """A worker's /metrics.json page (empty when it does not answer)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics.json", timeout=5) as resp:
            found: dict[str, Any] = json.loads(resp.read())
            return found
    except (OSError, ValueError):
        return {}


def at(rows: list[dict[str, Any]], name: str, t_s: float) -> float | None:
    """A column's value (a process's RSS, a worker's heap) at the sample nearest to ``t_s``."""
    found = [r for r in rows if r.get(name) is not None]
    if not found:
        return None
    return float(min(found, key=lambda r: abs(r["t_s"] - t_s))[name])


def plot(rows: list[dict[str, Any]], names: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, (ax, flow) = plt.subplots(
        2, 1, figsize=(9, 7.5), sharex=True, gridspec_kw={"height_ratios": [2, 1]}
    )
    for name in names:
        pts = [(r["t_s"] / 60, r[name]) for r in rows if r.get(name) is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=name)
    ax.set_ylabel("RSS (MiB)")
    ax.set_title(textwrap.fill(title, 90), fontsize=10)  # wrapped: a long one ran off the figure
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    # Below: whether the workers kept up, events sent against events applied.
    for key, label in (("sent", "events sent"), ("applied", "events applied by the workers")):
        pts = [(r["t_s"] / 60, r[key] / 1e6) for r in rows if r.get(key) is not None]
        if pts:
            flow.plot([p[0] for p in pts], [p[1] for p in pts], label=label)
    flow.set_xlabel("minutes")
    flow.set_ylabel("events (millions)")
    flow.set_ylim(bottom=0)
    flow.grid(alpha=0.3)
    flow.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--rate", type=float, default=650.0, help="events/s")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("soak-out"))
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--fresh", type=float, default=0.9, help="share of never-seen users")
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--rest",
        type=float,
        default=0.0,
        help="minutes of sampling after the stream stops (whether memory comes back)",
    )
    args = parser.parse_args()
    stop_children_on_sigterm()
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="jodie-soak-"))
    os.environ.setdefault("JODIE_EVALUATE_EVERY", "100")
    os.environ["JODIE_STATE_DIR"] = str(tmp / "state")
    os.environ["JODIE_WEB_PORT"] = str(26066 + random.randrange(1000))
    # Random weights, no states: every entity starts from the model's initial state.
    deltas = ModelConfig(
        delta_user_mean=60.0, delta_user_std=120.0, delta_item_mean=10.0, delta_item_std=30.0
    )
    checkpoint = args.checkpoint or synthetic_checkpoint(
        tmp / "checkpoint", version="soak-random", config=deltas, fixed_scorer=False
    )
    with scratch_topics("soak") as settings:
        env = dict(os.environ)
        bounds = {
            k: getattr(settings, k)
            for k in (
                "row_cache",
                "router_entities",
                "dedup_window",
                "cooccurrence_items",
                "cooccurrence_cache",
                "feed_warmup",
                "feed_ahead",
                "evaluate_every",
            )
        }
        print(f"soak: {args.minutes} min at {args.rate} ev/s, {args.workers} worker(s), {bounds}")
        broker_pid = int(BrokerConfig.from_settings(settings).pid_file.read_text().strip())
        pids = {"broker": broker_pid}
        procs = {"router": spawn("router", ["router", "--grace", "0.2"], args.out, env)}
        for w in range(args.workers):
            procs[f"worker-{w}"] = spawn(
                f"worker-{w}",
                ["worker", "--checkpoint", str(checkpoint), "--id", str(w)],
                args.out,
                env,
            )
        pids.update({name: p.pid for name, p in procs.items()})
        names = list(pids)
        # The columns beside each process's RSS: what it is made of, then the workers' heaps.
        columns = [f"{name} {c}" for name in names for c in PROC_COLUMNS]
        columns += [f"worker-{w} {h}" for w in range(args.workers) for h in HEAP_COLUMNS]
        stream = Stream(settings, args.rate, args.fresh, args.items, args.seed)
        rows: list[dict[str, Any]] = []
        began = time.monotonic()
        end = began + args.minutes * 60
        rest_end = end + args.rest * 60
        resting = False
        stream.start()
        try:
            while True:
                now = time.monotonic()
                row: dict[str, Any] = {"t_s": round(now - began, 1), "sent": stream.sent}
                # Whether the workers keep up: their applied events and inbox lag (None while
                # a page cannot be read: a busy worker may answer late, never counted as 0).
                pages = [metrics(settings.web_port + w) for w in range(args.workers)]
                readable = all(pages)
                row["applied"] = sum(p["user_events"] for p in pages) if readable else None
                row["lag"] = sum(max(0, p["lag"]) for p in pages) if readable else None
                for name, pid in pids.items():
                    status = proc_status(pid)
                    row[name] = status.get("rss")
                    row.update({f"{name} {c}": status.get(c) for c in PROC_COLUMNS})
                # Where a worker's heap is (its /metrics.json "heap"): Python's blocks and the
                # bytes malloc handed out, which tell a filling cache or a leak from RSS alone.
                for w, page in enumerate(pages):
                    heap = (page or {}).get("heap") or {}
                    row[f"worker-{w} python blocks"] = heap.get("python_blocks")
                    in_use = heap.get("malloc_in_use_bytes")
                    row[f"worker-{w} malloc MiB"] = None if in_use is None else in_use / 2**20
                    free = heap.get("malloc_free_bytes")
                    row[f"worker-{w} malloc free MiB"] = None if free is None else free / 2**20
                    # RocksDB's part of malloc's bytes: memtables, index blocks, block cache.
                    stores = heap.get("rocksdb")
                    row[f"worker-{w} rocksdb MiB"] = (
                        None
                        if stores is None
                        else sum(sum(kinds.values()) for kinds in stores.values()) / 2**20
                    )
                rows.append(row)
                print(json.dumps(row), flush=True)
                for child in procs.values():
                    child.check()
                if stream.error is not None:
                    raise RuntimeError(f"producer failed: {stream.error}")
                if now >= end and not resting:
                    stream.stop()  # the rest: nothing sent, the workers catch up and idle
                    resting = True
                if now >= rest_end:
                    break
                until = rest_end if resting else end
                time.sleep(max(0.0, min(SAMPLE_S - (time.monotonic() - now), until - now)))
            # Whether the pipeline kept up: the workers' counts and lag at the end.
            served = {
                f"worker-{w}": {
                    k: metrics(settings.web_port + w).get(k)
                    for k in ("user_events", "lag", "events_per_s", "items_indexed", "gc", "heap")
                }
                for w in range(args.workers)
            }
        finally:
            stream.stop()
            for child in procs.values():
                child.stop()
        with (args.out / "rss.csv").open("w", newline="") as fh:
            writer = csv.DictWriter(
                fh, fieldnames=["t_s", "sent", "applied", "lag", *names, *columns]
            )
            writer.writeheader()
            writer.writerows(rows)
    shutil.rmtree(tmp, ignore_errors=True)  # the workers' and router's stores, the checkpoint
    # Without --rest the last sample may still fall a moment past the end: not a rest.
    rested = [r for r in rows if r["t_s"] > args.minutes * 60] if args.rest > 0 else []
    duration = max(r["t_s"] for r in rows if r["t_s"] <= args.minutes * 60)
    marks = (
        [10 * 60, 20 * 60, 30 * 60]
        if duration >= 30 * 60 - SAMPLE_S
        else [
            duration / 3,
            2 * duration / 3,
            duration,
        ]
    )
    title = (
        f"{duration / 60:.1f} min at {args.rate:g} ev/s: {stream.sent:,} events, "
        f"{len(stream.users):,} users, {len(stream.items_seen):,} items"
    )
    if rested:
        title += f"; then {(rested[-1]['t_s'] - duration) / 60:.1f} min with nothing sent"
    plot(rows, names, args.out / "rss.png", title)
    summary: dict[str, Any] = {
        "duration_s": duration,
        "rate_asked": args.rate,
        "rate_sent": round(stream.sent / duration, 1) if duration else 0.0,
        "events": stream.sent,
        "distinct_users": len(stream.users),
        "distinct_items": len(stream.items_seen),
        "workers": args.workers,
        "served": served,
        # The workers' inbox lag over the measured two thirds: bounded when they keep up.
        "max_lag_last_two_thirds": max(
            (r["lag"] for r in rows if r["lag"] is not None and r["t_s"] >= marks[0]), default=None
        ),
        "bounds": bounds,
        "rss_mib_at_s": {},
        "growth_last_two_thirds": {},
    }
    print(f"\n{title}; at the end {json.dumps(served)}")
    print(
        f"the workers' inbox lag from {marks[0] / 60:.1f} min on: max "
        f"{summary['max_lag_last_two_thirds']}, at the end {rows[-1]['lag']}"
    )
    print(f"{'process':<10}" + "".join(f"{f'at {m / 60:.1f} min':>14}" for m in marks) + "  growth")
    for name in names:
        values = [at(rows, name, m) for m in marks]
        first, last = values[0], values[-1]
        growth = (last - first) / first if first and last is not None else None
        summary["rss_mib_at_s"][name] = {
            str(round(m)): v for m, v in zip(marks, values, strict=True)
        }
        summary["growth_last_two_thirds"][name] = growth
        cells = "".join(f"{v:>10.0f} MiB" if v is not None else f"{'-':>14}" for v in values)
        print(f"{name:<10}{cells}  {growth:+.1%}" if growth is not None else f"{name:<10}{cells}")
    summary["heap_at_s"] = {}
    for column in columns:
        values = [at(rows, column, m) for m in marks]
        summary["heap_at_s"][column] = {
            str(round(m)): v for m, v in zip(marks, values, strict=True)
        }
        cells = "".join(f"{v:>14,.0f}" if v is not None else f"{'-':>14}" for v in values)
        print(f"{column:<24}{cells}")
    if rested:
        # Whether what grew comes back once nothing is sent and the workers caught up.
        final = rested[-1]
        summary["after_rest"] = {"t_s": final["t_s"], "lag": final["lag"]}
        print(f"\nafter {(final['t_s'] - duration) / 60:.1f} min of rest (lag {final['lag']}):")
        for column in [*names, *columns]:
            value = summary["after_rest"][column] = final.get(column)
            print(f"{column:<24}{value:>14,.0f}" if value is not None else f"{column:<24}{'-':>14}")
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\n{args.out / 'rss.csv'}, {args.out / 'rss.png'}, {args.out / 'summary.json'}")


if __name__ == "__main__":
    script_main(main)

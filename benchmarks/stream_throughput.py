"""End-to-end streaming benchmark: produce → router → workers → recommendations.

Runs on the real local broker (`jodie broker up` first), on fresh topics (a unique
JODIE_TOPIC_PREFIX, deleted at the end), a temporary JODIE_STATE_DIR and free JODIE_WEB_PORTs.
--checkpoint is the model the workers serve; its states must cover the bundled Wikipedia file
(or --data, a JODIE CSV of the same shape) up to row --start, where the benchmark's stream
begins (125979: a checkpoint trained on the first 80 %).

Throughput (--mode throughput): --events events are produced to `interactions` and routed to
completion first (router events/s); then --workers workers start, and the worker side's
sustained events/s is measured up to the last committed recommendation, as a read_committed
consumer of `recommendations` receives it, from the moment the workers got their partitions
(their log's "assigned" line): their start-up (checkpoint load, group join) is printed apart.
First to last recommendation is printed too, but a worker may commit all of a small run in one
transaction, which leaves that span empty. Workers that join one by one rebalance inside the
measurement (printed when seen); --prestart starts them before routing and pauses them
(SIGSTOP) while the router runs, so the group is formed before the clock starts. Each worker's
messages, transactions and events (its /metrics.json page) and the CPU seconds of the workers and
the broker show where the time goes. The broker's age and its JIT compiler threads' CPU are
printed too: a broker in its first minutes under load is still compiling its hot paths on the
cores the pipeline shares, and its runs are slower (README, *A fresh broker compiles for
minutes*).

Latency (--mode latency): the router (a subprocess with --grace) and the workers run and are
warmed up with --warmup events first; then --events events are produced at --rate events/s,
by the producer that sent the warm-up, and after them, unmeasured, as many as the grace and a
second take at that rate (the stream's very last events wait for the router's grace: see
*Ordering semantics* in the README). An event's latency is the wall time at which a
read_committed consumer received its recommendation minus the time the event was handed to
the producer client. The router's
grace period and the workers' commit interval add to it directly; both are printed, with the
produce → interactions.log part (the router's share) apart. The timed events follow a two-second
pause (the idle pipeline's CPU is measured then), so the figures include the pipeline picking up
load again; where the slowest events fell is printed too (the worst seconds of the run, and the
figures of the events sent after its first two seconds), to tell a start-up transient from
slowness throughout.

    jodie broker up
    python benchmarks/stream_throughput.py --checkpoint CKPT --events 5000 --workers 1
    python benchmarks/stream_throughput.py --checkpoint CKPT --events 5000 --workers 2
    python benchmarks/stream_throughput.py --checkpoint CKPT --events 5000 --workers 2 --prestart
    python benchmarks/stream_throughput.py --checkpoint CKPT --mode latency --rate 500 \\
        --events 5000 --workers 1
    jodie broker down

--json prints one JSON object on stdout (the progress lines go to stderr).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from itertools import islice
from pathlib import Path
from typing import Any

from confluent_kafka import (
    OFFSET_BEGINNING,
    ConsumerGroupState,
    KafkaError,
    KafkaException,
    Producer,
    TopicPartition,
)

from deploy.kafka.broker import BrokerConfig
from operators.dataset import Row, bundled_wikipedia, iter_rows
from schemas import INTERACTION, RECOMMENDATION
from streams.children import Child, child_pids, spawn, stop_children_on_sigterm
from streams.cli.common import script_main
from streams.codecs import make_codec
from streams.produce import produce_file, source_tag, to_record
from streams.router import Router
from streams.runtime.clients import admin, committed_reader, idempotent_producer
from streams.runtime.kafka import take
from streams.settings import Settings, read_settings
from streams.topics import app_id, apply_topics, declared_topics, delete_topics, require_topics

# Checkpoint of the first 80 % of the bundled Wikipedia file: its states end at this row.
DEFAULT_START = 125_979


def _mb(n: int | None) -> str:
    """Bytes in kB or MB (powers of ten); "?" when unknown."""
    if n is None:
        return "?"
    return f"{n / 1e3:.0f} kB" if n < 1e6 else f"{n / 1e6:,.1f} MB"


def say(text: str, to_stderr: bool) -> None:
    print(text, file=sys.stderr if to_stderr else sys.stdout, flush=True)


# -- processes ---------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a live process (Linux /proc), None when unreadable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def _task_cpu(stat: str) -> tuple[str, float]:
    """A thread's name and user + system CPU seconds, from its /proc stat line."""
    name, rest = stat.split("(", 1)[1].rsplit(")", 1)
    fields = rest.split()
    return name, (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def jit_cpu_seconds(pid: int) -> float | None:
    """CPU seconds of a JVM's JIT compiler threads ("C1/C2 CompilerThreadN"), None when
    unreadable. Under load a fresh broker compiles its hot paths for minutes, on cores the
    pipeline shares: this shows whether a run measured a warm broker."""
    total = 0.0
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                name, cpu = _task_cpu((task / "stat").read_text())
            except (OSError, IndexError, ValueError):
                continue  # a thread that ended meanwhile
            if name.startswith(("C1 Compiler", "C2 Compiler")):
                total += cpu
    except OSError:
        return None
    return total


def age_seconds(pid: int) -> float | None:
    """Seconds since a live process started (Linux /proc), None when unreadable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def cpu_delta(
    before: dict[str, float | None], after: dict[str, float | None], per: float = 1.0
) -> dict[str, float]:
    """CPU seconds spent between two snapshots (divided by ``per``), by process."""
    spent = {}
    for name, end in after.items():
        start = before.get(name)
        if start is not None and end is not None:
            spent[name] = round((end - start) / per, 2)
    return spent


def broker_pid(settings: Settings) -> int | None:
    try:
        return int(BrokerConfig.from_settings(settings).pid_file.read_text().strip())
    except (OSError, ValueError):
        return None


def free_port_base(count: int, attempts: int = 50) -> int:
    """A port p with p .. p+count-1 free on 127.0.0.1 (worker N serves /metrics on p+N)."""
    for _ in range(attempts):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = int(s.getsockname()[1])
        if base + count > 65535:
            continue
        try:
            for port in range(base, base + count):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise RuntimeError("no free ports for the workers' /metrics pages")


def worker_metrics(port: int) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics.json", timeout=5) as resp:
            found: dict[str, Any] = json.loads(resp.read())
            return found
    except (OSError, ValueError):
        return None


def final_stats(child: Child, worker_id: int) -> dict[str, Any] | None:
    """The worker's last stats line: "worker N stopped {json}" (or its last periodic one)."""
    marker = f"worker {worker_id} "
    found = None
    try:
        lines = child.log.read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in lines:
        at = line.find(marker)
        brace = line.find("{", at) if at >= 0 else -1
        if brace >= 0:
            try:
                found = json.loads(line[brace:])
            except ValueError:
                continue
    return found


def assignment_times(child: Child, worker_id: int) -> list[float]:
    """Wall times of the partition assignments the worker logged (several: rebalances)."""
    marker = f"worker {worker_id} assigned"
    try:
        lines = child.log.read_text(errors="replace").splitlines()
    except OSError:
        return []
    times = []
    for line in lines:
        if marker in line:
            # The worker's log format starts with asctime: "2025-01-31 12:00:00,123".
            try:
                stamp = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
            except ValueError:
                continue
            times.append(stamp.timestamp())
    return times


# -- the reading side ------------------------------------------------------------------------


@dataclass
class Collector:
    """A read_committed consumer (in a thread) recording when each message arrived."""

    settings: Settings
    topics: list[str]
    fetch_wait_ms: int = 10  # how late an idle fetch may notice new data, at most
    received: dict[str, list[tuple[float, bytes, bytes]]] = field(default_factory=dict)
    error: BaseException | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        for topic in self.topics:
            self.received[topic] = []
        consumer = committed_reader(
            self.settings,
            group_id=f"{self.settings.topic_prefix}bench-{uuid.uuid4().hex[:6]}",
            **{"enable.partition.eof": False, "fetch.wait.max.ms": self.fetch_wait_ms},
        )
        assignment = []
        for topic in self.topics:
            meta = consumer.list_topics(topic, timeout=30).topics[topic]
            assignment += [TopicPartition(topic, p, OFFSET_BEGINNING) for p in meta.partitions]
        consumer.assign(assignment)

        def loop() -> None:
            try:
                while not self._stop.is_set():
                    # Not consume(1000, 0.05): it waits out the whole timeout unless 1000
                    # messages are there, and every arrival would be stamped up to 50 ms late.
                    messages = take(consumer, 1000, 0.05)
                    now = time.time()
                    for msg in messages:
                        err = msg.error()
                        if err is not None:
                            if err.code() == KafkaError._PARTITION_EOF:
                                continue
                            raise RuntimeError(f"reading {msg.topic()}: {err}")
                        self.received[msg.topic() or ""].append(
                            (now, msg.key() or b"", msg.value() or b"")
                        )
            except BaseException as exc:  # reported by check() in the main thread
                self.error = exc
            finally:
                consumer.close()

        self._thread = threading.Thread(target=loop, name="collector", daemon=True)
        self._thread.start()

    def count(self, topic: str) -> int:
        if self.error is not None:
            raise RuntimeError(f"collector failed: {self.error}") from self.error
        return len(self.received[topic])

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)


def wait_for(
    what: str,
    done: Callable[[], bool],
    deadline: float,
    children: list[Child],
    interval_s: float = 0.05,
    progress: Callable[[], str] | None = None,
) -> None:
    """Wait (bounded by ``deadline``) until ``done()``; fail early if a child died."""
    while not done():
        for child in children:
            child.check()
        if time.monotonic() > deadline:
            got = f" ({progress()})" if progress is not None else ""
            raise TimeoutError(f"timed out waiting for {what}{got}")
        time.sleep(interval_s)


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return float("nan")
    rank = max(1, min(len(sorted_values), round(q / 100 * len(sorted_values) + 0.5)))
    return sorted_values[rank - 1]


def latency_summary(values_s: list[float]) -> dict[str, float]:
    ms = sorted(v * 1000 for v in values_s)
    return {
        "count": len(ms),
        "p50_ms": round(percentile(ms, 50), 1),
        "p95_ms": round(percentile(ms, 95), 1),
        "p99_ms": round(percentile(ms, 99), 1),
        "p999_ms": round(percentile(ms, 99.9), 1),
        "max_ms": round(ms[-1], 1) if ms else float("nan"),
        "mean_ms": round(sum(ms) / len(ms), 1) if ms else float("nan"),
    }


def over_time(pairs: list[tuple[float, float]], skip_s: float = 2.0) -> dict[str, Any]:
    """Where slow events fell: ``pairs`` are (send time, latency) in seconds. The three
    seconds of the run (from its first send) with the largest latency, and the summary of the
    events sent ``skip_s`` or more after the first."""
    if not pairs:
        return {"worst_seconds": [], "after_s": skip_s, "after": latency_summary([])}
    first = min(t for t, _ in pairs)
    worst: dict[int, float] = {}
    for t, lat in pairs:
        second = int(t - first)
        worst[second] = max(worst.get(second, 0.0), lat)
    top = sorted(worst.items(), key=lambda kv: -kv[1])[:3]
    return {
        "worst_seconds": [{"second": k, "max_ms": round(v * 1000, 1)} for k, v in top],
        "after_s": skip_s,
        "after": latency_summary([lat for t, lat in pairs if t - first >= skip_s]),
    }


def fmt_over_time(o: dict[str, Any]) -> str:
    worst = ", ".join(f"{w['second']} s ({w['max_ms']:.0f} ms)" for w in o["worst_seconds"])
    return (
        f"slowest seconds of the run (from its first event): {worst}; events sent from "
        f"{o['after_s']:g} s on: {fmt_latency(o['after'])}"
    )


def fmt_latency(s: dict[str, float]) -> str:
    return (
        f"p50 {s['p50_ms']:.0f} ms, p95 {s['p95_ms']:.0f} ms, p99 {s['p99_ms']:.0f} ms, "
        f"p99.9 {s['p999_ms']:.0f} ms, max {s['max_ms']:.0f} ms (mean {s['mean_ms']:.0f} ms, "
        f"n={s['count']:.0f})"
    )


# -- the benchmark ---------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.quiet = bool(args.json)
        self.tmp = Path(tempfile.mkdtemp(prefix="jodie-bench-"))
        self.port_base = free_port_base(args.workers)
        os.environ["JODIE_TOPIC_PREFIX"] = f"bench{uuid.uuid4().hex[:6]}-"
        os.environ["JODIE_STATE_DIR"] = str(self.tmp / "state")
        os.environ["JODIE_WEB_PORT"] = str(self.port_base)
        self.settings = read_settings()
        self.env = dict(os.environ)
        self.children: list[Child] = []
        self.workers: list[Child] = []
        self.deadline = time.monotonic() + args.timeout
        self.result: dict[str, Any] = {
            "mode": args.mode,
            "workers": args.workers,
            "events": args.events,
            "start_row": args.start,
            "checkpoint": str(args.checkpoint),
            "topic_prefix": self.settings.topic_prefix,
            "partitions": self.settings.partitions,
            "router_grace_s": args.grace,
            "worker_commit_interval_s": self.settings.commit_interval_s,
            "worker_batch": self.settings.worker_batch,
            "worker_first_batch": self.settings.worker_first_batch,
            "cpus": os.cpu_count(),
        }

    def say(self, text: str) -> None:
        say(text, self.quiet)

    def setting_line(self) -> str:
        s = self.settings
        pid = broker_pid(s)
        age = None if pid is None else age_seconds(pid)
        self.result["broker_age_s"] = None if age is None else round(age)
        up = "" if age is None else f" (up {age / 60:.1f} min)"
        return (
            f"broker {s.bootstrap_servers}{up}, "
            f"topics {s.topic_prefix}* ({s.partitions} partitions), "
            f"router grace {self.args.grace} s, router commit interval "
            f"{s.router_commit_interval_s} s, worker commit interval {s.commit_interval_s} s, "
            f"worker batch {s.worker_first_batch} rising to {s.worker_batch}, "
            f"{os.cpu_count()} CPUs"
        )

    def warn_if_compiling(self, cpu: dict[str, float]) -> None:
        """Say so when the broker's JIT compiler took a second or more of the run: figures
        from a broker still warming up are not its steady state."""
        jit = cpu.get("broker JIT", 0.0)
        self.result["broker_jit_cpu_s"] = jit
        if jit >= 1.0:
            self.say(
                f"  note: the broker's JIT compiler took {jit:.1f} s of CPU in this run, on "
                "cores the pipeline shares: the broker is still warming up, so these are not "
                "steady-state figures (run again once it takes under a second)"
            )

    def start_workers(self, env: dict[str, str] | None = None) -> None:
        for w in range(self.args.workers):
            child = spawn(
                f"worker-{w}",
                ["worker", "--checkpoint", str(self.args.checkpoint), "--id", str(w)],
                self.tmp,
                {**self.env, **(env or {})},
            )
            self.workers.append(child)
            self.children.append(child)

    def wait_group_stable(self, quiet_s: float = 1.0) -> None:
        """Wait until the workers' group is stable with every worker in it and assigned."""
        client = admin(self.settings)
        group = f"{app_id(self.settings)}-workers"

        def stable() -> bool:
            try:
                found = client.describe_consumer_groups([group], request_timeout=10)[group]
                desc = found.result()
            except KafkaException:
                return False
            return desc.state == ConsumerGroupState.STABLE and len(desc.members) == len(
                self.workers
            )

        def logged() -> int:
            counts = [len(assignment_times(c, w)) for w, c in enumerate(self.workers)]
            return sum(counts) if all(counts) else 0

        seen, since = -1, time.monotonic()

        def settled() -> bool:
            nonlocal seen, since
            count = logged()
            if count != seen:
                seen, since = count, time.monotonic()
            return count > 0 and time.monotonic() - since >= quiet_s and stable()

        wait_for("the workers' group to settle", settled, self.deadline, self.workers, 0.2)

    def cpu_snapshot(self) -> dict[str, float | None]:
        """CPU seconds so far of every process started here, and of the local broker."""
        snap = {c.name: cpu_seconds(c.proc.pid) for c in self.children}
        for c in self.workers:
            # A worker's ranking process is counted apart: its CPU is the worker's too.
            for n, pid in enumerate(child_pids(c.proc.pid)):
                snap[f"{c.name} evaluation{'' if n == 0 else f' {n}'}"] = cpu_seconds(pid)
        broker = broker_pid(self.settings)
        if broker is not None:
            snap["broker"] = cpu_seconds(broker)
            snap["broker JIT"] = jit_cpu_seconds(broker)
        return snap

    def worker_report(self) -> list[dict[str, Any]]:
        """Each worker's counters and CPU time, read before it is stopped."""
        report = []
        for w, child in enumerate(self.workers):
            report.append(
                {
                    "worker": w,
                    "metrics": worker_metrics(self.port_base + w),
                    "cpu_s": cpu_seconds(child.proc.pid),
                    "wall_s": round(time.time() - child.started, 1),
                    "assignments": len(assignment_times(child, w)),
                }
            )
        return report

    def finish_worker_report(self, report: list[dict[str, Any]]) -> None:
        """After the workers stopped: fill in what /metrics.json missed from their last log line."""
        for entry, child in zip(report, self.workers, strict=True):
            w = entry["worker"]
            if entry["metrics"] is None:
                entry["metrics"] = final_stats(child, w)
        for entry in report:
            m = entry["metrics"] or {}
            txns = m.get("transactions") or 0
            msgs = m.get("messages") or 0
            cpu = entry["cpu_s"]
            self.say(
                f"  worker {entry['worker']}: {m.get('user_events', '?')} user events, "
                f"{m.get('item_events', '?')} item events, {msgs} messages in {txns} "
                f"transactions ({msgs / txns if txns else 0:.0f} messages/transaction), "
                f"{m.get('changelog_records', '?')} changelog records "
                f"({_mb(m.get('changelog_bytes'))}, the largest "
                f"{_mb(m.get('largest_row_bytes'))}), "
                f"{m.get('input_records_held', '?')} held back, "
                f"{entry['assignments']} assignment(s), CPU "
                f"{'?' if cpu is None else f'{cpu:.1f}'} s of {entry['wall_s']} s wall"
            )
            phases = m.get("batch_phase_s") or {}
            # The commit overlaps the next batch's processing (JODIE_WORKER_OVERLAP): of its
            # time, only the wait for it keeps the worker from its work.
            waited = phases.get("wait", phases.get("commit", 0.0))
            busy = phases.get("app", 0.0) + phases.get("send", 0.0) + waited
            if txns and busy:
                each = ", ".join(f"{name} {1000 * s / txns:.1f} ms" for name, s in phases.items())
                self.say(
                    f"    per transaction: {each}; waiting for the commits "
                    f"{100 * waited / busy:.0f} % of the batches' time"
                )
            hop = m.get("pre_states") or {}
            if hop.get("taken"):
                self.say(
                    f"    pre-states from the other workers: {hop['taken']}, from their send "
                    f"to the commit here p50 {hop['age_ms_p50']:.0f} ms, p99 "
                    f"{hop['age_ms_p99']:.0f} ms, max {hop['age_ms_max']:.0f} ms"
                )

    def stop_all(self) -> None:
        for child in reversed(self.children):
            try:
                child.stop()
            except (OSError, subprocess.TimeoutExpired) as exc:
                say(f"could not stop {child.name} (pid {child.proc.pid}): {exc}", True)

    # -- throughput ----------------------------------------------------------------------
    def throughput(self) -> None:
        a, s = self.args, self.settings
        self.say(f"throughput: {a.events} events from row {a.start}, {a.workers} worker(s)")
        self.say(f"  {self.setting_line()}")
        topic = s.topic("interactions")
        produced = produce_file(
            a.data,
            idempotent_producer(s),
            make_codec(s, INTERACTION, topic),
            topic,
            start=a.start,
            limit=a.events,
        )
        self.say(
            f"produce: {produced.events} events in {produced.seconds:.2f} s "
            f"= {produced.events_per_s:,.0f} events/s"
        )
        if produced.events != a.events:
            raise RuntimeError(f"produced {produced.events} events, expected {a.events}")

        if a.prestart:
            # Join the group while the inboxes are empty, then pause (SIGSTOP) while routing;
            # the long session timeout keeps the paused members in the group.
            self.start_workers({"JODIE_WORKER_SESSION_TIMEOUT_MS": "60000"})
            self.wait_group_stable()
            for child in self.workers:
                child.proc.send_signal(signal.SIGSTOP)
            self.say(f"workers: {a.workers} in the group, paused while the router runs")

        idle_s = 0.5
        ready: list[float] = []
        cpu0 = time.process_time()
        stats = Router(s, grace_s=a.grace).run(
            until_idle_s=idle_s,
            max_seconds=max(1.0, self.deadline - time.monotonic()),
            on_ready=lambda: ready.append(time.monotonic()),
        )
        # The router returns idle_s (+ at most one 0.1 s poll) after its last commit.
        routed_s = time.monotonic() - ready[0] - idle_s
        router_cpu = time.process_time() - cpu0
        router_rate = stats.sequenced / routed_s if routed_s > 0 else 0.0
        self.say(
            f"router: {stats.sequenced} events in {routed_s:.2f} s = {router_rate:,.0f} events/s "
            f"({stats.transactions} transactions, {stats.rejected} rejected, "
            f"CPU {router_cpu:.1f} s)"
        )
        if stats.sequenced != a.events:
            raise RuntimeError(f"router sequenced {stats.sequenced} of {a.events} events")

        recs_topic = s.topic("recommendations")
        collector = Collector(s, [recs_topic], fetch_wait_ms=100)
        collector.start()
        broker = broker_pid(s)
        broker_cpu0 = cpu_seconds(broker) if broker is not None else None
        if a.prestart:
            for child in self.workers:
                child.proc.send_signal(signal.SIGCONT)
            began = time.time()
        else:
            began = time.time()
            self.start_workers()
        # CPU samples while waiting, to tell the measured phase's CPU from the start-up's.
        samples: list[tuple[float, dict[str, float | None]]] = [(time.time(), self.cpu_snapshot())]

        def done() -> bool:
            samples.append((time.time(), self.cpu_snapshot()))
            return collector.count(recs_topic) >= a.events

        try:
            wait_for(
                f"{a.events} recommendations",
                done,
                self.deadline,
                self.workers,
                progress=lambda: f"{collector.count(recs_topic)} recommendations",
            )
            report = self.worker_report()
        finally:
            collector.stop()
        broker_cpu = cpu_seconds(broker) if broker is not None else None
        self.stop_all()

        received = collector.received[recs_topic]
        codec = make_codec(s, RECOMMENDATION, recs_topic)
        ids = {codec.decode(value)["event_id"] for _t, _k, value in received}
        times = [t for t, _k, _v in received]
        n, first, last = len(times), times[0], times[-1]
        # Start-up ends when the workers get their partitions (logged once restored): from
        # then on they consume. Shutdown reassignments (after `last`) do not count.
        assigned = [
            t for w, c in enumerate(self.workers) for t in assignment_times(c, w) if t <= last
        ]
        # (With --prestart the group was formed before the pause: it starts at the resume.)
        working = began if a.prestart or not assigned else min(assigned)
        settled = max(assigned) if assigned and not a.prestart else working
        sustained = n / (last - working) if last > working else 0.0
        # First to last commit: the first batch became visible at `first`; count the rest.
        span = last - first
        after_first = sum(1 for t in times if t > first)
        between = after_first / span if span > 0 else None
        lo, hi = n // 20, n * 19 // 20
        what = "resume" if a.prestart else "start"
        self.say(
            f"workers ({a.workers}): {n} recommendations ({len(ids)} distinct events), "
            f"{last - working:.2f} s from the workers' partition assignment"
            f"{' (resume)' if a.prestart else ''} to the last recommendation = "
            f"{sustained:,.0f} events/s sustained"
        )
        self.say(
            f"  start-up (process start to assignment): "
            f"{'before the pause' if a.prestart else f'{working - began:.1f} s'}; first "
            f"recommendation {first - working:.2f} s after the assignment; first to last "
            + (
                f"commit: {after_first} more in {span:.2f} s = {between:,.0f} events/s"
                if between is not None
                else "commit: none (all in one transaction)"
            )
        )
        self.say(
            f"  the last 5 % ({n - hi} recommendations) took {last - times[hi]:.2f} s, "
            f"the middle 90 % {times[hi] - times[lo]:.2f} s; from the workers' "
            f"{what}: {n / (last - began):,.0f} events/s"
        )
        if settled > first:
            self.say(
                f"  the group settled only {settled - first:.1f} s after the first "
                f"recommendation ({len(assigned)} assignments): a rebalance is inside the "
                f"measurement (--prestart avoids it)"
            )
        at_start = [snap for t, snap in samples if t <= working] or [samples[0][1]]
        measured_cpu = cpu_delta(at_start[-1], samples[-1][1])
        window = samples[-1][0] - working
        self.say("where the time goes:")
        self.finish_worker_report(report)
        if broker_cpu is not None and broker_cpu0 is not None:
            self.say(f"  broker: CPU {broker_cpu - broker_cpu0:.1f} s while the workers ran")
        busy = ", ".join(f"{k} {v:.1f} s ({v / window:.0%})" for k, v in measured_cpu.items())
        self.say(f"  CPU in the measured {window:.1f} s (share of one core): {busy}")
        self.warn_if_compiling(measured_cpu)
        self.result.update(
            {
                "prestart": a.prestart,
                "produce_events_per_s": round(produced.events_per_s, 1),
                "router": {
                    "events": stats.sequenced,
                    "seconds": round(routed_s, 3),
                    "events_per_s": round(router_rate, 1),
                    "transactions": stats.transactions,
                    "cpu_s": round(router_cpu, 2),
                },
                "worker_side": {
                    "recommendations": n,
                    "distinct_events": len(ids),
                    "startup_s": None if a.prestart else round(working - began, 2),
                    "assigned_to_last_s": round(last - working, 3),
                    "events_per_s": round(sustained, 1),
                    "assigned_to_first_s": round(first - working, 3),
                    "first_to_last_s": round(span, 3),
                    "first_to_last_events_per_s": None if between is None else round(between, 1),
                    "middle_90pct_s": round(times[hi] - times[lo], 3),
                    "last_5pct_s": round(last - times[hi], 3),
                    "assignments": len(assigned),
                    "rebalance_after_first": settled > first,
                },
                "per_worker": report,
                "cpu_s_measured": measured_cpu,
                "broker_cpu_s": None
                if broker_cpu is None or broker_cpu0 is None
                else round(broker_cpu - broker_cpu0, 2),
            }
        )
        self.say(
            f"summary: router {router_rate:,.0f} events/s; {a.workers} worker(s) "
            f"{sustained:,.0f} events/s sustained, partitions assigned to last recommendation"
            + (" (workers pre-started)" if a.prestart else "")
        )

    # -- latency -------------------------------------------------------------------------
    def produce_paced(
        self,
        producer: Producer,
        rows: Iterator[Row],
        count: int,
        tag: str,
        sent: dict[str, float],
    ) -> float:
        """Send ``count`` rows at --rate, recording each event's hand-over time; seconds taken."""
        s, rate = self.settings, self.args.rate
        topic = s.topic("interactions")
        codec = make_codec(s, INTERACTION, topic)
        errors: list[KafkaError] = []

        def delivered(err: KafkaError | None, _msg: Any) -> None:
            if err is not None:
                errors.append(err)

        began = time.monotonic()
        for i, row in enumerate(islice(rows, count)):
            ahead = began + i / rate - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
            record = to_record(row, tag)
            value = codec.encode(record)
            sent[record["event_id"]] = time.time()
            producer.produce(topic, value=value, key=row.user_id.encode(), on_delivery=delivered)
            producer.poll(0)
            if errors or time.monotonic() > self.deadline:
                break
        producer.flush(30)
        if errors:
            raise RuntimeError(f"produce failed: {errors[0]}")
        return time.monotonic() - began

    def latency(self) -> None:
        a, s = self.args, self.settings
        self.say(
            f"latency: {a.events} events at {a.rate:g} events/s from row {a.start + a.warmup} "
            f"after {a.warmup} warm-up events, {a.workers} worker(s)"
        )
        linger = a.linger_ms if a.linger_ms is not None else "20 (default)"
        self.say(f"  {self.setting_line()}, producer linger.ms {linger}")
        self.result["rate"] = a.rate
        self.result["warmup_events"] = a.warmup
        self.result["producer_linger_ms"] = a.linger_ms

        recs_topic, log_topic = s.topic("recommendations"), s.topic("interactions.log")
        dlq_topic = s.topic("interactions.dlq")
        collector = Collector(s, [recs_topic, log_topic, dlq_topic], fetch_wait_ms=a.fetch_wait_ms)

        def done(target: int) -> bool:
            # Every event is either rejected (e.g. time_backwards, when a partition's events
            # come later than the grace period allows) or sequenced and then recommended.
            logged = collector.count(log_topic)
            return logged + collector.count(dlq_topic) >= target and (
                collector.count(recs_topic) >= logged
            )

        collector.start()
        router = spawn("router", ["router", "--grace", str(a.grace)], self.tmp, self.env)
        self.children.append(router)
        self.start_workers()
        self.wait_group_stable()  # no rebalance inside the measurement
        path = a.data
        tag = source_tag(path)
        # After the measured events, as many more as the router's grace and a second take at
        # the rate, unmeasured: an event is sequenced once every partition has a later one or
        # has been quiet for the grace, so the stream's last events always wait for the
        # grace, which a steady stream never does (measured: the last second's events took
        # up to 660 ms where the rest stayed under 300).
        tail = int(a.rate * (a.grace + 1.0))
        rows = islice(iter_rows(path), a.start, a.start + a.warmup + a.events + tail)
        sent: dict[str, float] = {}
        # One producer for the warm-up and the measured events, as a client keeps one: a new
        # one is still fetching metadata and its producer id while the first events wait
        # (measured: most of the first second's events over 250 ms, up to 845 ms).
        overrides = {} if a.linger_ms is None else {"linger.ms": a.linger_ms}
        producer = idempotent_producer(s, **overrides)

        def progress() -> str:
            return (
                f"{collector.count(log_topic)} events in interactions.log, "
                f"{collector.count(recs_topic)} recommendations"
            )

        try:
            began = time.monotonic()
            warm: dict[str, float] = {}
            self.produce_paced(producer, rows, a.warmup, tag, warm)
            wait_for(
                f"{a.warmup} warm-up recommendations",
                lambda: done(a.warmup),
                self.deadline,
                self.children,
                progress=progress,
            )
            self.say(f"warm: router and workers caught up after {time.monotonic() - began:.1f} s")
            # Let the last warm-up transactions settle; meanwhile, what the idle pipeline costs.
            idle0 = self.cpu_snapshot()
            time.sleep(2.0)
            idle = cpu_delta(idle0, self.cpu_snapshot(), 2.0)
            cpu0 = self.cpu_snapshot()
            took = self.produce_paced(producer, rows, a.events, tag, sent)
            after: dict[str, float] = {}
            self.produce_paced(producer, rows, tail, tag, after)
            self.say(
                f"produced {len(sent)} events in {took:.2f} s = {len(sent) / took:,.0f} events/s, "
                f"then {len(after)} unmeasured (the router's grace and a second at the rate)"
            )
            wait_for(
                f"{a.warmup + len(sent) + len(after)} recommendations",
                lambda: done(a.warmup + len(sent) + len(after)),
                self.deadline,
                self.children,
                progress=progress,
            )
            wall = time.monotonic() - began
            cpu = cpu_delta(cpu0, self.cpu_snapshot())
            report = self.worker_report()
        finally:
            collector.stop()
        self.stop_all()

        codec = make_codec(s, RECOMMENDATION, recs_topic)
        to_rec: list[float] = []
        timeline: list[tuple[float, float]] = []
        for t, _k, value in collector.received[recs_topic]:
            event = codec.decode(value)["event_id"]
            if event in sent:
                to_rec.append(t - sent[event])
                timeline.append((sent[event], t - sent[event]))
        to_log = [
            t - sent[k.decode()] for t, k, _v in collector.received[log_topic] if k.decode() in sent
        ]
        end_to_end, routed = latency_summary(to_rec), latency_summary(to_log)
        self.say(f"produce → recommendation: {fmt_latency(end_to_end)}")
        self.say(f"  of which produce → interactions.log (router): {fmt_latency(routed)}")
        when = over_time(timeline)
        self.say(f"  {fmt_over_time(when)}")
        missing = len(sent) - len(to_rec)
        rejected = collector.count(dlq_topic)
        if missing:
            self.say(
                f"  {missing} events without a recommendation "
                f"({rejected} rejected by the router in all, see interactions.dlq)"
            )
        self.say("where the time goes:")
        self.finish_worker_report(report)
        busy = ", ".join(f"{name} {v:.1f} s" for name, v in cpu.items())
        self.say(f"  CPU from the timed produce's start to the last recommendation: {busy}")
        self.warn_if_compiling(cpu)
        idling = ", ".join(f"{name} {v:.0%}" for name, v in idle.items())
        self.say(f"  CPU of the idle, warm pipeline (share of one core): {idling}")
        self.result.update(
            {
                "produced": len(sent),
                "produce_seconds": round(took, 3),
                "end_to_end": end_to_end,
                "produce_to_log": routed,
                "over_time": when,
                "missing": missing,
                "rejected": rejected,
                "per_worker": report,
                "cpu_s_timed_run": cpu,
                "idle_cpu_cores": idle,
                "wall_s": round(wall, 1),
            }
        )
        self.say(
            f"summary: {a.workers} worker(s) at {a.rate:g} events/s, router grace {a.grace} s: "
            f"p50 {end_to_end['p50_ms']:.0f} ms, p95 {end_to_end['p95_ms']:.0f} ms, "
            f"p99 {end_to_end['p99_ms']:.0f} ms, max {end_to_end['max_ms']:.0f} ms"
        )

    def run(self) -> None:
        require_topics(self.settings, ())  # no broker: say so now, not after the clients wait
        client = admin(self.settings)
        specs = declared_topics(self.settings)
        failed = True
        try:
            apply_topics(client, specs, self.settings.replication)
            if self.args.mode == "throughput":
                self.throughput()
            else:
                self.latency()
            failed = False
        finally:
            if failed:
                for child in self.children:
                    say(f"--- {child.name} (last lines of {child.log}):\n{child.tail()}", True)
            self.stop_all()
            try:
                delete_topics(client, [spec.name for spec in specs])
            except KafkaException as exc:
                say(f"could not delete the topics {self.settings.topic_prefix}*: {exc}", True)
            shutil.rmtree(self.tmp, ignore_errors=True)
        if self.args.json:
            print(json.dumps(self.result))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--checkpoint", type=Path, required=True, help="checkpoint to serve")
    parser.add_argument(
        "--start", type=int, default=DEFAULT_START, help="row of the --data file to start at"
    )
    parser.add_argument(
        "--data",
        type=Path,
        default=bundled_wikipedia(),
        help="a JODIE CSV (the checkpoint's states must cover it up to --start)",
    )
    parser.add_argument("--events", type=int, default=5000, help="events to measure")
    parser.add_argument("--workers", type=int, default=1, help="worker processes")
    parser.add_argument("--mode", choices=("throughput", "latency"), default="throughput")
    parser.add_argument(
        "--prestart",
        action="store_true",
        help="throughput: start the workers before routing and pause them meanwhile, so the "
        "measurement has no group rebalance",
    )
    parser.add_argument("--rate", type=float, default=500.0, help="latency: events/s produced")
    parser.add_argument("--warmup", type=int, default=200, help="latency: warm-up events first")
    parser.add_argument("--grace", type=float, default=0.5, help="router grace period (s)")
    parser.add_argument(
        "--linger-ms", type=int, default=None, help="latency: producer linger.ms (default: 20)"
    )
    parser.add_argument(
        "--fetch-wait-ms",
        type=int,
        default=10,
        help="latency: fetch.wait.max.ms of the benchmark's read_committed consumer",
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds for everything")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    args = parser.parse_args()
    if args.events < 1 or args.workers < 1 or args.rate <= 0 or args.warmup < 0:
        parser.error("--events, --workers and --rate must be positive, --warmup not negative")
    if not args.checkpoint.is_dir():
        parser.error(f"no checkpoint directory at {args.checkpoint}")
    if not args.data.is_file():
        parser.error(f"no data file at {args.data}")
    stop_children_on_sigterm()
    Bench(args).run()


if __name__ == "__main__":
    script_main(main)

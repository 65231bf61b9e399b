"""Interactive query latency while the stream runs: p50 / p99 / p99.9 of
GET /users/{id}/recommendations at --qps queries/s, while the bundled Wikipedia file is
produced at --rate events/s through the router and --workers workers.

Runs on the real local broker (`jodie broker up` first), on fresh topics (a unique
JODIE_TOPIC_PREFIX, deleted at the end), a temporary JODIE_STATE_DIR and free ports. The
workers serve --checkpoint (its states must end at row --start of the bundled file), or
without it a checkpoint made here: random weights with a history ranker of fixed terms, the
states of the file's first --start rows (the latency does not depend on the weights' quality).

The producer replays the file from row --start at --rate. After --warmup seconds the queries
start, open loop: one is due every 1/qps s, for a user drawn from the rows produced at least
--settle s before (most are known to the pipeline; an unknown one answers 404, counted apart),
asked of a worker drawn at random (so about half the queries are forwarded to the owner), on
--clients client threads, each query on a new connection (--keep-alive: each client thread
keeps one to each worker, as a service calling the workers would). A query's latency runs
from the time it was due, so a slow answer delays the figures, not the next query. Printed:
latency percentiles of the answered queries (direct and forwarded apart; also from the
moment a client thread sent it, which leaves out the wait for a free client thread),
answers by status (503: shed by an overloaded worker, counted apart from the answers), the
achieved query rate, the stream's side: events applied per second by the workers and their
inbox lag (their /metrics.json pages; a page that could not be read says so, never 0), and
the CPU each process used meanwhile (/proc: cores, 1.0 = one busy core).
SIGTERM stops the router, the workers and the producer as Ctrl-C does.

    jodie broker up
    python benchmarks/query_latency.py                       # 200 queries/s, 500 events/s
    python benchmarks/query_latency.py --qps 100 --duration 30
    python benchmarks/query_latency.py --keep-alive
    jodie broker down
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import random
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from deploy.kafka import broker
from deploy.kafka.broker import BrokerConfig
from operators.dataset import bundled_wikipedia, load_interactions
from operators.model.synthetic import synthetic_checkpoint
from streams.children import Child, free_port, spawn, stop_children_on_sigterm
from streams.cli.common import script_main
from streams.settings import read_settings
from streams.topics import scratch_topics


def get_json(url: str, timeout_s: float = 5.0) -> tuple[int, dict[str, str], Any]:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as reply:
            return reply.status, dict(reply.headers), json.loads(reply.read())
    except urllib.error.HTTPError as reply:
        with reply:
            return reply.code, dict(reply.headers), json.loads(reply.read() or b"null")


@dataclass
class Answer:
    due: float  # monotonic time the query was due
    latency_s: float
    status: int  # 0: no answer (refused, timed out)
    forwarded: bool
    sent_s: float  # from sending to the answer: the latency without the client's own queue


def percentiles(values_s: list[float]) -> str:
    if not values_s:
        return "no answers"
    ms = np.asarray(values_s) * 1000
    p50, p99, p999 = np.percentile(ms, [50, 99, 99.9])
    return (
        f"p50 {p50:.1f} ms, p99 {p99:.1f} ms, p99.9 {p999:.1f} ms, max {ms.max():.1f} ms "
        f"(n={len(ms)})"
    )


def worker_pages(urls: list[str], timeout_s: float = 10.0) -> list[dict[str, Any]] | None:
    """Every worker's /metrics.json (/metrics is Prometheus text); None if any cannot be read
    (a busy worker may answer late: read again rather than count it as zero)."""
    pages = []
    for url in urls:
        for _attempt in range(3):
            with contextlib.suppress(OSError, ValueError):
                status, _headers, page = get_json(url + "/metrics.json", timeout_s)
                if status == 200 and isinstance(page, dict):
                    pages.append(page)
                    break
        else:
            return None
    return pages


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of process ``pid`` so far (None: gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime


def broker_pid() -> int | None:
    return broker.status(BrokerConfig.from_settings(read_settings())).pid


def cpu_use(named: dict[str, int], before: dict[str, float | None], wall_s: float) -> str:
    """Cores each process used since ``before`` (its CPU seconds then)."""
    used = []
    for name, pid in named.items():
        now, then = cpu_s(pid), before.get(name)
        if now is not None and then is not None:
            used.append(f"{name} {(now - then) / wall_s:.2f}")
    return ", ".join(used)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, help="default: one made here (see above)")
    parser.add_argument("--start", type=int, default=2000, help="first row streamed")
    parser.add_argument("--rate", type=float, default=500.0, help="events/s produced")
    parser.add_argument("--qps", type=float, default=200.0, help="queries/s")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--warmup", type=float, default=20.0, help="s of stream before queries")
    parser.add_argument("--duration", type=float, default=60.0, help="s of queries")
    parser.add_argument("--settle", type=float, default=5.0, help="s before a user is asked")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--clients", type=int, default=64, help="client threads")
    parser.add_argument(
        "--keep-alive",
        action="store_true",
        help="each client thread keeps a connection to each worker (default: one per query)",
    )
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="jodie-query-bench-"))
    checkpoint = args.checkpoint or synthetic_checkpoint(
        tmp / "ckpt", args.start, version="bench-v1"
    )
    log = load_interactions(bundled_wikipedia())
    events = int(args.rate * (args.warmup + args.duration + 30))
    if args.start + events > len(log.user_ids):
        raise SystemExit(f"the bundled file has {len(log.user_ids)} rows; lower the rate")

    with pipeline("qbench", tmp, checkpoint, args.workers) as p:
        run(args, p.env, p.urls, [str(u) for u in log.user_ids], events, p.procs, tmp)
    print(f"logs in {tmp}")


@dataclass
class Pipeline:
    env: dict[str, str]  # the children's environment (JODIE_STATE_DIR under the tmp folder)
    urls: list[str]  # each worker's web address, worker 0 first
    procs: list[Child]  # the router, then the workers; a child appended here is stopped too

    @property
    def workers(self) -> list[Child]:
        return self.procs[1 : 1 + len(self.urls)]


@contextlib.contextmanager
def pipeline(name: str, tmp: Path, checkpoint: Path, workers: int) -> Iterator[Pipeline]:
    """Fresh topics (prefix ``name``), a router and ``workers`` workers serving
    ``checkpoint``, each worker's web page on a free port, logs in ``tmp``; on the way out
    every child in ``procs`` is stopped (SIGTERM to this process too) and the topics deleted."""
    stop_children_on_sigterm()  # `kill <pid>` stops the children too
    ports = [free_port() for _ in range(workers)]
    with scratch_topics(name):
        env = {**os.environ, "JODIE_STATE_DIR": str(tmp / "state")}
        procs = [spawn("router", ["router"], tmp, env)]
        for n in range(workers):
            # A worker listens on JODIE_WEB_PORT + its id.
            worker_env = {**env, "JODIE_WEB_PORT": str(ports[n] - n)}
            cmd = ["worker", "--checkpoint", str(checkpoint), "--id", str(n)]
            procs.append(spawn(f"worker-{n}", cmd, tmp, worker_env))
        try:
            yield Pipeline(env, [f"http://127.0.0.1:{port}" for port in ports], procs)
        finally:
            for proc in procs:
                proc.stop()


def run(
    args: argparse.Namespace,
    env: dict[str, str],
    urls: list[str],
    users: list[str],
    events: int,
    procs: list[Child],
    tmp: Path,
) -> None:
    # The workers answer once they hold partitions (a user's owner exists).
    deadline = time.monotonic() + 180
    probe = f"/users/{users[0]}/recommendations?k=1"
    while not all(get_json_or_zero(u + probe) == 200 for u in urls):
        if time.monotonic() > deadline or not all(p.alive() for p in procs):
            raise SystemExit(f"the workers did not come up; see the logs in {tmp}")
        time.sleep(0.5)

    began = time.monotonic()
    produce = ["produce", "--rate", str(args.rate), "--start", str(args.start)]
    procs.append(spawn("produce", [*produce, "--limit", str(events)], tmp, env))
    print(
        f"stream: {args.rate:.0f} events/s from row {args.start}, router + {args.workers} "
        f"workers; queries: {args.qps:.0f}/s, k={args.k}, after {args.warmup:.0f} s of warm-up, "
        f"for {args.duration:.0f} s; {os.cpu_count()} CPUs (load {os.getloadavg()[0]:.1f})",
        flush=True,
    )
    time.sleep(args.warmup)
    named = {"router": procs[0].pid, **{f"worker {n}": p.pid for n, p in enumerate(procs[1:-1])}}
    named["producer"], named["benchmark"] = procs[-1].pid, os.getpid()
    pid = broker_pid()
    if pid is not None:
        named["broker"] = pid
    before = worker_pages(urls)
    t0 = time.monotonic()
    cpu_before = {name: cpu_s(pid) for name, pid in named.items()}
    answers: list[Answer] = []
    lags: list[int] = []
    unread = 0  # lag samples whose pages could not be read
    rng = random.Random(0)

    kept = threading.local()  # --keep-alive: each client thread's connections

    def ask(due: float, url: str) -> None:
        sent = time.monotonic()
        status, headers = 0, dict[str, str]()
        with contextlib.suppress(OSError, ValueError):  # no answer: status 0
            if args.keep_alive:
                status, headers = get_kept(kept, url, timeout_s=10.0)
            else:
                status, headers, _body = get_json(url, timeout_s=10.0)
        now = time.monotonic()
        answers.append(Answer(due, now - due, status, "Via" in headers, now - sent))

    def sample_lag() -> None:
        nonlocal unread
        while time.monotonic() - t0 < args.duration:
            pages = worker_pages(urls, timeout_s=2.0)
            if pages is None:
                unread += 1
            else:
                lags.append(sum(max(0, p.get("lag", 0)) for p in pages))
            time.sleep(2.0)

    threading.Thread(target=sample_lag, daemon=True).start()
    n = int(args.qps * args.duration)
    pool = ThreadPoolExecutor(max_workers=args.clients)
    try:
        for q in range(n):
            due = t0 + q / args.qps
            pause = due - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            produced = args.start + int((due - began - args.settle) * args.rate)
            user = users[rng.randrange(max(1, produced))]
            url = f"{rng.choice(urls)}/users/{user}/recommendations?k={args.k}"
            pool.submit(ask, due, url)
    except BaseException:
        # Stopped (SIGTERM, Ctrl-C): drop the queries not sent, so the exit waits at most for
        # those in flight.
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    elapsed = time.monotonic() - t0
    # The stream's side over the same window as the queries were due.
    after = worker_pages(urls)
    cpu = cpu_use(named, cpu_before, time.monotonic() - t0)
    # Queries still queued when the time is up were never sent (every client thread was
    # waiting for an answer): counted apart. Those in flight end within their timeout.
    pool.shutdown(wait=True, cancel_futures=True)

    ok = [a for a in answers if a.status in (200, 404)]
    by_status: dict[int, int] = {}
    for a in answers:
        by_status[a.status] = by_status.get(a.status, 0) + 1
    print(
        f"queries: {n} due in {elapsed:.1f} s = {n / elapsed:.1f}/s, {n - len(answers)} never "
        f"sent (all {args.clients} client threads waiting); answers by status "
        f"{dict(sorted(by_status.items()))} (0: none within 10 s; 503: shed, not answered); "
        f"answered {len(ok) / elapsed:.1f}/s"
    )
    print(f"latency, all answered:  {percentiles([a.latency_s for a in ok])}")
    print(f"latency, 200 only:      {percentiles([a.latency_s for a in ok if a.status == 200])}")
    print(f"latency, direct:        {percentiles([a.latency_s for a in ok if not a.forwarded])}")
    print(f"latency, forwarded:     {percentiles([a.latency_s for a in ok if a.forwarded])}")
    print(f"from send, answered:    {percentiles([a.sent_s for a in ok])}")
    print(f"from send, shed (503):  {percentiles([a.sent_s for a in answers if a.status == 503])}")
    if before is None or after is None:
        rate = "? events/s applied by the workers (a /metrics.json page could not be read)"
    else:
        applied = sum(p.get("user_events", 0) for p in after) - sum(
            p.get("user_events", 0) for p in before
        )
        rate = f"{applied / elapsed:.0f} events/s applied by the workers"
    print(
        f"stream meanwhile: {rate} (produced at {args.rate:.0f}/s); inbox lag "
        f"{lags[0] if lags else '?'} → {lags[-1] if lags else '?'} (max "
        f"{max(lags) if lags else '?'}; {len(lags)} samples, {unread} unread); "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    print(f"CPU meanwhile (cores): {cpu}")


def get_kept(kept: threading.local, url: str, timeout_s: float) -> tuple[int, dict[str, str]]:
    """GET ``url`` on this thread's open connection to its host (opened when missing, dropped
    when it fails): status and headers, the body read and parsed."""
    parts = urllib.parse.urlsplit(url)
    connections: dict[str, http.client.HTTPConnection] = kept.__dict__.setdefault("by_host", {})
    connection = connections.get(parts.netloc)
    if connection is None:
        connection = http.client.HTTPConnection(parts.netloc, timeout=timeout_s)
        connections[parts.netloc] = connection
    try:
        connection.request("GET", f"{parts.path}?{parts.query}")
        reply = connection.getresponse()
        json.loads(reply.read())
    except (OSError, ValueError, http.client.HTTPException):
        connections.pop(parts.netloc).close()
        raise OSError(f"no answer from {parts.netloc}") from None
    return reply.status, dict(reply.getheaders())


def get_json_or_zero(url: str) -> int:
    try:
        return get_json(url)[0]
    except (OSError, ValueError):
        return 0


if __name__ == "__main__":
    script_main(main)

"""CPU time of one interactive query in the workers, direct and forwarded: µs per
GET /users/{id}/recommendations, read from the workers' /proc CPU counters.

Runs on the real local broker (`jodie broker up` first), on fresh topics: a router and
--workers workers (as query_latency.py starts them) apply rows [--start, --start + --events)
of the bundled file, then sit idle. Each user of those rows is asked once of worker 0 to learn
whether worker 0 owns it (direct) or forwards it (its answer's ``Via`` header). Then, for each
kind, --queries queries are fired at worker 0 from --clients client threads, and the CPU time
(user + system) every worker spent meanwhile is read from /proc, less what it spends idle in
the same wall time (measured first). Each query on a new connection, or with --keep-alive on
one each client thread keeps. Printed per kind: queries/s achieved, CPU µs per query
in the worker asked and in the owner, and the statuses.

    jodie broker up
    python benchmarks/query_cost.py
    python benchmarks/query_cost.py --queries 4000 --clients 8
    python benchmarks/query_cost.py --keep-alive
    jodie broker down
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.query_latency import cpu_s, get_json, get_kept, pipeline
from operators.dataset import bundled_wikipedia, load_interactions
from operators.model.synthetic import synthetic_checkpoint
from streams.children import Child, spawn
from streams.cli.common import script_main


def alive_cpu_s(pid: int) -> float:
    """CPU seconds of a worker that must still run (the figures mean nothing otherwise)."""
    used = cpu_s(pid)
    if used is None:
        raise SystemExit(f"worker pid {pid} exited during the measurement")
    return used


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--start", type=int, default=2000, help="first row streamed")
    parser.add_argument("--events", type=int, default=5000, help="rows applied first")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--queries", type=int, default=2000, help="per kind")
    parser.add_argument("--clients", type=int, default=4, help="client threads")
    parser.add_argument("--idle", type=float, default=5.0, help="s of idle CPU measured")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument(
        "--keep-alive",
        action="store_true",
        help="each client thread keeps its connection (default: one per query)",
    )
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="jodie-query-cost-"))
    checkpoint = synthetic_checkpoint(tmp / "ckpt", args.start, version="bench-v1")
    log = load_interactions(bundled_wikipedia())
    users = sorted({str(u) for u in log.user_ids[args.start : args.start + args.events]})

    with pipeline("qcost", tmp, checkpoint, args.workers) as p:
        produce = ["produce", "--start", str(args.start), "--limit", str(args.events)]
        p.procs.append(spawn("produce", produce, tmp, p.env))
        wait_applied(p.urls, args.events, p.procs, tmp)
        measure(args, p.urls, users, [w.pid for w in p.workers])
    print(f"logs in {tmp}")


def wait_applied(urls: list[str], events: int, procs: list[Child], tmp: Path) -> None:
    """Until the workers have applied ``events`` user events between them."""
    deadline = time.monotonic() + 300
    while True:
        applied = 0
        for url in urls:
            with contextlib.suppress(OSError, ValueError):
                applied += int(get_json(url + "/metrics.json")[2].get("user_events", 0))
        if applied >= events:
            return
        if time.monotonic() > deadline or any(p.proc.poll() not in (None, 0) for p in procs):
            raise SystemExit(f"{applied} of {events} events applied; see the logs in {tmp}")
        time.sleep(1.0)


def measure(args: argparse.Namespace, urls: list[str], users: list[str], pids: list[int]) -> None:
    asked = urls[0]
    kinds: dict[str, list[str]] = {"direct": [], "forwarded": []}
    for user in users:
        status, headers, _body = get_json(f"{asked}/users/{user}/recommendations?k={args.k}")
        if status == 200:
            kinds["forwarded" if "Via" in headers else "direct"].append(user)
    print(
        f"{len(users)} users of {args.events} events: {len(kinds['direct'])} owned by worker 0, "
        f"{len(kinds['forwarded'])} forwarded; {args.queries} queries per kind from "
        f"{args.clients} client threads; {os.cpu_count()} CPUs (load {os.getloadavg()[0]:.1f})"
    )
    before = [alive_cpu_s(pid) for pid in pids]
    time.sleep(args.idle)
    idle = [(alive_cpu_s(pid) - b) / args.idle for pid, b in zip(pids, before, strict=True)]
    print("idle CPU: " + ", ".join(f"worker {n} {c * 100:.1f} %" for n, c in enumerate(idle)))
    rng = random.Random(0)
    for kind, pool_of in kinds.items():
        if not pool_of:
            continue
        targets = [
            f"{asked}/users/{rng.choice(pool_of)}/recommendations?k={args.k}"
            for _ in range(args.queries)
        ]
        statuses: Counter[int] = Counter()
        lock = threading.Lock()

        kept = threading.local()

        def ask(
            url: str,
            statuses: Counter[int] = statuses,
            lock: threading.Lock = lock,
            kept: threading.local = kept,
        ) -> None:
            try:
                if args.keep_alive:
                    status = get_kept(kept, url, timeout_s=30.0)[0]
                else:
                    status = get_json(url, timeout_s=30.0)[0]
            except (OSError, ValueError):
                status = 0
            with lock:
                statuses[status] += 1

        began, cpu0 = time.monotonic(), [alive_cpu_s(pid) for pid in pids]
        with ThreadPoolExecutor(max_workers=args.clients) as pool:
            list(pool.map(ask, targets))
        wall = time.monotonic() - began
        spent = [
            alive_cpu_s(pid) - c - i * wall for pid, c, i in zip(pids, cpu0, idle, strict=True)
        ]
        per = [s / args.queries * 1e6 for s in spent]
        print(
            f"{kind:9s}: {args.queries / wall:6.1f} queries/s; CPU per query "
            + ", ".join(f"worker {n} {us:,.0f} µs" for n, us in enumerate(per))
            + f", all workers {sum(per):,.0f} µs; statuses {dict(sorted(statuses.items()))}",
            flush=True,
        )


if __name__ == "__main__":
    script_main(main)

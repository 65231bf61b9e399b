"""How much CPU this machine gives several busy processes at once: its cores in practice.

A virtual machine's cores are not always the host's: two vCPUs may share one physical core
(hyper-threads), or the hypervisor may give them less time together than apart. Then a second
process does not add a core's worth of work, and neither a second worker nor work moved to a
helper process (the live evaluation's, a ranking process) runs beside the first for free.

For k = 1 .. --most processes started together, each runs a fixed pure-Python loop (the
worker's kind of work; --numpy: float32 matrix products, the ranking's kind) for --seconds of
wall time. Printed per k: each process's share of the wall time on a CPU (CPU seconds / wall
seconds), its work per CPU second (how fast a core runs while it has one), and the work of
all k together against one process alone: k processes on k free cores give k.

    python benchmarks/cores.py
    python benchmarks/cores.py --numpy --seconds 10
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import time
from multiprocessing.synchronize import Barrier

import numpy as np
from threadpoolctl import threadpool_limits


def _busy(barrier: Barrier, seconds: float, numpy: bool, out: mp.Queue) -> None:
    """Work until ``seconds`` of wall time have passed; put (work units, CPU s, wall s)."""
    threadpool_limits(1)  # one core's worth each, as a worker and its helpers run
    a = np.random.default_rng(0).random((256, 172), dtype=np.float32)
    b = np.random.default_rng(1).random((172, 1024), dtype=np.float32)
    barrier.wait()
    cpu0, wall0 = time.process_time(), time.monotonic()
    units = 0
    while time.monotonic() - wall0 < seconds:
        if numpy:
            np.argpartition(a @ b, 10, axis=1)
        else:
            n = 0
            for i in range(20_000):
                n += i * i
        units += 1
    out.put((units, time.process_time() - cpu0, time.monotonic() - wall0))


def run(k: int, seconds: float, numpy: bool) -> list[tuple[int, float, float]]:
    """k busy processes started together; each one's (work units, CPU s, wall s)."""
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(k)
    out: mp.Queue = ctx.Queue()
    procs = [ctx.Process(target=_busy, args=(barrier, seconds, numpy, out)) for _ in range(k)]
    for p in procs:
        p.start()
    results = [out.get(timeout=seconds + 60) for _ in procs]
    for p in procs:
        p.join()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--most", type=int, default=os.cpu_count() or 1, help="most processes")
    parser.add_argument("--seconds", type=float, default=5.0, help="wall seconds per step")
    parser.add_argument("--numpy", action="store_true", help="matrix products, not a loop")
    args = parser.parse_args()
    if args.most < 1 or args.seconds <= 0:
        parser.error("--most must be 1 or more and --seconds positive")
    kind = "float32 matrix products" if args.numpy else "a pure-Python loop"
    load = os.getloadavg()[0]
    print(f"{os.cpu_count()} CPUs; {kind}, {args.seconds:g} s per step; load {load:.1f}")
    alone = 0.0
    for k in range(1, args.most + 1):
        results = run(k, args.seconds, args.numpy)
        rates = [units / wall for units, _cpu, wall in results]
        shares = [cpu / wall for _units, cpu, wall in results]
        speeds = [units / cpu for units, cpu, _wall in results if cpu > 0]
        total = sum(rates)
        alone = alone or total
        print(
            f"{k} process(es): CPU share each {', '.join(f'{s:.2f}' for s in shares)} "
            f"(together {sum(shares):.2f} CPUs); work per CPU second "
            f"{min(speeds):,.0f}–{max(speeds):,.0f}; all together {total / alone:.2f}x one alone"
        )


if __name__ == "__main__":
    main()

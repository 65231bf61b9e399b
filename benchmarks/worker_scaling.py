"""More workers against one on a backlog: the goal "2 workers at least as fast as 1", one command.

Runs `benchmarks/stream_throughput.py --prestart --json` with one worker and with --workers
workers in alternated pairs (the order swapped every other pair, so that a drift of the host
weighs on both sides alike), on the running broker (`jodie broker up`), and prints for each
run its sustained events/s and its events per worker CPU second (the workers' own processes,
not their ranking processes), then each pair's ratio and the median. The host's speed moves
from hour to hour by more than most changes do, so only a ratio within a pair says whether
more workers pay. A run whose broker compiler took a second or more of CPU is marked: the
broker was still warming up (README, *A fresh broker compiles for minutes*).

    jodie broker up
    python benchmarks/worker_scaling.py --checkpoint M --events 30000 --pairs 3
    jodie broker down

Arguments after `--` go to stream_throughput.py as they are (e.g. `-- --start 120000`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

THROUGHPUT = Path(__file__).resolve().parent / "stream_throughput.py"
WARM_JIT_S = 1.0  # the broker compiler's CPU in a run from which the broker counts as warm


def run(
    checkpoint: Path, workers: int, events: int, extra: list[str], timeout: float
) -> dict[str, Any]:
    """One stream_throughput.py run's JSON; exits with its log's tail when it failed."""
    command = [
        sys.executable,
        str(THROUGHPUT),
        *("--checkpoint", str(checkpoint), "--workers", str(workers)),
        *("--events", str(events), "--prestart", "--json", *extra),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def per_worker_cpu_s(result: dict[str, Any]) -> float:
    """The workers' CPU over the measured span (their ranking processes apart)."""
    cpu = result.get("cpu_s_measured") or {}
    return sum(
        float(s) for name, s in cpu.items() if name.startswith("worker-") and " " not in name
    )


def describe(result: dict[str, Any]) -> tuple[float, str]:
    side = result["worker_side"]
    rate = float(side["events_per_s"])
    cpu = per_worker_cpu_s(result)
    per_core = (
        f"{side['distinct_events'] / cpu:,.0f} per worker CPU second" if cpu else "CPU unknown"
    )
    jit = result.get("broker_jit_cpu_s")
    cold = (
        f", broker still warming up (its compiler {jit:.1f} s)" if jit and jit >= WARM_JIT_S else ""
    )
    text = (
        f"{result['workers']} worker(s) {rate:,.0f} events/s ({per_core}, workers' CPU {cpu:.1f} s)"
    )
    return rate, text + cold


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="checkpoint to serve")
    parser.add_argument("--events", type=int, default=30000, help="events per run")
    parser.add_argument("--workers", type=int, default=2, help="workers to compare with one")
    parser.add_argument("--pairs", type=int, default=3, help="alternated pairs of runs")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per run")
    parser.add_argument("extra", nargs="*", help="after --: more stream_throughput.py arguments")
    a = parser.parse_args()
    if a.workers < 2 or a.pairs < 1:
        parser.error("--workers must be 2 or more and --pairs 1 or more")
    ratios: list[float] = []
    for pair in range(1, a.pairs + 1):
        order = (1, a.workers) if pair % 2 else (a.workers, 1)
        rates: dict[int, float] = {}
        for workers in order:
            rates[workers], text = describe(
                run(a.checkpoint, workers, a.events, a.extra, a.timeout)
            )
            print(f"pair {pair}: {text}", flush=True)
        ratios.append(rates[a.workers] / rates[1])
        print(f"pair {pair}: {a.workers} workers / 1 worker = {ratios[-1]:.0%}", flush=True)
    met = sum(r >= 1.0 for r in ratios)
    print(
        f"summary: {a.workers} workers / 1 worker on {a.events} events: median "
        f"{statistics.median(ratios):.0%} ({min(ratios):.0%}–{max(ratios):.0%}) over "
        f"{len(ratios)} pair(s); at least as fast in {met} of {len(ratios)}"
    )


if __name__ == "__main__":
    main()

"""What one call of the stream's model costs by its size, and the sizes the stream's waves have.

A worker applies events in waves: each side's model is called once per wave on the ready
events of distinct entities (``operators.protocol.exchange.drive``), and a user's events, or
an item's, wait for each other, so a wave holds few events. Each call pays a fixed part (some
sixty small numpy and Python steps) besides its per-event part, and that fixed part is what a
"faster model step on small batches" (docs/scaling.md) would remove.

Runs the processor as ``processor_speed.py`` does (one worker owning every partition), with
each side's calls (``StreamModel.apply_users``, ``apply_items``) recorded: their sizes and the
thread CPU they took. Then times each side alone at sizes 1, 2, 4, ... up to --largest on the
run's own inputs (recorded states, partner states and events, taken in order), fits CPU per
call = fixed + per-event × size to the medians (relative errors weighted alike), and prints
the waves' sizes, the fit, and how much of the model's CPU per event the fixed part is at the
run's waves.

    python benchmarks/model_calls.py --checkpoint CKPT --start 62989 --events 20000
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from processor_speed import apply, count, workload, workload_arguments

from streams.cli.common import script_main

SIDES = (("user", "apply_users"), ("item", "apply_items"))


class Recorded:
    """One side's calls during the run: sizes, thread CPU seconds, and the inputs in order."""

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.seconds: list[float] = []
        self.states: list[Any] = []
        self.partners: list[Any] = []
        self.events: list[Any] = []

    def wrap(self, method: Callable[..., Any]) -> Callable[..., Any]:
        def recorded(states: list[Any], partners: list[Any], events: list[Any]) -> Any:
            began = time.thread_time()
            out = method(states, partners, events)
            self.seconds.append(time.thread_time() - began)
            self.sizes.append(len(events))
            self.states += states
            self.partners += partners
            self.events += events
            return out

        return recorded

    def inputs(self, size: int) -> tuple[list[Any], list[Any], list[Any]]:
        """The first ``size`` recorded rows (wrapping round when fewer were recorded)."""
        rows = [k % len(self.events) for k in range(size)]
        return (
            [self.states[r] for r in rows],
            [self.partners[r] for r in rows],
            [self.events[r] for r in rows],
        )


def timed(method: Callable[..., Any], args: tuple[Any, ...], seconds: float) -> float:
    """Median thread CPU seconds of one ``method(*args)`` over 5 rounds of ``seconds`` each."""
    method(*args)  # first call: caches (static rows) warm
    rounds = []
    for _ in range(5):
        calls, began = 0, time.thread_time()
        while True:
            method(*args)
            calls += 1
            spent = time.thread_time() - began
            if spent >= seconds:
                break
        rounds.append(spent / calls)
    return statistics.median(rounds)


def sizes_up_to(largest: int) -> list[int]:
    out, size = [], 1
    while size < largest:
        out.append(size)
        size *= 2
    return [*out, largest]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    workload_arguments(parser)
    parser.add_argument("--largest", type=count, default=256, help="largest call size timed")
    parser.add_argument(
        "--seconds", type=float, default=0.1, help="CPU seconds per timing round and size"
    )
    args = parser.parse_args()
    if args.seconds <= 0:
        parser.error("--seconds must be positive")
    proc, stream = workload(args)
    model = proc.serving.stream
    recorded = {side: Recorded() for side, _name in SIDES}
    for side, name in SIDES:
        # The processor's batched apply functions look the method up on the instance at
        # each call, so an instance attribute takes their place.
        setattr(model, name, recorded[side].wrap(getattr(model, name)))
    # One BLAS thread, as a worker computes: Serving.of (in workload) set that limit.
    apply(proc, stream, args.batch, lambda: None)
    for _side, name in SIDES:
        delattr(model, name)
    events = proc.stats.user_events
    print(f"{events} events, batch {args.batch} inbox messages, the model's calls by side:")
    for side, _name in SIDES:
        sizes = np.asarray(recorded[side].sizes)
        small = sizes[sizes <= 4].sum() / max(1, sizes.sum())
        spent = sum(recorded[side].seconds)
        print(
            f"  {side} side: {sizes.size:,} calls, {sizes.mean():.1f} events per call "
            f"(median {np.median(sizes):.0f}, largest {sizes.max()}), {100 * small:.0f} % "
            f"of its events in calls of 4 or fewer; {1e6 * spent / events:.1f} µs/event "
            f"of thread CPU in the run"
        )
    grid = sizes_up_to(args.largest)
    per_call: dict[str, list[float]] = {}
    gc.disable()  # a collection inside one size's rounds would weigh on it alone
    try:
        for side, name in SIDES:
            method = getattr(model, name)
            per_call[side] = [
                timed(method, recorded[side].inputs(size), args.seconds) for size in grid
            ]
    finally:
        gc.enable()
    print("CPU per call timed alone, median of 5 rounds (µs per call, µs per event):")
    print(f"  {'size':>5}  {'user side':>20}  {'item side':>20}")
    for k, size in enumerate(grid):
        cells = [
            f"{1e6 * per_call[side][k]:9,.0f} {1e6 * per_call[side][k] / size:9.1f}"
            for side, _name in SIDES
        ]
        print(f"  {size:>5}  {cells[0]:>20}  {cells[1]:>20}")
    for side, _name in SIDES:
        times = np.asarray(per_call[side])
        if len(grid) > 1:
            # Weighted by 1 / time: each size's relative error counts alike, so the large
            # calls' absolute noise does not swamp the fixed part the small ones show.
            slope, fixed = np.polyfit(np.asarray(grid, dtype=np.float64), times, 1, w=1 / times)
        else:
            slope, fixed = 0.0, float(times[0])
        sizes = np.asarray(recorded[side].sizes, dtype=np.float64)
        at_waves = (fixed * sizes.size + slope * sizes.sum()) / events
        at_largest = (fixed / args.largest + slope) * sizes.sum() / events
        print(
            f"{side} side: {1e6 * fixed:,.0f} µs per call + {1e6 * slope:.1f} µs per event "
            f"(fit); at the run's waves {1e6 * at_waves:.1f} µs/event, of which the "
            f"fixed part {100 * fixed * sizes.size / events / max(at_waves, 1e-12):.0f} %; "
            f"{1e6 * at_largest:.1f} µs/event if every call held {args.largest} events"
        )


if __name__ == "__main__":
    script_main(main)

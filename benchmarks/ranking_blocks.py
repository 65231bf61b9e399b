"""The served lists' ranking in the exact tier, per query, by the size of its blocks of queries.

Runs the processor over the events as ``processor_speed.py`` does, recording each batch's
ranking call (``TieredIndex.recommend``: a copy of the index at that point, the queries and
the ranker's terms). Then replays the recorded calls with blocks of at most each of --sizes
(queries × items) floats, in alternated rounds, on one thread as a worker ranks. Prints CPU µs
per query (minimum and median over the rounds) and the median of each round's ratio to the
first size, and how far each size's lists are from the first's: the batched distance product
rounds differently for blocks of a few queries (``VectorStore.sqdist``). The first size's
lists are also held against those the run served, which they equal unless the replay ranks
another index than the one each call saw.

    python benchmarks/ranking_blocks.py --checkpoint CKPT --start 62989 --events 20000
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from typing import Any

import numpy as np
from processor_speed import apply, workload, workload_arguments
from threadpoolctl import threadpool_limits

from streams.cli.common import script_main

SIZES = [1 << 24, 1 << 20, 1 << 18, 1 << 16]


def record(proc: Any, stream: list[tuple[str, bytes, bytes]], batch: int) -> list[Any]:
    """Each ranking call of the processor over ``stream``: (index copy, args, kwargs, the
    lists it returned)."""
    index = proc.serving.index
    recommend = index.recommend
    calls: list[Any] = []

    def recorded(*args: Any, **kwargs: Any) -> Any:
        # The index as this call sees it: later batches upsert into the original. The copy
        # would carry this wrapper too, and rank with the original: it gets the class's.
        snapshot = copy.deepcopy(index)
        del snapshot.recommend
        served = recommend(*args, **kwargs)
        calls.append((snapshot, args, kwargs, served))
        return served

    index.recommend = recorded
    try:
        apply(proc, stream, batch, lambda: None)
    finally:
        del index.recommend
    return calls


def replay(calls: list[Any], size: int) -> tuple[float, list[Any]]:
    """CPU seconds of every call at blocks of ``size`` floats at most, and their lists."""
    from operators.retrieval import tiered

    tiered.CACHE_BLOCK_ELEMS = size
    lists = []
    began = time.process_time()
    for index, args, kwargs, _served in calls:
        lists.append(index.recommend(*args, **kwargs))
    return time.process_time() - began, lists


def differences(lists: list[Any], first: list[Any]) -> tuple[int, float]:
    """How many of ``lists`` rank other ids than ``first``'s, and the largest difference of
    their keys where the ids agree."""
    other, keys = 0, 0.0
    for mine, theirs in zip(lists, first, strict=True):
        for (a_ids, a_keys), (b_ids, b_keys) in zip(mine, theirs, strict=True):
            if a_ids != b_ids:
                other += 1
            elif a_keys.size:
                keys = max(keys, float(np.max(np.abs(a_keys - b_keys))))
    return other, keys


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    workload_arguments(parser)
    parser.add_argument("--sizes", type=int, nargs="+", default=SIZES)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    if args.rounds < 1 or min(args.sizes) < 1:  # --events and --batch: workload_arguments
        parser.error("--rounds and every --sizes must be 1 or more")
    proc, stream = workload(args)
    calls = [c for c in record(proc, stream, args.batch) if not c[0].approximate]
    queries = sum(len(c[1][0]) for c in calls)
    if not queries:
        raise SystemExit("no ranking call in the exact tier: more --events?")
    items = len(calls[-1][0])
    served = [c[3] for c in calls]
    print(f"{len(calls)} ranking calls, {queries} queries, {items} items at the last")
    threadpool_limits(1)  # as a worker ranks (streams.app.serving)
    seconds: dict[int, list[float]] = {size: [] for size in args.sizes}
    apart: dict[int, tuple[int, float]] = {}
    first: list[Any] | None = None
    for _round in range(args.rounds):
        for size in args.sizes:
            spent, lists = replay(calls, size)
            seconds[size].append(spent)
            first = lists if first is None else first
            apart[size] = differences(lists, first)
    base = seconds[args.sizes[0]]
    assert first is not None
    other, keys = differences(first, served)
    # The replay ranks what the run ranked: each copy is the index as its call saw it.
    print(
        f"the first size against the lists the run served: {other} with other ids, "
        f"keys within {keys:.1e}"
    )
    for size, rounds in seconds.items():
        ratio = statistics.median(s / b for s, b in zip(rounds, base, strict=True))
        other, keys = apart[size]
        print(
            f"blocks of at most {size:>10,} floats: {1e6 * min(rounds) / queries:6.1f} µs/query "
            f"min, {1e6 * statistics.median(rounds) / queries:6.1f} median; "
            f"{ratio:.3f} of the first, round by round (median); against the first's lists: "
            f"{other} with other ids, keys within {keys:.1e}"
        )


if __name__ == "__main__":
    script_main(main)

"""Which of a user's earlier items comes back: recency, counts and each pair's rhythm.

A candidate signal for the ranker's older repeats, measured before building it. Scored: the
"older repeat" events of the test split (the last 10 %): the item is in the user's history but
is not the last one. Each is ranked among the user's earlier items other than the last, from
the events before it only (rank = 1 + the number of candidates scored strictly higher):

- recency: the time the user last touched the item (most recent first);
- count: the user's events on the item (ties: recency);
- rhythm: how close the time since the user last touched the item is to the pair's usual gap
  (its mean gap between the user's events on it, in log seconds), pairs seen once after every
  pair seen twice or more (by recency);
- log-recency + w · rhythm and log-recency + w · log count: each signal added to −log(1 + age)
  at a few weights.

Repeat consumption often follows a per-pair rhythm (someone messages a friend every few days);
if it did here, the ranker would need each history entry's first time as well as its last.

    python benchmarks/repeat_signal.py [--data F ...]
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import numpy as np

from operators.dataset import comparison_logs, load_interactions
from streams.cli.common import existing_file, script_main


def _rank(scores: np.ndarray, true: int) -> int:
    return 1 + int((scores > scores[true]).sum())


def measure(path: Path, test_fraction: float = 0.1) -> dict[str, list[int]]:
    log = load_interactions(path)
    users = log.user_ids.tolist()
    items = log.item_ids.tolist()
    times = log.timestamps.astype(np.float64).tolist()
    start = int(len(users) * (1.0 - test_fraction))
    first: dict[tuple[str, str], float] = {}
    last: dict[tuple[str, str], float] = {}
    count: dict[tuple[str, str], int] = defaultdict(int)
    history: dict[str, dict[str, None]] = defaultdict(dict)  # a user's items, ordered
    previous: dict[str, str] = {}
    ranks: dict[str, list[int]] = defaultdict(list)
    for k, (u, i, t) in enumerate(zip(users, items, times, strict=True)):
        prev = previous.get(u)
        if k >= start and prev is not None and i in history[u] and i != prev:
            cands = [c for c in history[u] if c != prev]
            true = cands.index(i)
            seen = np.array([last[(u, c)] for c in cands])
            began = np.array([first[(u, c)] for c in cands])
            n = np.array([count[(u, c)] for c in cands], dtype=np.float64)
            age = np.log1p(t - seen)
            gap = np.where(n >= 2, np.log1p((seen - began) / np.maximum(n - 1.0, 1.0)), np.nan)
            off = np.abs(age - gap)  # NaN for pairs seen once
            ranks["recency"].append(_rank(seen, true))
            ranks["count"].append(_rank(n + seen / (t + 1.0), true))
            # Pairs with a rhythm first, closest to it first; then the others by recency.
            rhythm = np.where(np.isnan(off), -1e6 - age, -np.nan_to_num(off))
            ranks["rhythm"].append(_rank(rhythm, true))
            for w in (0.25, 0.5, 1.0):
                mixed = -age - w * np.where(np.isnan(off), 1.0, off)
                ranks[f"log-recency + {w:g} rhythm"].append(_rank(mixed, true))
            for w in (0.5, 1.0):
                ranks[f"log-recency + {w:g} log count"].append(_rank(-age + w * np.log(n), true))
        pair = (u, i)
        first.setdefault(pair, t)
        last[pair] = t
        count[pair] += 1
        history[u].pop(i, None)
        history[u][i] = None
        previous[u] = i
    return ranks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=existing_file, nargs="*", default=comparison_logs())
    args = parser.parse_args()
    for path in args.data:
        ranks = measure(path)
        n = len(ranks.get("recency", []))
        print(f"{path.name}: {n} older repeats in the test split (last 10 %)")
        for method, rs in ranks.items():
            r = np.asarray(rs, dtype=float)
            print(
                f"  {method:30s} MRR {float((1.0 / r).mean()):.4f}  Recall@10 "
                f"{float((r <= 10).mean()):.4f}"
            )


if __name__ == "__main__":
    script_main(main)

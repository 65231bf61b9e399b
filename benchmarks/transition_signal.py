"""How much item-to-item transitions say about a user's next item, on the three logs.

A candidate signal for the ranker, measured before building it. The transitions are counted
over the log as it streams: after each event, the pair (the user's previous item → this item)
is added, so an event is scored only from the events before it, as the frozen protocol does.
Scored: the test split (the last 10 %), by what the user did next.

- "older repeat" events (the item is in the user's history but is not the last one), ranked
  among the user's earlier items other than the last: recency (most recent first), against
  the user's own transitions out of the last item (ties: recency).
- "new to the user" events, ranked among the items the user has not touched: popularity
  (count so far), against every user's transitions out of this user's last item (ties:
  popularity).

Prints MRR and Recall@10 of each (rank = 1 + the number of candidates scored strictly higher).

    python benchmarks/transition_signal.py [--data F ...]
"""

from __future__ import annotations

import argparse
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from operators.dataset import comparison_logs, load_interactions
from operators.evaluation.baselines import replay_before
from streams.cli.common import existing_file


def _rank(scores: np.ndarray, true: int) -> int:
    return 1 + int((scores > scores[true]).sum())


def measure(path: Path, test_fraction: float = 0.1) -> dict[str, dict[str, list[int]]]:
    log = load_interactions(path)
    n_items, events = replay_before(log)
    start = int(len(log.user_ids) * (1.0 - test_fraction))
    own: dict[tuple[str, int], Counter[int]] = defaultdict(Counter)
    everyone: dict[int, Counter[int]] = defaultdict(Counter)
    ranks: dict[str, dict[str, list[int]]] = {
        "older repeat": {"recency": [], "own transitions": []},
        "new to the user": {"popularity": [], "everyone's transitions": []},
    }
    for k, u, i, prev, before, popularity in events:
        if k >= start and prev is not None:
            if i in before and i != prev:
                cands = [c for c in before if c != prev]
                when = np.array([before[c] for c in cands], dtype=float)
                counts = np.array([own[(u, prev)][c] for c in cands], dtype=float)
                true = cands.index(i)
                # ties on the count broken by recency: the count dominates, recency orders within
                tie = when / (k + 1.0)
                ranks["older repeat"]["recency"].append(_rank(when, true))
                ranks["older repeat"]["own transitions"].append(_rank(counts + tie, true))
            elif i not in before:
                mask = np.ones(n_items, dtype=bool)
                mask[list(before)] = False
                cands = np.flatnonzero(mask)
                true = int(np.searchsorted(cands, i))
                pop = popularity[cands]
                counted = np.zeros(n_items)
                out = everyone[prev]
                if out:
                    counted[list(out)] = list(out.values())
                moves = counted[cands]
                ranks["new to the user"]["popularity"].append(_rank(pop, true))
                tie = pop / (popularity.max() + 1.0)
                ranks["new to the user"]["everyone's transitions"].append(_rank(moves + tie, true))
        if prev is not None:
            own[(u, prev)][i] += 1
            everyone[prev][i] += 1
    return ranks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=existing_file, nargs="*", default=comparison_logs())
    args = parser.parse_args()
    for path in args.data:
        print(f"{path.name}: test split (last 10 %)")
        for category, by_method in measure(path).items():
            n = len(next(iter(by_method.values())))
            print(f"  {category}: {n} events")
            for method, rs in by_method.items():
                r = np.asarray(rs, dtype=float)
                mrr = float((1.0 / r).mean()) if r.size else float("nan")
                recall = float((r <= 10).mean()) if r.size else float("nan")
                print(f"    {method:24s} MRR {mrr:.4f}  Recall@10 {recall:.4f}")


if __name__ == "__main__":
    main()

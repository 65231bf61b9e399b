"""Non-learned next-item baselines on the same split and metric code as JODIE.

``recency``: the user's own past items, most recently touched first, then all other known
items by popularity so far. ``popularity``: all known items by popularity so far (number of
events up to now). Ranks follow the shared rule (1 + items scored strictly higher), and an
item never seen before gets n_known + 1, as in ``operators.evaluation.protocols``.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from operators.dataset import InteractionLog
from operators.evaluation.protocols import EvalResult, EvalSplit, breakdown, event_categories

Baseline = Literal["recency", "popularity"]


def baseline_ranks(log: InteractionLog, start: int, stop: int, kind: Baseline) -> np.ndarray:
    """Ranks of events [start, stop) after learning counts and histories from [0, start)."""
    item_index: dict[str, int] = {}
    popularity = np.zeros(len(np.unique(log.item_ids[:stop])) + 1, dtype=np.int64)
    last_seen: dict[str, dict[int, int]] = {}  # user → item → index of the user's last touch
    ranks = np.zeros(max(0, stop - start), dtype=np.int64)
    users, items = log.user_ids[:stop].tolist(), log.item_ids[:stop].tolist()
    for k, (u, i) in enumerate(zip(users, items, strict=True)):
        row = item_index.get(i)
        if k >= start:
            n_known = len(item_index)
            if row is None:
                ranks[k - start] = n_known + 1
            else:
                pop = popularity[:n_known]
                higher = pop > pop[row]
                if kind == "popularity":
                    ranks[k - start] = 1 + int(higher.sum())
                else:
                    mine = last_seen.get(u, {})
                    if row in mine:
                        when = mine[row]
                        ranks[k - start] = 1 + sum(1 for t in mine.values() if t > when)
                    else:
                        others_higher = int(higher.sum()) - sum(1 for r in mine if higher[r])
                        ranks[k - start] = 1 + len(mine) + others_higher
        if row is None:
            row = item_index[i] = len(item_index)
        popularity[row] += 1
        last_seen.setdefault(u, {})[row] = k
    return ranks


def evaluate_baseline(
    log: InteractionLog,
    split_bounds: dict[str, tuple[int, int]],
    kind: Baseline,
    split: EvalSplit = "test",
    limit: int | None = None,
) -> EvalResult:
    """Evaluate a baseline on a split (all earlier events are its history)."""
    start, stop = split_bounds[split]
    if limit is not None:
        stop = min(stop, start + limit)
    ranks = baseline_ranks(log, start, stop, kind)
    result = EvalResult("frozen", split, ranks, log.state_labels[start:stop])
    result.extra["by_category"] = breakdown(ranks, event_categories(log, start, stop))
    return result

"""Non-learned next-item baselines on the same split and metric code as JODIE.

``recency``: the user's own past items, most recently touched first, then all other known
items by popularity so far. ``popularity``: all known items by popularity so far (number of
events up to now). Ranks follow the shared rule (1 + items scored strictly higher), and an
item never seen before gets n_known + 1, as in ``operators.evaluation.protocols``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from typing import Literal, NamedTuple

import numpy as np

from operators.dataset import InteractionLog
from operators.evaluation.protocols import EvalResult, EvalSplit, breakdown, event_categories

Baseline = Literal["recency", "popularity"]


class BaselineRanker:
    """A baseline event by event: ``rank`` an event's item before it, then ``observe`` it.

    ``baseline_ranks`` is this over a log; a stream (the dashboard's live baseline) calls it
    as events arrive. ``max_users`` bounds memory for a stream: the histories of that many most
    recently active users are kept, and a forgotten user ranks as one without history
    (None: every user's, as offline).

    >>> r = BaselineRanker("recency")
    >>> for user, item in [("a", "x"), ("b", "y"), ("b", "x"), ("a", "z")]:
    ...     r.observe(user, item)
    >>> r.rank("a", "x"), r.rank("a", "y"), r.rank("a", "new")
    (2, 3, 4)
    """

    def __init__(self, kind: Baseline, max_users: int | None = None) -> None:
        self.kind = kind
        self.max_users = max_users
        self._item_index: dict[str, int] = {}
        self._popularity = np.zeros(64, dtype=np.int64)
        # user → item row → index of the user's last touch (insertion order: least recent first)
        self._last_seen: OrderedDict[str, dict[int, int]] = OrderedDict()
        self._k = 0

    @property
    def n_items(self) -> int:
        """Items known so far."""
        return len(self._item_index)

    def rank(self, user: str, item: str) -> int:
        """Rank of ``item`` for ``user`` now (1 = best; an unknown item: n_items + 1)."""
        row = self._item_index.get(item)
        n_known = len(self._item_index)
        if row is None:
            return n_known + 1
        pop = self._popularity[:n_known]
        higher = pop > pop[row]
        if self.kind == "popularity":
            return 1 + int(higher.sum())
        mine = self._last_seen.get(user, {})
        if row in mine:
            when = mine[row]
            return 1 + sum(1 for t in mine.values() if t > when)
        others_higher = int(higher.sum()) - sum(1 for r in mine if higher[r])
        return 1 + len(mine) + others_higher

    def observe(self, user: str, item: str) -> None:
        """``user`` touched ``item`` (the next event in order)."""
        row = self._item_index.get(item)
        if row is None:
            row = self._item_index[item] = len(self._item_index)
            if row == self._popularity.shape[0]:
                self._popularity = np.concatenate(
                    [self._popularity, np.zeros_like(self._popularity)]
                )
        self._popularity[row] += 1
        mine = self._last_seen.get(user)
        if mine is None:
            mine = self._last_seen[user] = {}
            if self.max_users is not None and len(self._last_seen) > self.max_users:
                self._last_seen.popitem(last=False)
        elif self.max_users is not None:
            self._last_seen.move_to_end(user)
        mine[row] = self._k
        self._k += 1


def baseline_ranks(log: InteractionLog, start: int, stop: int, kind: Baseline) -> np.ndarray:
    """Ranks of events [start, stop) after learning counts and histories from [0, start)."""
    ranker = BaselineRanker(kind)
    ranks = np.zeros(max(0, stop - start), dtype=np.int64)
    users, items = log.user_ids[:stop].tolist(), log.item_ids[:stop].tolist()
    for k, (u, i) in enumerate(zip(users, items, strict=True)):
        if k >= start:
            ranks[k - start] = ranker.rank(u, i)
        ranker.observe(u, i)
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


class Before(NamedTuple):
    """One event of a log replayed in order, with what the log held before it: the view a
    signal is measured from (``benchmarks/quality_ceiling.py``, ``transition_signal.py``).
    Items are codes 0..n_items - 1 in id order; ``history`` and ``popularity`` are live
    views, updated once the replay moves on, so read them before taking the next event."""

    row: int
    user: str
    item: int
    previous: int | None  # the user's last item before this event
    history: dict[int, int]  # the user's items before it → the row of the last event on each
    popularity: np.ndarray  # (n_items,) events on each item before it


def replay_before(log: InteractionLog) -> tuple[int, Iterator[Before]]:
    """The number of distinct items, and each event of ``log`` in order as ``Before``."""
    _, items = np.unique(log.item_ids, return_inverse=True)
    n_items = int(items.max()) + 1 if items.size else 0

    def events() -> Iterator[Before]:
        popularity = np.zeros(n_items)
        seen: dict[str, dict[int, int]] = {}
        last: dict[str, int] = {}
        for row, (user, item) in enumerate(zip(log.user_ids.tolist(), items.tolist(), strict=True)):
            history = seen.setdefault(user, {})
            yield Before(row, user, item, last.get(user), history, popularity)
            popularity[item] += 1
            history[item] = row
            last[user] = item

    return n_items, events()

"""What users were served: the position of each event's item in the list its user got before it.

A ranking metric (``operators.evaluation.protocols``) redoes the query at the event, with the
true time gap, over every item. What a user consumes is different: the list the stream emitted
right after the user's *previous* event, computed then, for a guessed horizon. This module
measures that list, offline, during the same frozen replay:

- after each event of user u (states applied), the stream's list: û = project(u(t), h) and
  j̃ = predict(û, ū, i(t), ī) for each horizon h, scored by the ranker against every known
  item at that moment, top k;
- beside it, what a one-line heuristic serves at the same moment: the user's k most recent
  distinct items, then the most popular other items so far;
- at u's next event, the position (1..k) of its item in each list kept for u, 0 when absent.

Served Recall@k is the share of events whose item was in the list, served MRR the mean of
1/position (0 for a miss). Only events whose user already had an event in the replayed window
count: before that the stream had served that user nothing (``covered`` says how many).

``LastItemMargins`` measures the same lists with the item the user just touched raised by
each of a few margins over every other item, so that a training run can choose how far the
history scorer favours it by what the served metric measures (``operators.training.run``).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from operators.evaluation.scorer import Scorer, UserContext
from operators.model.jodie import standardise_delta
from operators.model.kernel import query
from operators.model.state import States

#: Horizons (seconds) compared by default: none, a minute, an hour, a day, and the mean gap
#: between a user's events in training (``None``; what the stream used until now).
DEFAULT_HORIZONS: tuple[float | None, ...] = (0.0, 60.0, 3600.0, 86400.0, None)
#: Margins (in score units, where the history scorer's terms are log-odds) that
#: ``LastItemMargins`` tries for the item the user just touched: none, then doubling.
MARGINS: tuple[float, ...] = (0.0, 0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


class ServedRecorder(Protocol):
    """What a frozen replay tells a recorder of served lists (``frozen_replay``)."""

    def before(self, index: int, user_row: int, item_row: int | None) -> None:
        """Event ``index`` (of the scored ones) of ``user_row`` on ``item_row`` (None: an
        item never seen), before it is applied."""
        ...

    def after(
        self, model: Any, states: States, scorer: Scorer, user_row: int, item_row: int, t: float
    ) -> None:
        """The same event at ``t``, applied: what is served to ``user_row`` now."""
        ...


@torch.inference_mode()
def served_scores(
    model: Any,
    states: States,
    scorer: Scorer,
    user_row: int,
    item_row: int,
    t: float,
    horizons: tuple[float | None, ...],
) -> tuple[np.ndarray, UserContext]:
    """(H, n) the scorer's scores of every known item for the lists served to ``user_row``
    right after its event on ``item_row`` at ``t``, one row per horizon (None: the model's
    mean user gap), with the user's context they were scored with."""
    users, items = states.users, states.items
    cfg = model.config
    gaps = np.array([[cfg.delta_user_mean if h is None else h] for h in horizons], dtype=np.float64)
    delta = torch.from_numpy(standardise_delta(gaps, cfg.delta_user_mean, cfg.delta_user_std))
    h = len(horizons)
    u = users._emb[user_row : user_row + 1].expand(h, -1)
    u_static = users._static[user_row : user_row + 1].expand(h, -1)
    i_dyn = items._emb[item_row : item_row + 1].expand(h, -1)
    i_static = items._static[item_row : item_row + 1].expand(h, -1)
    _proj, preds = query(model, u, delta, u_static, i_dyn, i_static)
    context = UserContext(
        users._history[user_row].copy(),
        users._history_counts[user_row].copy(),
        users._history_times[user_row].copy(),
        users._habits[user_row].copy(),
        int(users._count[user_row]),
        float(users._last_time[user_row]),
        t,
    )
    count, trend = items.count, items.trend_at(t)
    scores = np.stack(
        [
            scorer.scores(
                preds[j], items.emb, items.static, count, trend, context, items.last_time
            ).numpy()
            for j in range(h)
        ]
    )
    return scores, context


@dataclass
class ServedLists:
    """Lists served after each event, and where each next item stood in them.

    ``horizons`` in seconds (None: the model's mean user gap); ``k`` the list length.
    """

    horizons: tuple[float | None, ...] = DEFAULT_HORIZONS
    k: int = 10
    #: user row → (H, k) item rows served by the model after the user's latest event
    _model: dict[int, np.ndarray] = field(default_factory=dict)
    _heuristic: dict[int, np.ndarray] = field(default_factory=dict)
    positions: list[np.ndarray] = field(default_factory=list)  # per scored event, (H,) 0..k
    heuristic: list[int] = field(default_factory=list)  # per scored event, 0..k
    scored: list[int] = field(default_factory=list)  # index (in the scored events) of each

    def before(self, index: int, user_row: int, item_row: int | None) -> None:
        """Event ``index`` (of the scored ones) of ``user_row`` on ``item_row`` (None: an
        item never seen, which no list can hold): record its positions, if it had a list."""
        lists = self._model.get(user_row)
        if lists is None:
            return
        self.scored.append(index)
        self.positions.append(np.array([_position(row, item_row) for row in lists]))
        self.heuristic.append(_position(self._heuristic[user_row], item_row))

    def after(
        self,
        model: Any,
        states: States,
        scorer: Scorer,
        user_row: int,
        item_row: int,
        t: float,
    ) -> None:
        """The lists served to ``user_row`` right after its event on ``item_row`` at ``t``."""
        scores, context = served_scores(model, states, scorer, user_row, item_row, t, self.horizons)
        k = min(self.k, scores.shape[1])
        self._model[user_row] = np.stack([_top(row, k) for row in scores])
        self._heuristic[user_row] = _recent_then_popular(context.history, states.items.count, k)

    def summary(self, categories: np.ndarray | None = None) -> dict[str, Any]:
        """Served Recall@k and MRR per horizon and for the heuristic (per category too)."""
        positions = (
            np.stack(self.positions) if self.positions else np.zeros((0, len(self.horizons)))
        )
        heuristic = np.asarray(self.heuristic, dtype=np.int64)
        out: dict[str, Any] = {
            "k": self.k,
            "covered": int(heuristic.shape[0]),
            "by_horizon": [
                {"horizon_s": h, **_metrics(positions[:, j], self.k)}
                for j, h in enumerate(self.horizons)
            ],
            "heuristic": _metrics(heuristic, self.k),
        }
        best = max(range(len(self.horizons)), key=lambda j: out["by_horizon"][j]["mrr"])
        out["best_horizon"] = out["by_horizon"][best]
        if categories is not None and heuristic.size:
            cats = categories[np.asarray(self.scored, dtype=np.int64)]
            out["by_category"] = {
                str(c): {
                    "share": float((cats == c).mean()),
                    "model": _metrics(positions[cats == c, best], self.k),
                    "heuristic": _metrics(heuristic[cats == c], self.k),
                }
                for c in dict.fromkeys(cats.tolist())
            }
        return out


@dataclass
class LastItemMargins:
    """Where each next item stood in the list served after the user's previous event, had
    the item touched then (the head of the user's history) scored ``m`` higher, for each
    ``m`` of ``margins``; one horizon (None: the model's mean user gap), lists of ``k``.

    Margin 0 is the list ``ServedLists`` records. Raising the one item by m changes nothing
    else in the list, so the scores are computed once per event: that item's score and the k
    best of the others are enough to place the next item under every margin.
    """

    horizon: float | None = None
    margins: tuple[float, ...] = MARGINS
    k: int = 10
    #: user row → (the touched item's row, its score, k best other rows and their scores,
    #: best first, the list's length)
    _pending: dict[int, tuple[int, np.float32, np.ndarray, np.ndarray, int]] = field(
        default_factory=dict
    )
    positions: list[np.ndarray] = field(default_factory=list)  # per scored event, (M,) 0..k

    def before(self, index: int, user_row: int, item_row: int | None) -> None:
        """Event ``index`` of ``user_row`` on ``item_row``: its position under each margin."""
        pending = self._pending.get(user_row)
        if pending is None:
            return
        last, last_score, rows, scores, length = pending
        keys = (last_score + np.asarray(self.margins, dtype=np.float32))[:, None]  # (M, 1)
        # The others above the raised item: a prefix of the best-first list (ties: lower row).
        above = ((scores > keys) | ((scores == keys) & (rows < last))).sum(axis=1)  # (M,)
        if item_row == last:
            pos = above + 1
        else:
            hit = np.flatnonzero(rows == item_row) if item_row is not None else rows[:0]
            # Not among the k best others: absent whatever the margin.
            pos = hit[0] + 1 + (above <= hit[0]) if hit.size else np.zeros_like(above)
        self.positions.append(np.where((pos > 0) & (pos <= length), pos, 0).astype(np.int64))

    def after(
        self,
        model: Any,
        states: States,
        scorer: Scorer,
        user_row: int,
        item_row: int,
        t: float,
    ) -> None:
        """Keep what places the next item in ``user_row``'s list under every margin."""
        [scores], _context = served_scores(
            model, states, scorer, user_row, item_row, t, (self.horizon,)
        )
        others = scores.copy()
        others[item_row] = -np.inf
        n = scores.shape[0]
        rows = _top(others, min(self.k, n - 1)) if n > 1 else np.zeros(0, dtype=np.int64)
        self._pending[user_row] = (item_row, scores[item_row], rows, others[rows], min(self.k, n))

    def mrr(self) -> np.ndarray:
        """(M,) served MRR under each margin (zeros before any scored event)."""
        if not self.positions:
            return np.zeros(len(self.margins))
        pos = np.stack(self.positions)
        return np.where(pos > 0, 1.0 / np.maximum(pos, 1), 0.0).mean(axis=0)

    def best(self) -> float:
        """The smallest margin of the highest served MRR."""
        return float(self.margins[int(np.argmax(self.mrr()))])


def _position(served: np.ndarray, item_row: int | None) -> int:
    if item_row is None:
        return 0
    hit = np.flatnonzero(served == item_row)
    return int(hit[0]) + 1 if hit.size else 0


def _top(scores: np.ndarray, k: int) -> np.ndarray:
    """Rows of the k highest scores, best first (ties: the lower row, as a stable sort)."""
    part = (
        np.argpartition(-scores, k - 1)[:k] if k < scores.shape[0] else np.arange(scores.shape[0])
    )
    return part[np.lexsort((part, -scores[part]))]


def _recent_then_popular(history: np.ndarray, count: np.ndarray, k: int) -> np.ndarray:
    """The user's most recent distinct items, then the most popular others."""
    mine = [int(r) for r in history.tolist() if r >= 0][:k]
    if len(mine) < k:
        taken = set(mine)
        for r in np.argsort(-count, kind="stable")[: k + len(mine)].tolist():
            if r not in taken:
                mine.append(int(r))
                if len(mine) == k:
                    break
    return np.asarray(mine, dtype=np.int64)


def _metrics(positions: np.ndarray, k: int) -> dict[str, float]:
    if positions.size == 0:
        return {"recall": 0.0, "mrr": 0.0, "n_events": 0}
    hit = positions > 0
    reciprocal = np.where(hit, 1.0 / np.maximum(positions, 1), 0.0)
    return {
        "recall": float(hit.mean()),
        "mrr": float(reciprocal.mean()),
        "n_events": int(positions.size),
    }


class ServedTally:
    """Served-list figures from a live stream: each user's events in order, with the list
    served after each. Kafka-free, so a worker (for /metrics) and a reader of the
    ``recommendations`` topic (``jodie recommendations --summary``) count alike.

    For each event of a user who was served a list before: the position of its item in that
    list (0: absent), and in what the recent-then-popular heuristic would have served then —
    the user's k most recent distinct items, then the most popular others (``popular``, when
    the caller knows the catalogue's, else the counts of the events seen here, ranked again
    every ``REFRESH`` events). Per-user
    state is bounded: the ``max_users`` most recently active users are remembered (a user
    forgotten, or seen first, is not measured at that event).
    """

    REFRESH = 100

    def __init__(self, k: int = 10, max_users: int = 100_000) -> None:
        self.k = k
        self._top: list[str] = []
        self._since = self.REFRESH
        self.max_users = max_users
        # user → (served, recent), least recently active first. An OrderedDict, not a dict:
        # dropping a dict's first key leaves a hole its next ``iter`` walks past, and at
        # 100,000 users those walks took 14 % of a soak worker's CPU.
        self._users: OrderedDict[str, tuple[tuple[str, ...], tuple[str, ...]]] = OrderedDict()
        self._counts: dict[str, int] = {}
        self.events = 0
        self.model_hits = 0
        self.model_rr = 0.0
        self.heuristic_hits = 0
        self.heuristic_rr = 0.0

    def event(
        self,
        user: str,
        item: str,
        served: list[str] | tuple[str, ...],
        popular: list[str] | None = None,
    ) -> None:
        """``user`` touched ``item`` and was then served ``served`` (best first)."""
        before = self._users.pop(user, None)
        if before is not None:
            last_served, recent = before
            self.events += 1
            pos = _position_in(last_served[: self.k], item)
            self.model_hits += pos > 0
            self.model_rr += 1.0 / pos if pos else 0.0
            fill = popular if popular is not None else self._popular()
            pos = self._heuristic_position(recent, item, fill)
            self.heuristic_hits += pos > 0
            self.heuristic_rr += 1.0 / pos if pos else 0.0
            if recent[0] != item:  # (a user's repeat of their latest item leaves it as is)
                recent = (item, *(r for r in recent if r != item))[: self.k]
        else:
            recent = (item,)
        self._counts[item] = self._counts.get(item, 0) + 1
        self._since += 1
        self._users[user] = (tuple(served[: self.k]), recent)  # re-inserted: most recent last
        if len(self._users) > self.max_users:
            self._users.popitem(last=False)

    def _heuristic_position(self, recent: tuple[str, ...], item: str, fill: list[str]) -> int:
        """Where ``item`` stands (0: absent) in the heuristic's list: ``recent`` (distinct,
        latest first), then the items of ``fill`` not in it until there are k. Walked only as
        far as the item: this runs for every event a worker serves."""
        head = recent[: self.k]
        pos = _position_in(head, item)
        if pos or len(head) >= self.k:
            return pos
        taken = set(head)
        at = len(head)
        for other in fill:
            if other in taken:
                continue
            taken.add(other)
            at += 1
            if other == item:
                return at
            if at >= self.k:
                break
        return 0

    def _popular(self) -> list[str]:
        if self._since >= self.REFRESH:
            top = sorted(self._counts.items(), key=lambda kv: (-kv[1], kv[0]))
            self._top, self._since = [item for item, _ in top[: 2 * self.k]], 0
        return self._top

    def summary(self) -> dict[str, Any]:
        n = max(self.events, 1)
        return {
            "k": self.k,
            "events": self.events,
            "recall": self.model_hits / n if self.events else float("nan"),
            "mrr": self.model_rr / n if self.events else float("nan"),
            "heuristic": {
                "recall": self.heuristic_hits / n if self.events else float("nan"),
                "mrr": self.heuristic_rr / n if self.events else float("nan"),
            },
        }


def _position_in(served: list[str] | tuple[str, ...], item: str) -> int:
    for j, candidate in enumerate(served):
        if candidate == item:
            return j + 1
    return 0

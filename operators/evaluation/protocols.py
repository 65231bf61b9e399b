"""Next-item evaluation under two protocols: ``paper`` (weights keep training) and ``frozen``.

Both replay events in time order; for each scored event the true item is ranked among all
items known at that moment (seen in training or earlier in the stream): rank = 1 + number of
items scored strictly higher. Open world: an item never seen before cannot be retrieved, so
it gets rank n_known + 1. Then the states are updated with the true event. ``paper`` also
trains the weights on the stream, stepping once per timespan, as the reference does; ``frozen``
keeps them fixed and is exactly the sequential replay the deployed stream performs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from operators.dataset import InteractionLog
from operators.evaluation.metrics import mrr, rank_of, recall_at_k, roc_auc
from operators.evaluation.ranker import (
    RankerSamples,
    entry_features,
    entry_width,
    item_features,
    user_features,
)
from operators.evaluation.scorer import PlainScorer, Scorer, ScorerSamples, UserContext
from operators.evaluation.served import ServedLists, ServedRecorder
from operators.model.config import Protocol, TrainConfig
from operators.model.events import EventTensors, encode
from operators.model.jodie import Jodie, squared_distances
from operators.model.kernel import run_spans, sequential_layout, state_class_weight
from operators.model.online import OnlineJodie, Query
from operators.model.state import EntityStore, States

EvalSplit = Literal["valid", "test"]
Category = Literal["repeat_last", "repeat_older", "new_for_user"]
CATEGORIES: tuple[Category, ...] = ("repeat_last", "repeat_older", "new_for_user")


@dataclass
class EvalResult:
    """Per-event ranks of one evaluation run and their summary."""

    protocol: str
    split: str
    ranks: np.ndarray  # (E,) int64
    state_labels: np.ndarray  # (E,) int8
    state_scores: np.ndarray | None = None  # (E,) P(state change) when the model has the head
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def n_events(self) -> int:
        return int(self.ranks.shape[0])

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "protocol": self.protocol,
            "split": self.split,
            "mrr": mrr(self.ranks),
            "recall_at_10": recall_at_k(self.ranks, 10),
            "n_events": self.n_events,
        }
        if self.state_scores is not None and self.state_labels.any():
            out["state_change_auc"] = roc_auc(self.state_labels, self.state_scores)
        out.update(self.extra)
        return out


def _eval_window(
    log: InteractionLog,
    split_bounds: dict[str, tuple[int, int]],
    split: EvalSplit,
    limit: int | None,
) -> tuple[InteractionLog, int]:
    """Events to replay after the training split, and how many of them are replay-only."""
    v0 = split_bounds["valid"][0]
    start, stop = split_bounds[split]
    if limit is not None:
        stop = min(stop, start + limit)
    return log.slice(v0, stop), start - v0


def user_context(q: Query, now: float) -> UserContext:
    """What a scorer may read of the user of query ``q`` at time ``now``."""
    return UserContext(
        q.history, q.history_counts, q.history_times, q.habits, q.events, q.last_time, now
    )


def stored_context(users: EntityStore, row: int, now: float) -> UserContext:
    """The same read from a user row of a store (a copy of it)."""
    return UserContext(
        users._history[row].copy(),
        users._history_counts[row].copy(),
        users._history_times[row].copy(),
        users._habits[row].copy(),
        int(users._count[row]),
        float(users._last_time[row]),
        now,
    )


def frozen_replay(
    model: Jodie,
    states: States,
    log: InteractionLog,
    scorer: Scorer,
    skip: int = 0,
    served: ServedRecorder | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Sequential replay with fixed weights; ranks of events ``skip:`` and P(state change).

    ``served`` also records the lists the stream serves after each event and where each
    scored event's item stood in its user's (``operators.evaluation.served``: ``ServedLists``,
    ``LastItemMargins``)."""
    online = OnlineJodie(model, states)
    items = states.items
    n = len(log)
    ranks = np.zeros(max(0, n - skip), dtype=np.int64)
    probs = np.zeros(max(0, n - skip)) if model.state_head is not None else None
    uids, iids, ts = log.user_ids.tolist(), log.item_ids.tolist(), log.timestamps.tolist()
    feats = log.features if log.n_features else None
    with torch.inference_mode():
        for k in range(n):
            if k >= skip:
                q = online.query(uids[k], ts[k])
                i_row = items.row(iids[k])
                if i_row is None:
                    ranks[k - skip] = len(items) + 1
                else:
                    s = scorer.scores(
                        q.pred[0],
                        items.emb,
                        items.static,
                        items.count,
                        items.trend_at(ts[k]),
                        user_context(q, ts[k]),
                        items.last_time,
                    )
                    ranks[k - skip] = rank_of(s, i_row)
                if served is not None:
                    served.before(k - skip, q.user_row, i_row)
            u_new, _ = online.observe(
                uids[k], iids[k], ts[k], feats[k] if feats is not None else None
            )
            if served is not None:
                u_row, i_now = states.users.row(uids[k]), items.row(iids[k])
                assert u_row is not None and i_now is not None  # observe() added them
                served.after(model, states, scorer, u_row, i_now, ts[k])
            if probs is not None and k >= skip:
                probs[k - skip] = float(torch.softmax(model.state_change_logits(u_new), 1)[0, 1])
    return ranks, probs


def paper_replay(
    model: Jodie,
    states: States,
    log: InteractionLog,
    scorer: Scorer,
    train_config: TrainConfig,
    timespan: float,
    skip: int = 0,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Sequential replay that also trains the weights (Adam, one step per timespan)."""
    model.train()
    ev = encode(log, states)
    evt = EventTensors.of(ev, model.config)
    users, items = states.users, states.items
    n_known = int(np.sum(~np.isnan(items.last_time)))
    bounds, span_bounds = sequential_layout(ev.timestamps, timespan)
    optimizer = torch.optim.Adam(
        model.parameters(), lr=train_config.lr, weight_decay=train_config.weight_decay
    )
    n = len(ev)
    ranks = np.zeros(max(0, n - skip), dtype=np.int64)
    probs = np.zeros(max(0, n - skip)) if model.state_head is not None else None

    def on_predict(sl: slice, pred: Tensor, u_new: Tensor) -> None:
        nonlocal n_known
        k = sl.start
        i_row = int(ev.item_rows[k])
        if k >= skip:
            if i_row >= n_known:
                ranks[k - skip] = n_known + 1
            else:
                u_row = int(ev.user_rows[k])
                now = float(ev.timestamps[k])
                s = scorer.scores(
                    pred[0],
                    items._emb[:n_known],
                    items._static[:n_known],
                    items._count[:n_known],
                    items.trend_at(now, n_known),
                    stored_context(users, u_row, now),
                    items._last_time[:n_known],
                )
                ranks[k - skip] = rank_of(s, i_row)
            if probs is not None:
                with torch.no_grad():
                    probs[k - skip] = float(
                        torch.softmax(model.state_change_logits(u_new), 1)[0, 1]
                    )
        n_known = max(n_known, i_row + 1)

    weight = state_class_weight(ev.labels) if model.state_head is not None else None
    run_spans(model, states, ev, evt, bounds, span_bounds, optimizer, weight, on_predict)
    model.eval()
    return ranks, probs


def evaluate(
    model: Jodie,
    states: States,
    log: InteractionLog,
    split_bounds: dict[str, tuple[int, int]],
    protocol: Protocol,
    split: EvalSplit = "test",
    scorer: Scorer | None = None,
    limit: int | None = None,
    train_config: TrainConfig | None = None,
    timespan: float = 0.0,
    served: ServedLists | None = None,
) -> EvalResult:
    """Evaluate a trained model whose ``states`` hold the end of the training split.

    ``states`` and, under ``paper``, the model's weights are changed in place: pass copies to
    keep the originals. For ``test``, the validation events are replayed first, unscored.
    ``limit`` scores only the first N events of the split. ``served`` (frozen only) measures
    the lists the stream serves as well (``extra["served"]``).
    """
    window, skip = _eval_window(log, split_bounds, split, limit)
    scorer = scorer or PlainScorer()
    if protocol == "frozen":
        model.eval()
        ranks, probs = frozen_replay(model, states, window, scorer, skip, served)
    else:
        ranks, probs = paper_replay(
            model, states, window, scorer, train_config or TrainConfig(), timespan, skip
        )
    labels = window.state_labels[skip:]
    result = EvalResult(protocol, split, ranks, labels, probs)
    categories = event_categories(log, split_bounds[split][0], split_bounds[split][0] + len(ranks))
    result.extra["by_category"] = breakdown(ranks, categories)
    if served is not None and protocol == "frozen":
        result.extra["served"] = served.summary(categories)
    return result


def frozen_validation_mrr(model: Jodie, states: States, valid_log: InteractionLog) -> float:
    """Plain-JODIE MRR of a frozen replay of the validation events (used to pick the epoch)."""
    ranks, _ = frozen_replay(model, states, valid_log, PlainScorer())
    return mrr(ranks)


def event_categories(log: InteractionLog, start: int, stop: int) -> np.ndarray:
    """For events [start, stop): repeat of the user's last item, of an older item, or new."""
    last: dict[str, str] = {}
    seen: dict[str, set[str]] = {}
    out = np.empty(max(0, stop - start), dtype=object)
    for k, (u, i) in enumerate(
        zip(log.user_ids[:stop].tolist(), log.item_ids[:stop].tolist(), strict=True)
    ):
        if k >= start:
            if last.get(u) == i:
                out[k - start] = "repeat_last"
            elif i in seen.get(u, ()):
                out[k - start] = "repeat_older"
            else:
                out[k - start] = "new_for_user"
        last[u] = i
        seen.setdefault(u, set()).add(i)
    return out


def breakdown(ranks: np.ndarray, categories: np.ndarray) -> dict[str, dict[str, float]]:
    """MRR, Recall@10 and share of events per category."""
    out: dict[str, dict[str, float]] = {}
    for c in CATEGORIES:
        mask = categories == c
        if mask.any():
            out[c] = {
                "share": float(mask.mean()),
                "mrr": mrr(ranks[mask]),
                "recall_at_10": recall_at_k(ranks[mask], 10),
            }
    return out


def _sampled_replay(
    model: Jodie,
    states: States,
    log: InteractionLog,
    every: int,
    sample: Callable[[Query, float, int, int], None],
) -> list[int]:
    """Frozen replay of ``log``: before every ``every``-th event whose item is known,
    ``sample(query, time, items known, items at the end)`` (what the model predicts for the
    event's user then); the rows of those events' items, in order."""
    online = OnlineJodie(model, states)
    items = states.items
    n_final = len(items) + len(np.unique(log.item_ids))
    targets: list[int] = []
    feats = log.features if log.n_features else None
    uids, iids, ts = log.user_ids.tolist(), log.item_ids.tolist(), log.timestamps.tolist()
    with torch.inference_mode():
        for k in range(len(log)):
            i_row = items.row(iids[k])
            if k % every == 0 and i_row is not None:
                sample(online.query(uids[k], ts[k]), ts[k], len(items), n_final)
                targets.append(i_row)
            online.observe(uids[k], iids[k], ts[k], feats[k] if feats is not None else None)
    return targets


def scorer_samples(
    model: Jodie, states: States, log: InteractionLog, every: int = 4
) -> ScorerSamples:
    """Frozen replay of ``log`` recording, for every ``every``-th event whose item is known,
    the scorer's features against all known items (see
    ``operators.evaluation.scorer.ScorerSamples``).
    """
    items = states.items
    rows: dict[str, list[np.ndarray]] = {"d": [], "p": [], "u": [], "i": [], "t": []}
    plain = PlainScorer()

    def sample(q: Query, t: float, n: int, n_final: int) -> None:
        ctx = UserContext(q.history, q.history_counts)
        dist = np.full(n_final, np.inf, dtype=np.float32)
        dist[:n] = (
            -plain.scores(q.pred[0], items.emb, items.static, items.count, items.count, ctx)
        ).numpy()
        pos = np.full(n_final, -1, dtype=np.int64)
        ucount = np.zeros(n_final, dtype=np.float32)
        valid = q.history >= 0
        pos[q.history[valid]] = np.flatnonzero(valid)
        ucount[q.history[valid]] = q.history_counts[valid]
        icount = np.zeros(n_final, dtype=np.float32)
        icount[:n] = items.count
        itrend = np.zeros(n_final, dtype=np.float32)
        itrend[:n] = items.trend_at(t)
        rows["d"].append(dist)
        rows["p"].append(pos)
        rows["u"].append(ucount)
        rows["i"].append(icount)
        rows["t"].append(itrend)

    targets = _sampled_replay(model, states, log, every, sample)
    n = max(len(items), 1)

    def stack(key: str, dtype: type) -> np.ndarray:
        if not rows[key]:
            return np.zeros((0, n), dtype=dtype)
        return np.stack(rows[key])[:, :n]

    return ScorerSamples(
        stack("d", np.float32),
        stack("p", np.int64),
        stack("u", np.float32),
        stack("i", np.float32),
        stack("t", np.float32),
        np.asarray(targets, dtype=np.int64),
    )


#: Most (event, item) cells a ranker sample holds: 16M, 256 MB of float32 features.
RANKER_SAMPLE_CELLS = 16_000_000


def ranker_samples(
    model: Jodie, states: States, log: InteractionLog, every: int = 2
) -> RankerSamples:
    """Frozen replay of ``log`` recording, for every ``every``-th event whose item is known
    (sparser when events × items would pass ``RANKER_SAMPLE_CELLS``), the learned ranker's
    features against all known items (``operators.evaluation.ranker.RankerSamples``)."""
    items = states.items
    n_final = len(items) + len(np.unique(log.item_ids))
    every = max(every, -(-len(log) * n_final // RANKER_SAMPLE_CELLS))
    k_hist = states.users.history_size
    dist: list[np.ndarray] = []
    xs: list[np.ndarray] = []
    hs: list[np.ndarray] = []
    hrows: list[np.ndarray] = []
    zs: list[np.ndarray] = []

    def sample(q: Query, t: float, n: int, n_final: int) -> None:
        d = np.full(n_final, np.inf, dtype=np.float32)
        d[:n] = squared_distances(q.pred[0], items.emb, items.static).numpy()
        x = np.zeros((n_final, 3), dtype=np.float32)
        x[:n] = item_features(items.count, items.trend_at(t), items.last_time, t)
        ctx = user_context(q, t)
        rows, h = entry_features(ctx)
        h_full = np.zeros((k_hist, entry_width(k_hist)), dtype=np.float32)
        r_full = np.full(k_hist, -1, dtype=np.int64)
        h_full[: rows.size], r_full[: rows.size] = h, rows
        dist.append(d)
        xs.append(x)
        hs.append(h_full)
        hrows.append(r_full)
        zs.append(user_features(ctx))

    targets = _sampled_replay(model, states, log, every, sample)
    n = max(len(items), 1)
    e = len(targets)
    return RankerSamples(
        np.stack(dist)[:, :n] if e else np.zeros((0, n), np.float32),
        np.stack(xs)[:, :n] if e else np.zeros((0, n, 3), np.float32),
        np.stack(hs) if e else np.zeros((0, k_hist, entry_width(k_hist)), np.float32),
        np.stack(hrows) if e else np.zeros((0, k_hist), np.int64),
        np.stack(zs) if e else np.zeros((0, 7), np.float32),
        np.asarray(targets, dtype=np.int64),
    )

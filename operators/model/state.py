"""Explicit dynamic-state stores: id → row, embeddings, last event times, bounded user histories."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from operators.model.static import static_embeddings

Kind = Literal["user", "item"]

#: Time constant (seconds) of the decayed event count ``trend``: one day.
TREND_SECONDS = 86400.0

#: Columns of a user's ``habits`` row, what the learned ranker reads of a user besides its
#: history: events that repeated the previous item, events on an item not in the history,
#: the length of the current run on one item, and a running mean of log(1 + gap seconds).
HABITS = ("repeats", "news", "run", "log_gap")
#: The running mean of log gaps averages over about this many of the latest gaps.
LOG_GAP_WINDOW = 20


def trend_at(trend: np.ndarray, last_time: np.ndarray, t: float) -> np.ndarray:
    """Decayed event counts ``trend`` (as of each entity's ``last_time``, NaN: never)
    brought forward to time ``t``: the one definition the offline store, the live evaluation
    and the served ranker share."""
    age = t - last_time
    decay = np.exp(-np.where(np.isnan(age), np.inf, np.maximum(age, 0.0)) / TREND_SECONDS)
    return trend * decay


def _to_front(history: np.ndarray, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """How ``push_history`` reorders rows: the order that puts the entries kept (all but the
    pushed item) first, and which reordered slots then hold no entry."""
    keep = history != items[:, None]  # (B, K); the pushed item leaves its old slot
    order = np.argsort(~keep, axis=1, kind="stable")  # kept entries first, in their order
    return order, ~np.take_along_axis(keep, order, axis=1)


def push_history_times(
    history: np.ndarray, times: np.ndarray, items: np.ndarray, t: np.ndarray
) -> np.ndarray:
    """The users' last event time on each history entry, reordered as ``push_history``
    reorders ``history`` (B, K) when ``items`` (B,) are pushed at times ``t`` (B,): the
    pushed item's time becomes ``t``, padding holds NaN."""
    k = history.shape[1]
    if k == 0:
        return times
    order, dropped = _to_front(history, items)
    compact = np.take_along_axis(times, order, axis=1)
    compact[dropped] = np.nan
    return np.concatenate([t[:, None], compact[:, : k - 1]], axis=1)


def push_history(
    history: np.ndarray, counts: np.ndarray, items: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Move ``items`` (B,) to the front of each row of ``history`` (B, K).

    Rows hold distinct item rows, most recent first, padded with -1; ``counts`` (B, K) holds
    the user's number of events on each entry, carried along and incremented for the pushed
    item (an entry that falls off the end is forgotten with its count). Vectorised so a
    t-batch of B users costs a handful of numpy calls. Returns the new (history, counts).
    """
    k = history.shape[1]
    if k == 0:
        return history, counts
    previous = np.where(history != items[:, None], 0, counts).sum(axis=1)  # (B,) 0 if absent
    order, dropped = _to_front(history, items)
    compact = np.take_along_axis(history, order, axis=1)
    compact_counts = np.take_along_axis(counts, order, axis=1)
    compact[dropped] = -1
    compact_counts[dropped] = 0
    new_hist = np.concatenate([items[:, None], compact[:, : k - 1]], axis=1)
    new_counts = np.concatenate([(previous + 1)[:, None], compact_counts[:, : k - 1]], axis=1)
    return new_hist, new_counts


class EntityStore:
    """States of one kind of entity (users or items), growing as new ids arrive.

    Rows are assigned in order of first appearance and never move. A row whose ``last_time``
    is NaN has never interacted: its dynamic state is the model's learned initial vector, read
    through ``Jodie.initial_user/initial_item`` rather than stored, so it follows the weights.
    """

    def __init__(self, kind: Kind, dim: int, static_dim: int, history_size: int = 0) -> None:
        self.kind: Kind = kind
        self.dim = dim
        self.static_dim = static_dim
        self.history_size = history_size
        self._ids: list[str] = []
        self._index: dict[str, int] = {}
        self._cap = 0
        self._emb = torch.zeros(0, dim)  # (cap, d) dynamic embeddings
        self._static = torch.zeros(0, static_dim)  # (cap, s) hash-derived, fixed
        self._last_time = np.zeros(0, dtype=np.float64)  # (cap,) NaN = never interacted
        self._history = np.zeros((0, history_size), dtype=np.int64)  # (cap, K) item rows
        self._history_counts = np.zeros((0, history_size), dtype=np.int64)  # (cap, K)
        # (cap, K) float64 the user's last event time on each history entry, NaN padded
        self._history_times = np.zeros((0, history_size), dtype=np.float64)
        self._habits = np.zeros((0, len(HABITS)), dtype=np.float64)  # (cap, 4) users, HABITS
        self._count = np.zeros(0, dtype=np.int64)  # (cap,) events so far
        # (cap,) events so far with exponential decay of time constant TREND_SECONDS, as of
        # the entity's last event: a bounded "trending now" signal
        self._trend = np.zeros(0, dtype=np.float64)
        #: State a checkpoint written by an older version did not hold (see ``from_tensors``).
        self.missing: tuple[str, ...] = ()

    # -- ids ----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._ids)

    @property
    def ids(self) -> list[str]:
        return list(self._ids)

    def row(self, entity_id: str) -> int | None:
        """Row of a known id, None for an unseen one."""
        return self._index.get(entity_id)

    def add(self, entity_id: str) -> int:
        """Row of ``entity_id``, adding a fresh row if it is unseen."""
        row = self._index.get(entity_id)
        if row is None:
            row = self._append([entity_id])[0]
        return row

    def encode(self, ids: np.ndarray) -> np.ndarray:
        """Rows of many ids (N,) → (N,) int64, adding unseen ids in order of first appearance."""
        if len(ids) == 0:
            return np.zeros(0, dtype=np.int64)
        uniq, first, inverse = np.unique(ids, return_index=True, return_inverse=True)
        rows = np.array([self._index.get(str(u), -1) for u in uniq], dtype=np.int64)
        new = np.flatnonzero(rows < 0)
        if new.size:
            new = new[np.argsort(first[new], kind="stable")]
            rows[new] = self._append([str(uniq[j]) for j in new])
        return rows[inverse.reshape(-1)]

    def _append(self, new_ids: list[str]) -> np.ndarray:
        start = len(self._ids)
        need = start + len(new_ids)
        if need > self._cap:
            self._grow(max(need, 2 * self._cap, 64))
        for offset, entity_id in enumerate(new_ids):
            self._index[entity_id] = start + offset
        self._ids.extend(new_ids)
        self._static[start:need] = torch.from_numpy(
            static_embeddings(self.kind, new_ids, self.static_dim)
        )
        return np.arange(start, need, dtype=np.int64)

    def _grow(self, cap: int) -> None:
        n = self._cap
        emb = torch.zeros(cap, self.dim)
        emb[:n] = self._emb[:n]
        static = torch.zeros(cap, self.static_dim)
        static[:n] = self._static[:n]
        last = np.full(cap, np.nan)
        last[:n] = self._last_time[:n]
        hist = np.full((cap, self.history_size), -1, dtype=np.int64)
        hist[:n] = self._history[:n]
        hist_counts = np.zeros((cap, self.history_size), dtype=np.int64)
        hist_counts[:n] = self._history_counts[:n]
        hist_times = np.full((cap, self.history_size), np.nan)
        hist_times[:n] = self._history_times[:n]
        habits = np.zeros((cap, len(HABITS)), dtype=np.float64)
        habits[:n] = self._habits[:n]
        self._history_times, self._habits = hist_times, habits
        count = np.zeros(cap, dtype=np.int64)
        count[:n] = self._count[:n]
        self._emb, self._static, self._last_time, self._history = emb, static, last, hist
        trend = np.zeros(cap, dtype=np.float64)
        trend[:n] = self._trend[:n]
        self._history_counts, self._count, self._trend = hist_counts, count, trend
        self._cap = cap

    # -- views (rows [0, len)) -----------------------------------------------------------------
    @property
    def emb(self) -> Tensor:
        """(n, d) dynamic embeddings; rows never interacted are meaningless (see the class doc)."""
        return self._emb[: len(self)]

    @property
    def static(self) -> Tensor:
        """(n, s) static embeddings."""
        return self._static[: len(self)]

    @property
    def last_time(self) -> np.ndarray:
        """(n,) time of each entity's last event, NaN if none."""
        return self._last_time[: len(self)]

    @property
    def history(self) -> np.ndarray:
        """(n, K) users: distinct item rows most recent first, -1 padded (K = 0 for items)."""
        return self._history[: len(self)]

    @property
    def history_counts(self) -> np.ndarray:
        """(n, K) users: the user's number of events on each history entry (0 for padding)."""
        return self._history_counts[: len(self)]

    @property
    def history_times(self) -> np.ndarray:
        """(n, K) users: the user's last event time on each history entry (NaN padding)."""
        return self._history_times[: len(self)]

    @property
    def habits(self) -> np.ndarray:
        """(n, 4) users: the columns named by ``HABITS`` (zeros for items)."""
        return self._habits[: len(self)]

    def trend_at(self, t: float, n: int | None = None) -> np.ndarray:
        """(n,) decayed event counts of rows [0, n) brought forward to time ``t``."""
        n = len(self) if n is None else n
        return trend_at(self._trend[:n], self._last_time[:n], t)

    @property
    def trend(self) -> np.ndarray:
        """(n,) decayed event counts as of each entity's last event (see ``trend_at``)."""
        return self._trend[: len(self)]

    @property
    def count(self) -> np.ndarray:
        """(n,) number of events of each entity so far (an item's popularity)."""
        return self._count[: len(self)]

    def fresh(self, rows: np.ndarray) -> np.ndarray:
        """(B,) bool: which rows have never interacted."""
        return np.isnan(self._last_time[rows])

    # -- lifecycle ----------------------------------------------------------------------------
    def update(
        self,
        rows: np.ndarray,
        emb: Tensor,
        times: np.ndarray,
        items: np.ndarray | None = None,
        *,
        bookkeeping: bool = True,
    ) -> None:
        """New states of distinct ``rows`` (B,): emb (B, d), times (B,), items (B,) for users.

        ``bookkeeping`` False moves only what the model reads (the embedding, the last time and
        item, the count), not the rest of the histories, the habits and trends that only
        scorers read: for a training pass whose states are recomputed before anything scores
        with them. (Histories then hold the last item only.)"""
        self._emb[rows] = emb.detach()
        if not bookkeeping:
            self._last_time[rows] = times
            self._count[rows] += 1
            if items is not None and self.history_size:
                self._history[rows, 0] = items  # the query's previous item p
            return
        if items is not None and self.history_size:
            self._habits[rows] = next_habits(
                self._habits[rows],
                self._history[rows],
                items,
                times - self._last_time[rows],
                self._count[rows],
            )
        age = np.nan_to_num(times - self._last_time[rows], nan=np.inf)
        self._trend[rows] = self._trend[rows] * np.exp(-age / TREND_SECONDS) + 1.0
        self._last_time[rows] = times
        self._count[rows] += 1  # rows are distinct within a t-batch
        if items is not None and self.history_size:
            history = self._history[rows]
            self._history_times[rows] = push_history_times(
                history, self._history_times[rows], items, np.asarray(times, dtype=np.float64)
            )
            self._history[rows], self._history_counts[rows] = push_history(
                history, self._history_counts[rows], items
            )

    def update_one(self, row: int, emb: Tensor, time: float, item: int | None = None) -> None:
        """``update`` for a single event, without numpy fancy indexing: emb (1, d) or (d,)."""
        self._emb[row] = emb.detach().reshape(-1)
        last = self._last_time[row]
        if item is not None and self.history_size:
            self._habits[row] = next_habits(
                self._habits[row : row + 1],
                self._history[row : row + 1],
                np.array([item]),
                np.array([time - last]),
                self._count[row : row + 1],
            )[0]
        age = np.inf if np.isnan(last) else time - last
        self._trend[row] = self._trend[row] * np.exp(-age / TREND_SECONDS) + 1.0
        self._last_time[row] = time
        self._count[row] += 1
        if item is not None and self.history_size:
            hist, counts = self._history[row], self._history_counts[row]
            times = self._history_times[row]
            entries = hist.tolist()
            previous = counts[entries.index(item)] if item in entries else 0
            kept = [
                (h, c, w)
                for h, c, w in zip(entries, counts.tolist(), times.tolist(), strict=True)
                if h != item
            ]
            kept = kept[: self.history_size - 1]
            hist[0], counts[0], times[0] = item, previous + 1, time
            hist[1:] = [h for h, _, _ in kept]
            counts[1:] = [c for _, c, _ in kept]
            times[1:] = [w for _, _, w in kept]

    def reset(self) -> None:
        """Forget every dynamic state (ids and static vectors stay): all rows become fresh."""
        self._emb.zero_()
        self._last_time[:] = np.nan
        self._history[:] = -1
        self._history_counts[:] = 0
        self._history_times[:] = np.nan
        self._habits[:] = 0.0
        self._count[:] = 0
        self._trend[:] = 0.0

    def detach(self) -> None:
        """Cut any autograd history the state tensor may carry (end of a truncation span)."""
        self._emb = self._emb.detach()

    # -- persistence --------------------------------------------------------------------------
    def tensors(self, prefix: str) -> dict[str, Tensor]:
        out = {
            f"{prefix}.embedding": self.emb.detach().clone(),
            f"{prefix}.last_time": torch.from_numpy(self.last_time.copy()),
            f"{prefix}.count": torch.from_numpy(self.count.copy()),
            f"{prefix}.trend": torch.from_numpy(self._trend[: len(self)].copy()),
        }
        if self.history_size:
            out[f"{prefix}.history"] = torch.from_numpy(self.history.copy())
            out[f"{prefix}.history_counts"] = torch.from_numpy(self.history_counts.copy())
            out[f"{prefix}.history_times"] = torch.from_numpy(self.history_times.copy())
            out[f"{prefix}.habits"] = torch.from_numpy(self.habits.copy())
        return out

    @classmethod
    def from_tensors(
        cls,
        kind: Kind,
        ids: Iterable[str],
        tensors: dict[str, Tensor],
        prefix: str,
        static_dim: int,
    ) -> EntityStore:
        emb = tensors[f"{prefix}.embedding"]
        hist = tensors.get(f"{prefix}.history")
        history_size = int(hist.shape[1]) if hist is not None else 0
        store = cls(kind, int(emb.shape[1]), static_dim, history_size)
        id_list = list(ids)
        store.encode(np.asarray(id_list, dtype=str))
        if list(store._ids) != id_list:
            raise ValueError(f"{kind} ids are not unique")
        n = len(id_list)
        store._emb[:n] = emb
        store._last_time[:n] = tensors[f"{prefix}.last_time"].numpy()
        store._count[:n] = tensors[f"{prefix}.count"].numpy()
        store._trend[:n] = tensors[f"{prefix}.trend"].numpy()
        if hist is not None:
            store._history[:n] = hist.numpy()
            store._history_counts[:n] = tensors[f"{prefix}.history_counts"].numpy()
            # Saved before the learned ranker existed: its user terms are unknown, and say so.
            optional = (("history_times", store._history_times), ("habits", store._habits))
            for name, target in optional:
                saved = tensors.get(f"{prefix}.{name}")
                if saved is None:
                    store.missing += (name,)
                else:
                    target[:n] = saved.numpy()
        return store


def next_habits(
    habits: np.ndarray, history: np.ndarray, items: np.ndarray, gaps: np.ndarray, n: np.ndarray
) -> np.ndarray:
    """Users' ``HABITS`` rows (B, 4) after an event on ``items`` (B,), from their rows, their
    histories (B, K) and event counts (B,) before it and the gaps to it (B,, NaN for a first
    event). One function for the batched and the single-event update, so both round alike;
    items and history entries may be rows or ids (a stream's user table keeps ids)."""
    same = history[:, 0] == items
    return habits_after(habits, same, ~(history == items[:, None]).any(axis=1), gaps, n)


def habits_after(
    habits: np.ndarray, same: np.ndarray, new: np.ndarray, gaps: np.ndarray, n: np.ndarray
) -> np.ndarray:
    """``next_habits``'s arithmetic, given for each user whether the event's item is its
    last one (``same``) and whether it is absent from its history (``new``), both (B,) bool:
    a stream's side tells them from its rows' tuples in Python, where comparing arrays of ids
    cost more than the rest of the update."""
    out = habits.copy()
    out[:, 0] += same
    out[:, 1] += new
    out[:, 2] = np.where(same, out[:, 2] + 1.0, 1.0)
    seen = (n > 0) & ~np.isnan(gaps)
    if seen.any():
        step = np.log1p(np.maximum(gaps[seen], 0.0))
        out[seen, 3] += (step - out[seen, 3]) / np.minimum(n[seen], LOG_GAP_WINDOW)
    return out


@dataclass
class States:
    """Both stores, the unit that a checkpoint saves and a trainer or evaluator updates."""

    users: EntityStore
    items: EntityStore

    @classmethod
    def empty(cls, dim: int, user_static: int, item_static: int, history: int) -> States:
        return cls(
            EntityStore("user", dim, user_static, history), EntityStore("item", dim, item_static)
        )

    def reset(self) -> None:
        self.users.reset()
        self.items.reset()

    def detach(self) -> None:
        self.users.detach()
        self.items.detach()

    def copy(self) -> States:
        return States(
            EntityStore.from_tensors(
                "user", self.users.ids, self.users.tensors("u"), "u", self.users.static_dim
            ),
            EntityStore.from_tensors(
                "item", self.items.ids, self.items.tensors("i"), "i", self.items.static_dim
            ),
        )

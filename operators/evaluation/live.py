"""Live evaluation: each streamed event's rank, equal to the frozen replay's, from a stream.

The frozen protocol ranks event r's true item against every item known before r, each at
its state *at r* (after its own latest event before r), and queries with the user's previous
item at its state at r too (``operators.model.kernel``). A worker holds neither: its own
items are ahead or behind, the others' arrive through ``item-vectors`` whenever their owner
commits. ``LiveRanks`` reconstructs "the items at r" exactly, whatever the arrival order:

- every event produces exactly one item vector (its item's [i(t), ī] after it), tagged with
  the event's seq, so the vectors of a log position are complete once every seq below it
  has arrived: the **watermark** W is the first seq whose vector is still missing;
- vectors below W are folded, in seq order, into one array of current item states; each
  fold remembers the row's previous state (an undo record), kept for ``undo_window`` seqs;
- the user's owner hands in u(t⁻), Δu and the user's history of each event it applies
  (``Query``); once W > r the query is completed with the previous item's state at r and
  every item is scored by the ranker (``operators.evaluation.scorer``: the model's default,
  as ``jodie evaluate`` ranks) against the folded arrays, the rows folded at r or later
  taken at their state at r from the undo records (rows first seen at r or later do not
  count). Each vector carries its item's event count and decayed count after the event, so
  the ranker's popularity terms are folded, and undone, with the vector.

The rank is therefore a function of the log and the weights alone, not of timing: live
ranks equal offline ranks (up to float rounding of batched model calls, which can reorder
near-ties). What is pending lives in memory, bounded: a worker that restarts resumes ranking
from the vectors it restores; a seq whose vector never comes (compacted away before a
restart) is skipped once ``max_ahead`` later vectors wait behind it. Events that cannot be
reconstructed are counted as ``unranked``, never ranked wrongly.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field, replace
from operator import attrgetter
from typing import NamedTuple, Protocol

import numpy as np
import torch

from operators.evaluation.scorer import (
    NumpyScores,
    PlainScorer,
    Scorer,
    UserContext,
    numpy_scores,
)
from operators.model.inference import NumpyJodie, static_row
from operators.model.jodie import Jodie
from operators.model.state import trend_at
from operators.retrieval.store import row_dots


class Query(NamedTuple):
    """What the user's owner knows of event ``seq`` when it applies it."""

    seq: int
    event_id: str
    user_id: str
    item_id: str
    previous_item: str | None  # the user's previous item, None for the user's first event
    pre_state: np.ndarray  # (d,) u(t⁻), float32
    delta_user: float  # standardised Δu, float32
    timestamp: float = 0.0  # the event's time (the popularity terms decay to it)
    history: tuple[str, ...] = ()  # the user's history and counts before the event
    history_counts: tuple[int, ...] = ()
    # What the learned ranker also reads of the user before the event (a user side that
    # does not send them gets a ranker scoring without those terms, unlike offline).
    history_times: tuple[float, ...] = ()  # the user's last time on each history entry
    habits: tuple[float, ...] = ()  # operators.model.state.HABITS
    events: int = 0  # the user's events before this one
    last_time: float = float("nan")  # the user's previous event time


@dataclass(frozen=True)
class Ranked:
    """The event's true item ranked as the frozen protocol ranks it."""

    query: Query
    rank: int
    n_items: int  # items known at the event


class Ranks(Protocol):
    """What a worker hands the live evaluation and reads of it: ``LiveRanks``, or the same
    run in a process of its own (``streams.app.evaluation``)."""

    @property
    def watermark(self) -> int: ...

    @property
    def unranked(self) -> int: ...

    def item_vector(
        self,
        seq: int,
        item_id: str,
        vector: np.ndarray,
        stats: tuple[float, float, float] = ...,
    ) -> None: ...

    def samples(self, seq: int) -> bool: ...

    def add(self, q: Query) -> None: ...

    def pending(self) -> int: ...

    def ready(self) -> list[Ranked]: ...

    def finish(self, timeout_s: float) -> list[Ranked]: ...


#: An item row's state: its dynamic embedding (d,), event count, decayed count, last time.
ItemState = tuple[np.ndarray, float, float, float]


@dataclass
class _Undo:
    seq: int
    row: int
    previous: ItemState | None  # the row's state before this fold; None: first seen


@dataclass
class LiveRanks:
    """Ranks of the events one worker applies, from item vectors in any arrival order.

    ``start`` is the log position the item states ``ids`` / ``vectors`` (n, d + s) and
    ``stats`` (n, 3: count, decayed count, last time) hold (a checkpoint's O, an epoch's S):
    vectors of earlier events are ignored. ``scorer`` ranks (plain JODIE by default).
    """

    model: Jodie
    start: int
    ids: list[str]
    vectors: np.ndarray
    stats: np.ndarray | None = None
    scorer: Scorer = field(default_factory=PlainScorer)
    # Undo records kept (d floats each): how late a user side may hand in its query. Late
    # ones are those whose vectors another worker committed first, a transaction or two.
    undo_window: int = 20_000
    every: int = 1  # rank the events whose seq is a multiple of this
    max_ahead: int = 100_000
    # From this many items on, a query's distances come from a matrix product, and only the
    # rows that a bound cannot place above or below the true item are scored exactly
    # (``_score_bounded``): the same ranks at a fraction of the cost. From ``batch_from``
    # items on, up to 64 queries share the product (one pass over the items' memory).
    bounded_from: int = 256
    batch_from: int = 20_000
    unranked: int = 0
    _row: dict[str, int] = field(init=False)
    _dyn: np.ndarray = field(init=False)  # (cap, d)
    _static: np.ndarray = field(init=False)  # (cap, s)
    _n: int = field(init=False)
    _stat: np.ndarray = field(init=False)  # (cap, 3) float64: count, trend, last time
    _arrived: dict[int, tuple[str, np.ndarray, tuple[float, float, float]]] = field(
        init=False, default_factory=dict
    )
    _queries: list[Query] = field(init=False, default_factory=list)
    _undo: deque[_Undo] = field(init=False, default_factory=deque)

    def __post_init__(self) -> None:
        cfg = self.model.config
        d, s = cfg.embedding_dim, cfg.item_static_dim
        n = len(self.ids)
        vectors = self.vectors.reshape(n, d + s) if n else np.zeros((0, d + s), np.float32)
        cap = max(64, 2 * n)
        self._dyn = np.zeros((cap, d), dtype=np.float32)
        self._static = np.zeros((cap, s), dtype=np.float32)
        self._dyn[:n] = vectors[:, :d]
        self._static[:n] = vectors[:, d:]
        self._stat = np.zeros((cap, 3), dtype=np.float64)
        self._stat[:, 2] = np.nan
        if self.stats is not None and n:
            self._stat[:n] = np.asarray(self.stats, dtype=np.float64).reshape(n, 3)
        self._row = {item: r for r, item in enumerate(self.ids)}
        self._n = n
        # Each row's squared norm ‖[i, ī]‖², float32, kept with the folds (bounded scoring).
        self._sq = np.zeros(cap, dtype=np.float32)
        self._sq[:n] = np.einsum("ij,ij->i", self._dyn[:n], self._dyn[:n]) + np.einsum(
            "ij,ij->i", self._static[:n], self._static[:n]
        )
        self.watermark = self.start
        with torch.no_grad():
            self._p_init = self.model.initial_item().detach().numpy().reshape(1, -1)
        self._no_static = np.zeros((1, cfg.item_static_dim), np.float32)
        # One query at a time: numpy's arithmetic costs less than torch's dispatch
        # (operators.model.inference); a ranker without a numpy twin is called as it is.
        self._net = NumpyJodie(self.model)
        self._numpy_scores = numpy_scores(self.scorer)

    # -- inputs ----------------------------------------------------------------------------
    def item_vector(
        self,
        seq: int,
        item_id: str,
        vector: np.ndarray,
        stats: tuple[float, float, float] = (0.0, 0.0, float("nan")),
    ) -> None:
        """Item ``item_id``'s [i(t), ī] after event ``seq`` with its (count, decayed count,
        time) then (repeats are ignored)."""
        if seq >= self.watermark:
            self._arrived.setdefault(seq, (item_id, np.asarray(vector, dtype=np.float32), stats))

    def samples(self, seq: int) -> bool:
        """Whether the event at ``seq`` is one of the ranked sample (``add`` ignores others)."""
        return seq % self.every == 0

    def add(self, q: Query) -> None:
        """A user event applied here; ranked once the watermark passes it (when sampled)."""
        if not self.samples(q.seq):
            return
        oldest = self._undo[0].seq if self._undo else self.watermark
        if q.seq < oldest or q.seq < self.start:
            self.unranked += 1
        else:
            self._queries.append(q)

    def pending(self) -> int:
        """Queries waiting for item vectors."""
        return len(self._queries)

    def drop_pending(self) -> None:
        """Count the queries waiting as unranked (after a failure left them in doubt)."""
        self.unranked += len(self._queries)
        self._queries = []

    # -- output ----------------------------------------------------------------------------
    def finish(self, timeout_s: float) -> list[Ranked]:
        """The last ``ready`` before the worker stops. Ranked here, nothing is on its way:
        ``timeout_s`` (how long one ranked elsewhere may wait for its ranks) is not needed."""
        return self.ready()

    def ready(self) -> list[Ranked]:
        """Rank every query whose item states are complete, folding vectors in seq order.

        A query waiting when its seq is reached gets its prediction just before that seq's
        vector is folded; one that came after (its user side ran late) from the undo records.
        Scores are then computed for many queries at once against the folded states, the
        rows folded since each query's seq taken at their state then.
        """
        late = sorted((q for q in self._queries if q.seq < self.watermark), key=attrgetter("seq"))
        ranked = self._score([(q, self._predict(q, self._at(q.seq)[0])) for q in late])
        waiting = sorted(
            (q for q in self._queries if q.seq >= self.watermark), key=attrgetter("seq")
        )
        todo: list[tuple[Query, np.ndarray]] = []
        group = self._group()
        i = 0
        while True:
            while i < len(waiting) and waiting[i].seq == self.watermark:
                todo.append((waiting[i], self._predict(waiting[i], {})))
                i += 1
            if len(todo) >= group:  # score before later folds make the patches grow
                ranked += self._score(todo)
                todo = []
            arrived = self._arrived.pop(self.watermark, None)
            if arrived is not None:
                self._fold(self.watermark, *arrived)
                self.watermark += 1
                continue
            if len(self._arrived) <= self.max_ahead:
                break
            # A vector that will not come: skip to the next one that did. States at the seqs
            # skipped are unknown, so what waits before it cannot be ranked.
            ranked += self._score(todo)
            todo = []
            gap_end = min(self._arrived)
            while i < len(waiting) and waiting[i].seq < gap_end:
                self.unranked += 1
                i += 1
            self._undo.clear()
            self.watermark = gap_end
        ranked += self._score(todo)
        self._queries = waiting[i:]
        horizon = self.watermark - self.undo_window
        while self._undo and self._undo[0].seq < horizon:
            self._undo.popleft()
        return ranked

    def _fold(
        self, seq: int, item_id: str, vector: np.ndarray, stats: tuple[float, float, float]
    ) -> None:
        d = self._dyn.shape[1]
        row = self._row.get(item_id)
        if row is None:
            row = self._append(item_id, vector[d:])
            self._undo.append(_Undo(seq, row, None))
        else:
            count, trend, last = self._stat[row].tolist()
            self._undo.append(_Undo(seq, row, (self._dyn[row].copy(), count, trend, last)))
        self._dyn[row] = vector[:d]
        self._stat[row] = stats
        dyn, static = self._dyn[row], self._static[row]
        self._sq[row] = np.dot(dyn, dyn) + np.dot(static, static)

    def _append(self, item_id: str, static: np.ndarray) -> int:
        if self._n == self._dyn.shape[0]:
            self._dyn = np.concatenate([self._dyn, np.zeros_like(self._dyn)])
            self._static = np.concatenate([self._static, np.zeros_like(self._static)])
            self._stat = np.concatenate([self._stat, np.zeros_like(self._stat)])
            self._sq = np.concatenate([self._sq, np.zeros_like(self._sq)])
        row = self._n
        self._row[item_id] = row
        self._static[row] = static
        self._n += 1
        return row

    def _at(self, seq: int) -> tuple[dict[int, ItemState | None], int]:
        """Rows whose state at ``seq`` differs from the folded one: row → state then (None:
        not yet seen), and how many rows existed at ``seq``."""
        then: dict[int, ItemState | None] = {}
        for u in reversed(self._undo):  # newest first: the oldest record ≥ seq wins
            if u.seq < seq:
                break
            then[u.row] = u.previous
        return then, self._n - sum(1 for v in then.values() if v is None)

    def _state_at(self, item: str | None, then: dict[int, ItemState | None]) -> np.ndarray | None:
        """``item``'s dynamic state at the event ``then`` describes (None: not seen by then)."""
        row = None if item is None else self._row.get(item)
        if row is None:
            return None
        if row in then:
            state = then[row]
            return None if state is None else state[0]
        return self._dyn[row]

    def _predict(self, q: Query, then: dict[int, ItemState | None]) -> np.ndarray:
        """The query's j̃ (d + s,), its previous item taken at its state at the event. One
        event at a time, as the offline replay computes it."""
        p_dyn = self._state_at(q.previous_item, then)
        p_static = (
            self._no_static
            if p_dyn is None or q.previous_item is None
            else self._static[self._row[q.previous_item]].reshape(1, -1)
        )
        _, pred = self._net.query(
            np.asarray(q.pre_state, dtype=np.float32).reshape(1, -1),
            np.array([[q.delta_user]], dtype=np.float32),
            static_row("user", q.user_id, self.model.config.user_static_dim).reshape(1, -1),
            self._p_init if p_dyn is None else p_dyn.reshape(1, -1),
            p_static,
        )
        return pred[0]

    def _score(self, todo: list[tuple[Query, np.ndarray]]) -> list[Ranked]:
        """Rank queries (with their j̃) with the ranker against the folded states, each with
        the rows folded since its seq at their state then: rank = 1 + items scored strictly
        higher, as ``jodie evaluate`` ranks."""
        n = self._n
        if not todo or n == 0:
            return [Ranked(q, 1, 0) for q, _ in todo]  # nothing known: every item is new
        if self._numpy_scores is not None and n >= self.bounded_from:
            return self._score_bounded(todo, self._numpy_scores)
        dyn_now = self._dyn[:n]
        stat_now = self._stat[:n]
        static = self._static[:n]
        out = []
        for q, pred in todo:
            then, n_known = self._at(q.seq)
            context = self._context(q)
            scores = self._scores(
                pred,
                dyn_now,
                static,
                stat_now[:, 0],
                self._trend_at(stat_now, q),
                context,
                stat_now[:, 2],
            )
            unseen = [row for row, state in then.items() if state is None]
            patched = [row for row, state in then.items() if state is not None]
            if patched:
                # Rows folded since the event, scored at their state then. The ranker's terms
                # are per row (elementwise, row-wise sums), so scoring them apart gives the
                # values a full array patched with them would.
                rows = np.asarray(patched, dtype=np.int64)
                states = [then[r] for r in patched]
                sub_stat = np.array([st[1:] for st in states], dtype=np.float64)  # type: ignore[index]
                sub_ctx = _sub_context(context, rows)
                scores[rows] = self._scores(
                    pred,
                    np.stack([st[0] for st in states]),  # type: ignore[index]
                    static[rows],
                    sub_stat[:, 0],
                    self._trend_at(sub_stat, q),
                    sub_ctx,
                    sub_stat[:, 2],
                )
            if unseen:
                scores[np.asarray(unseen, dtype=np.int64)] = -np.inf
            true_row = self._row.get(q.item_id)
            if true_row is None or (true_row in then and then[true_row] is None):
                out.append(Ranked(q, n_known + 1, n_known))  # never seen: not retrievable
            else:
                out.append(Ranked(q, 1 + int((scores > scores[true_row]).sum()), n_known))
        return out

    def _score_bounded(
        self, todo: list[tuple[Query, np.ndarray]], fast: NumpyScores
    ) -> list[Ranked]:
        """``_score``'s ranks with approximate distances where they decide.

        ‖x − p‖² = ‖x‖² + ‖p‖² − 2 x·p for the whole batch from one matrix product; in float32
        it differs from the elementwise sum the ranker computes by at most
        2γ(‖x‖ + ‖p‖)², γ = (D + 2)u (the two sums' error bounds, u = 2⁻²⁴, D = d + s), taken
        four times over, plus the rounding of the terms added after it. A row whose
        approximate score is farther than that from the true item's exact score is on the
        same side of it as its exact score; the rows within it, those folded since the event
        and the true item are scored exactly. The rank equals the one of exact scores.
        """
        n = self._n
        dyn, static, stat = self._dyn[:n], self._static[:n], self._stat[:n]
        d = dyn.shape[1]
        # (B, D); one query (a small catalogue scores each at its seq) as a view of its row.
        preds = todo[0][1][None, :] if len(todo) == 1 else np.stack([pred for _, pred in todo])
        sq_rows = self._sq[:n]
        dots = row_dots(preds[:, :d], dyn) + row_dots(preds[:, d:], static)  # (B, n)
        sq_preds = np.einsum("ij,ij->i", preds, preds)
        approx = (sq_rows[None, :] + sq_preds[:, None]) - 2 * dots  # (B, n)
        norms = np.sqrt(sq_rows.astype(np.float64))
        gamma = 4 * 2 * (preds.shape[1] + 2) * 2.0**-24
        out = []
        for b, (q, pred) in enumerate(todo):
            then, n_known = self._at(q.seq)
            true_row = self._row.get(q.item_id)
            if true_row is None or (true_row in then and then[true_row] is None):
                out.append(Ranked(q, n_known + 1, n_known))  # never seen: not retrievable
                continue
            context = self._context(q)
            trend = self._trend_at(stat, q)
            scores = fast(pred, dyn, static, stat[:, 0], trend, context, dist=approx[b])
            bound = fast.scale * gamma * (norms + float(np.sqrt(sq_preds[b]))) ** 2
            exact = np.zeros(n, dtype=bool)
            patched = [row for row, state in then.items() if state is not None]
            if patched:
                rows = np.asarray(patched, dtype=np.int64)
                states = [then[r] for r in patched]
                sub_stat = np.array([st[1:] for st in states], dtype=np.float64)  # type: ignore[index]
                scores[rows] = fast(
                    pred,
                    np.stack([st[0] for st in states]),  # type: ignore[index]
                    static[rows],
                    sub_stat[:, 0],
                    self._trend_at(sub_stat, q),
                    _sub_context(context, rows),
                )
                exact[rows] = True
            unseen = [row for row, state in then.items() if state is None]
            if unseen:
                scores[np.asarray(unseen, dtype=np.int64)] = -np.inf
                exact[np.asarray(unseen, dtype=np.int64)] = True
            if not exact[true_row]:
                one = np.array([true_row], dtype=np.int64)
                scores[true_row] = fast(
                    pred,
                    dyn[one],
                    static[one],
                    stat[one, 0],
                    trend[one],
                    _sub_context(context, one),
                )[0]
                exact[true_row] = True
            mine = float(scores[true_row])
            slack = bound + 8 * 2.0**-24 * (np.abs(scores) + abs(mine) + 1.0)
            near = ~exact & (np.abs(scores.astype(np.float64) - mine) <= slack)
            if near.any():
                rows = np.flatnonzero(near)
                scores[rows] = fast(
                    pred,
                    dyn[rows],
                    static[rows],
                    stat[rows, 0],
                    trend[rows],
                    _sub_context(context, rows),
                )
            out.append(Ranked(q, 1 + int((scores > scores[true_row]).sum()), n_known))
        return out

    def _scores(
        self,
        pred: np.ndarray,
        dyn: np.ndarray,
        static: np.ndarray,
        count: np.ndarray,
        trend: np.ndarray,
        context: UserContext,
        last: np.ndarray | None = None,
    ) -> np.ndarray:
        """The ranker's scores (n,) float32, writable; ``last`` each item's last event time
        (the learned ranker reads it; the scorers with a numpy twin do not)."""
        if self._numpy_scores is not None:
            return self._numpy_scores(pred, dyn, static, count, trend, context)
        with torch.inference_mode():
            scores = self.scorer.scores(
                torch.from_numpy(pred),
                torch.from_numpy(np.ascontiguousarray(dyn)),
                torch.from_numpy(np.ascontiguousarray(static)),
                count,
                trend,
                context,
                last,
            )
        return scores.numpy().copy()

    @staticmethod
    def _trend_at(stat: np.ndarray, q: Query) -> np.ndarray:
        """Decayed counts of rows ``stat`` (n, 3) brought to the event's time (the offline
        ``EntityStore.trend_at`` arithmetic)."""
        return trend_at(stat[:, 1], stat[:, 2], q.timestamp)

    def _context(self, q: Query) -> UserContext:
        """The user's history before the event as item rows (-1 padded to the model's K)."""
        k = self.model.config.history_size
        rows = np.full(k, -1, dtype=np.int64)
        counts = np.zeros(k, dtype=np.int64)
        n = min(len(q.history), len(q.history_counts), k)  # zip's length, as it was read
        if n:
            get = self._row.get
            rows[:n] = [get(item, -1) for item in q.history[:n]]
            counts[:n] = q.history_counts[:n]
        times = habits = None
        if q.history_times:
            times = np.full(k, np.nan)
            given = np.asarray(q.history_times[:k], dtype=np.float64)
            times[: given.size] = given
        if q.habits:
            habits = np.asarray(q.habits, dtype=np.float64)
        return UserContext(rows, counts, times, habits, q.events, q.last_time, q.timestamp)

    def _group(self) -> int:
        """Queries scored together: one when each is scored on its own (scored at its seq,
        before later folds, it needs no rows patched from the undo records); for the bounded
        scoring's one matrix product, as many as ``_SCORE_FLOATS`` allows, ≤ 64."""
        if self._numpy_scores is None or self._n < max(self.bounded_from, self.batch_from):
            return 1
        width = self._dyn.shape[1] + self._static.shape[1]
        return max(1, min(64, _SCORE_FLOATS // (max(1, self._n) * width)))


#: Floats of one batched distance computation (B × n × (d + s)): 16 MB.
_SCORE_FLOATS = 4_000_000


def _sub_context(context: UserContext, rows: np.ndarray) -> UserContext:
    """``context`` for scoring only ``rows``: its history as positions among them."""
    if rows.size == 1:  # the true item's exact score, once per query: no dictionary
        history = np.where(context.history == rows[0], 0, -1).astype(np.int64)
        return replace(context, history=history)
    local = {int(r): j for j, r in enumerate(rows.tolist())}
    return replace(
        context, history=np.array([local.get(int(r), -1) for r in context.history], dtype=np.int64)
    )

"""JODIE split across the two sides of the exchange: what a user owner and an item owner apply.

The streaming workers never see both states of an event in one place: the user's owner holds
u(t⁻) and receives i(t⁻) from the item's owner, and vice versa (operators.protocol.exchange).
Both sides call the one event kernel (``operators.model.kernel.step``) on the same float32
inputs as the offline replay, so a stream reproduces it:

- user side: u(t) and, with the same inputs as the item side, i(t), because the
  recommendation after the event predicts from the user's last item as it is now:
  û = project(u(t), horizon), j̃ = predict(û, ū, i(t), ī), plus the state-change probability
  when the model has the head. The per-event query before the event needs the previous
  item's state *at the event*, which this side does not hold; it hands u(t⁻) and Δu on to the
  live evaluation (``operators.evaluation.live``), which completes it;
- item side: i(t) (and u(t), as the user side) and the item's retrieval vector [i(t), ī].

Quarantine: both sides compute the same ``step`` on the same inputs, so they quarantine the
same events (``operators.model.kernel``) and say so in their outputs (``quarantined``, the
reason). An exception while applying a batch is narrowed to the event that raises it by
applying the batch's events one at a time; that event is quarantined on the side where it
raised (its embedding kept, its time and item recorded as for a kernel quarantine), so one
input never stops a worker.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from operators.model.checkpoint import Checkpoint
from operators.model.inference import NumpyJodie, static_row
from operators.model.jodie import Jodie, standardise_delta
from operators.model.kernel import feature_rows
from operators.model.state import HABITS, TREND_SECONDS, habits_after
from operators.model.static import Kind
from operators.protocol.exchange import Apply, ApplyMany, Pending, Ready

NAN = float("nan")


class EntityState(NamedTuple):
    """One user's or item's model state, as kept in its table.

    ``embedding`` is None until the entity's first event (the model's learned initial state
    applies); ``last_time`` is NaN until then. ``history`` (users only): distinct recent item
    ids, most recent first, at most ``ModelConfig.history_size``, with ``history_counts``, the
    user's events on each while it stayed there, ``history_times``, the user's last event time
    on each, and ``habits`` (``operators.model.state.HABITS``). ``events``: events so far.
    ``trend`` (items only): the same decayed with ``TREND_SECONDS`` as of ``last_time``. The
    counts, trend, times and habits are what the rankers read besides the embeddings
    (``operators.evaluation.scorer``, ``operators.evaluation.ranker``), kept exactly as the
    offline ``EntityStore`` keeps them. A row written before times and habits were kept has
    them empty: the learned ranker then scores that user without those terms until its
    history turns over.
    """

    embedding: np.ndarray | None  # (d,) float32
    last_time: float = NAN
    history: tuple[str, ...] = ()
    history_counts: tuple[int, ...] = ()
    events: int = 0
    trend: float = 0.0
    history_times: tuple[float, ...] = ()
    habits: tuple[float, ...] = ()

    @property
    def is_new(self) -> bool:
        return math.isnan(self.last_time)


NEW = EntityState(embedding=None)


class EventData(NamedTuple):
    """What both sides know of an event (from the canonical log).

    ``features``: the event's features packed as the wire carries them, little-endian float32
    (``pack_features``; b"" for none). They are only ever read as a batch's array, so they
    stay bytes from the inbox message to the model: no Python float per feature on the way.
    """

    event_id: str
    user_id: str
    item_id: str
    timestamp: float
    features: bytes


#: One feature on the wire and in ``EventData.features``: an Avro float, little-endian.
FEATURE = np.dtype("<f4")


def pack_features(values: Sequence[float]) -> bytes:
    """``EventData.features`` of the values (each rounded to float32, as the wire rounds it)."""
    return np.asarray(values, dtype=FEATURE).tobytes()


def unpack_features(packed: bytes) -> list[float]:
    """The values of ``pack_features`` (an Avro record's ``features``)."""
    return np.frombuffer(packed, dtype=FEATURE).tolist()


class UserOutput(NamedTuple):
    """The recommendation material produced when a user applies an event."""

    event: EventData
    user: np.ndarray  # (d,) u(t)
    projected: np.ndarray  # (d,) û(t + horizon)
    predicted: np.ndarray  # (d + s_item,) j̃
    history: tuple[str, ...]
    state_change_probability: float | None
    # What the query before the event needs besides the item states at the event (see
    # operators.model.kernel): u(t⁻), the standardised Δu, and the user's previous item.
    pre_state: np.ndarray  # (d,) float32
    delta_user: float
    previous_item: str | None
    #: Why the event changed no embedding (operators.model.kernel), None when it applied.
    quarantined: str | None = None
    history_counts: tuple[int, ...] = ()  # with ``history``: after the event
    pre_history: tuple[str, ...] = ()  # the user's history and counts before the event
    pre_counts: tuple[int, ...] = ()
    #: (d + s_item,) [i(t), ī] of the event's item just after it: the list served now ranks
    #: that item at this state, whatever the index holds for it yet.
    item_vector: np.ndarray | None = None
    #: The user's rows before and after the event, whole: what the learned ranker reads of
    #: the user (history times, habits, event count, last time) for the live evaluation's
    #: query before the event and for the list served after it.
    pre_user: EntityState = NEW
    post_user: EntityState = NEW


class ItemOutput(NamedTuple):
    """An item's new retrieval vector [i(t), ī] after it applied an event."""

    event: EventData
    vector: np.ndarray  # (d + s_item,)
    quarantined: str | None = None  # as UserOutput.quarantined
    events: int = 0  # the item's events so far, after this one
    trend: float = 0.0  # its decayed count as of this event


class StreamModel:
    """Fixed weights applied one side at a time; every method is pure given its inputs."""

    def __init__(self, model: Jodie, horizon_s: float | None = None) -> None:
        self.model = model.eval()
        cfg = model.config
        self.config = cfg
        # The stream's waves are a few events each: numpy computes them several times faster
        # than torch dispatches them (operators.model.inference).
        self.net = NumpyJodie(self.model)
        with torch.no_grad():
            self._u_init = model.initial_user().detach().numpy().reshape(-1).copy()  # (d,)
            self._i_init = model.initial_item().detach().numpy().reshape(-1).copy()  # (d,)
        self._du = (cfg.delta_user_mean, cfg.delta_user_std)
        self._di = (cfg.delta_item_mean, cfg.delta_item_std)
        # Default horizon: the mean gap between a user's events in the training data, i.e.
        # "where will this user be at their next event".
        self.horizon_s = cfg.delta_user_mean if horizon_s is None else horizon_s
        self._horizon = standardise_delta(np.array([[self.horizon_s]]), *self._du)  # (1, 1)
        self._horizons = np.repeat(self._horizon, 64, axis=0)

    # -- batched inputs ----------------------------------------------------------------------
    def _horizon_rows(self, n: int) -> np.ndarray:
        """(n, 1) of the horizon's Δ: a view of rows kept for the purpose (``broadcast_to``
        cost a tenth of a wave's model arithmetic)."""
        rows = self._horizons
        if rows.shape[0] < n:
            rows = self._horizons = np.repeat(self._horizon, max(n, 2 * rows.shape[0]), axis=0)
        return rows[:n]

    @staticmethod
    def _dyns(states: list[EntityState], initial: np.ndarray) -> np.ndarray:
        """(B, d): each state's embedding, the learned initial one for a new entity."""
        # np.array, not np.stack: the same rows at a third of the cost for a wave's few.
        return np.array(
            [
                initial
                if s.embedding is None or math.isnan(s.last_time)
                else np.asarray(s.embedding, dtype=np.float32)
                for s in states
            ],
            dtype=np.float32,
        ).reshape(len(states), initial.shape[0])

    @staticmethod
    def _deltas(lasts: list[float], ts: list[float], stats: tuple[float, float]) -> np.ndarray:
        # ``gap`` over the batch at once: the same float64 subtraction, 0 for a first event.
        last, t = np.array(lasts, dtype=np.float64), np.array(ts, dtype=np.float64)
        if last.shape != t.shape:
            raise ValueError(f"{last.size} last times for {t.size} events")
        gaps = np.where(np.isnan(last), 0.0, t - last)[:, None]
        return standardise_delta(gaps, *stats)  # (B, 1)

    def _features_of(self, events: list[EventData]) -> tuple[np.ndarray, np.ndarray | None]:
        """(B, F) features and the ``admitted`` mask of ``step`` (see feature_rows)."""
        width = self.config.n_features
        packed = [e.features for e in events]
        if not any(packed):
            return np.zeros((len(events), width), dtype=np.float32), None
        row_bytes = width * FEATURE.itemsize
        if all(len(p) == row_bytes for p in packed):  # the common case: one copy for all
            rows = np.frombuffer(b"".join(packed), dtype=FEATURE).reshape(len(events), width)
            return rows.astype(np.float32, copy=False), None
        # A row of another length: zeros, and its event quarantined (feature_rows). Bytes
        # that are no whole number of features are a row of the wrong length too.
        wrong = np.zeros(width + 1, dtype=np.float32)
        whole = [
            np.frombuffer(p, dtype=FEATURE) if len(p) % FEATURE.itemsize == 0 else wrong
            for p in packed
        ]
        array, admitted = feature_rows(whole, width)
        return array.numpy(), admitted

    @staticmethod
    def _reasons(n: int, quarantined: np.ndarray | None, admitted: np.ndarray | None) -> list:
        """Each event's quarantine reason (None: applied)."""
        if quarantined is None:
            return [None] * n
        return [
            None
            if not q
            else ("feature_length" if admitted is not None and not admitted[b] else "non_finite")
            for b, q in enumerate(quarantined.tolist())
        ]

    def _statics(self, kind: Kind, ids: list[str]) -> np.ndarray:
        dim = self.config.user_static_dim if kind == "user" else self.config.item_static_dim
        rows = [static_row(kind, i, dim) for i in ids]
        return np.array(rows, dtype=np.float32).reshape(len(ids), dim)

    def _user_posts(
        self, users: list[EntityState], events: list[EventData], embeddings: list[np.ndarray]
    ) -> list[EntityState]:
        """The users' rows after their events (distinct users): the embeddings given, the
        clock moved, the history with its counts and times, the habits and the event count,
        as ``EntityStore.update`` moves the offline rows (``next_habits`` on the batch, so the
        arithmetic is the offline one)."""
        k = self.config.history_size
        habits: list[tuple[float, ...]] = [u.habits for u in users]
        if k:
            habits = [tuple(h) for h in _next_habits(users, events, k).tolist()]
        out = []
        for user, event, emb, hab in zip(users, events, embeddings, habits, strict=True):
            history, counts, times = _pushed(user, event.item_id, event.timestamp, k)
            out.append(
                EntityState(emb, event.timestamp, history, counts, user.events + 1, 0.0, times, hab)
            )
        return out

    # -- the two sides ---------------------------------------------------------------------
    def apply_user(
        self, user: EntityState, item_pre: EntityState, event: EventData
    ) -> tuple[EntityState, UserOutput, EntityState]:
        """The user's owner applies ``event`` given the item's state just before it.

        Returns the user's post-state, the recommendation material and the item's post-state
        (which the item's owner computes identically).
        """
        return self.apply_users([user], [item_pre], [event])[0]

    def apply_users(
        self, users: list[EntityState], items_pre: list[EntityState], events: list[EventData]
    ) -> list[tuple[EntityState, UserOutput, EntityState]]:
        """``apply_user`` for events of distinct users at once (one batch of model calls)."""
        ts = [e.timestamp for e in events]
        u_prev = self._dyns(users, self._u_init)  # (B, d)
        i_prev = self._dyns(items_pre, self._i_init)  # (B, d)
        f, admitted = self._features_of(events)
        du = self._deltas([u.last_time for u in users], ts, self._du)
        di = self._deltas([i.last_time for i in items_pre], ts, self._di)
        # The query before the event needs the previous item's state at the event, which
        # this side does not hold: the live evaluation completes it (UserOutput.pre_state).
        out = self.net.step(u_prev, i_prev, du, di, f, admitted=admitted)
        reasons = self._reasons(len(events), out.quarantined, admitted)
        u_new, i_new = out.user, out.item  # i_new (B, d): as the item side computes it
        horizon = self._horizon_rows(len(events))
        u_static = self._statics("user", [e.user_id for e in events])
        i_static = self._statics("item", [e.item_id for e in events])
        # The recommendation after the event: the user projected to the horizon, predicting
        # from the item just touched (the user's previous item from now on).
        projected, predicted = self.net.query(u_new, horizon, u_static, i_new, i_static)
        probs = self.net.state_change_probability(u_new)
        item_vectors = np.concatenate([i_new, i_static], axis=1)
        # Rows kept in tables are copies: a view would pin the whole batch's array.
        posts = self._user_posts(users, events, [u_new[b].copy() for b in range(len(events))])
        results = []
        for b, (user, event, new_state) in enumerate(zip(users, events, posts, strict=True)):
            history, counts = new_state.history, new_state.history_counts
            material = UserOutput(
                event=event,
                user=new_state.embedding,  # type: ignore[arg-type]
                projected=projected[b],
                predicted=predicted[b],
                history=history,
                state_change_probability=None if probs is None else float(probs[b]),
                pre_state=u_prev[b],
                delta_user=float(du[b, 0]),
                previous_item=user.history[0] if user.history else None,
                quarantined=reasons[b],
                history_counts=counts,
                pre_history=user.history,
                pre_counts=user.history_counts,
                item_vector=item_vectors[b],
                pre_user=user,
                post_user=new_state,
            )
            results.append((new_state, material, EntityState(i_new[b].copy(), event.timestamp)))
        return results

    def apply_item(
        self, item: EntityState, user_pre: EntityState, event: EventData
    ) -> tuple[EntityState, ItemOutput, EntityState]:
        """The item's owner applies ``event`` given the user's state just before it.

        Returns the item's post-state, its retrieval vector and the user's post-state
        embedding and time (the user's history is the user owner's business).
        """
        return self.apply_items([item], [user_pre], [event])[0]

    def apply_items(
        self, items: list[EntityState], users_pre: list[EntityState], events: list[EventData]
    ) -> list[tuple[EntityState, ItemOutput, EntityState]]:
        """``apply_item`` for events of distinct items at once."""
        ts = [e.timestamp for e in events]
        i_prev = self._dyns(items, self._i_init)
        u_prev = self._dyns(users_pre, self._u_init)
        f, admitted = self._features_of(events)
        di = self._deltas([i.last_time for i in items], ts, self._di)
        du = self._deltas([u.last_time for u in users_pre], ts, self._du)
        out = self.net.step(u_prev, i_prev, du, di, f, admitted=admitted)
        reasons = self._reasons(len(events), out.quarantined, admitted)
        i_new, u_new = out.item, out.user  # u_new (B, d): as the user side
        i_static = self._statics("item", [e.item_id for e in events])
        vectors = np.concatenate([i_new, i_static], axis=1)
        trends = decayed_counts(items, ts)
        results = []
        for b, (item, event) in enumerate(zip(items, events, strict=True)):
            user_post = EntityState(u_new[b].copy(), event.timestamp)
            post = counted(item, i_new[b].copy(), event.timestamp, trends[b])
            results.append(
                (
                    post,
                    ItemOutput(event, vectors[b], reasons[b], post.events, post.trend),
                    user_post,
                )
            )
        return results

    def predict_at(
        self,
        user_id: str,
        user: EntityState,
        previous: tuple[str, np.ndarray] | None,
        t: float,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(û, j̃) of a user at time ``t``, between events: u projected by Δ = t − its last
        event, predicting from its previous item ``(id, i)`` as that item is now (None: the
        model's initial item, no static part) — ``OnlineJodie.query`` from one side's
        state. (d,), (d + s_item,)."""
        u = self._dyns([user], self._u_init)  # (1, d)
        du = self._deltas([user.last_time], [t], self._du)  # (1, 1)
        if previous is None:
            p_dyn = self._i_init.reshape(1, -1)
            p_static = np.zeros((1, self.config.item_static_dim), dtype=np.float32)
        else:
            p_dyn = np.asarray(previous[1], dtype=np.float32).reshape(1, -1)
            p_static = self._statics("item", [previous[0]])
        u_static = self._statics("user", [user_id])
        projected, predicted = self.net.query(u, du, u_static, p_dyn, p_static)
        return projected[0].copy(), predicted[0].copy()

    # -- quarantine by exception -------------------------------------------------------------
    @staticmethod
    def _kept(state: EntityState, initial: np.ndarray) -> np.ndarray:
        if state.embedding is None or state.is_new:
            return initial.copy()
        return np.asarray(state.embedding, dtype=np.float32).copy()

    def skip_user(
        self, user: EntityState, item_pre: EntityState, event: EventData, reason: str
    ) -> tuple[EntityState, UserOutput, EntityState]:
        """``apply_user`` for an event that cannot be applied: both embeddings kept, the
        time and the item recorded (what the kernel's quarantine leaves)."""
        kept = self._kept(user, self._u_init)
        [post] = self._user_posts([user], [event], [kept])
        history, counts = post.history, post.history_counts
        nothing = np.zeros(0, dtype=np.float32)  # a quarantined event is never served
        material = UserOutput(
            event=event,
            user=kept,
            projected=nothing,
            predicted=nothing,
            history=history,
            state_change_probability=None,
            pre_state=kept,
            delta_user=0.0,
            previous_item=user.history[0] if user.history else None,
            quarantined=reason,
            history_counts=counts,
            pre_history=user.history,
            pre_counts=user.history_counts,
            pre_user=user,
            post_user=post,
        )
        item_post = EntityState(self._kept(item_pre, self._i_init), event.timestamp)
        return post, material, item_post

    def skip_item(
        self, item: EntityState, user_pre: EntityState, event: EventData, reason: str
    ) -> tuple[EntityState, ItemOutput, EntityState]:
        """``apply_item`` for an event that cannot be applied (see ``skip_user``)."""
        kept = self._kept(item, self._i_init)
        static = static_row("item", event.item_id, self.config.item_static_dim)
        vector = np.concatenate([kept, static])
        user_post = EntityState(self._kept(user_pre, self._u_init), event.timestamp)
        post = counted(item, kept, event.timestamp)
        return post, ItemOutput(event, vector, reason, post.events, post.trend), user_post

    # -- adapters for operators.protocol.exchange --------------------------------------------
    def user_apply(self) -> Apply[EntityState, EntityState]:
        """``Inbox`` apply function of the user side (the pending payload is EventData)."""

        def apply(
            state: EntityState,
            partner: EntityState,
            pending: Pending,
            previous: EntityState | None,
        ) -> tuple[EntityState, UserOutput, EntityState]:
            return self.apply_user(state, partner, pending.payload)

        return apply

    def user_apply_many(self) -> ApplyMany[EntityState, EntityState]:
        """The batched ``user_apply`` for ``operators.protocol.exchange.drive``."""

        def many(ready: list[Ready[EntityState, EntityState]]) -> list[tuple[Any, Any, Any]]:
            return list(
                self.apply_users(
                    [r.state for r in ready],
                    [r.partner for r in ready],
                    [r.event.payload for r in ready],
                )
            )

        def skip(r: Ready[EntityState, EntityState], why: str) -> tuple[Any, Any, Any]:
            return self.skip_user(r.state, r.partner, r.event.payload, why)

        return guarded(many, skip)

    def item_apply_many(self) -> ApplyMany[EntityState, EntityState]:
        """The batched ``item_apply`` for ``operators.protocol.exchange.drive``."""

        def many(ready: list[Ready[EntityState, EntityState]]) -> list[tuple[Any, Any, Any]]:
            return list(
                self.apply_items(
                    [r.state for r in ready],
                    [r.partner for r in ready],
                    [r.event.payload for r in ready],
                )
            )

        def skip(r: Ready[EntityState, EntityState], why: str) -> tuple[Any, Any, Any]:
            return self.skip_item(r.state, r.partner, r.event.payload, why)

        return guarded(many, skip)

    def item_apply(self) -> Apply[EntityState, EntityState]:
        """``Inbox`` apply function of the item side."""

        def apply(
            state: EntityState,
            partner: EntityState,
            pending: Pending,
            previous: EntityState | None,
        ) -> tuple[EntityState, ItemOutput, EntityState]:
            return self.apply_item(state, partner, pending.payload)

        return apply


def push_history(user: EntityState, item: str, k: int) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """The user's history and counts after an event on ``item``: it moves to the front with
    its count + 1 (0 + 1 if new there), the oldest entry falls off beyond ``k`` — what
    ``operators.model.state.EntityStore.update_one`` does to the offline rows."""
    if not k:
        return (), ()
    history = user.history
    counts = user.history_counts or (0,) * len(history)
    if len(counts) != len(history):
        raise ValueError(f"{len(history)} history items with {len(counts)} counts")
    # A history holds distinct items: the one touched leaves its place, if it had one.
    at = history.index(item) if item in history else -1
    if at < 0:
        return (item, *history[: k - 1]), (1, *counts[: k - 1])
    if history.count(item) > 1:  # never written so; kept as the rule says all the same
        kept = [(h, c) for h, c in zip(history, counts, strict=True) if h != item][: k - 1]
        before = dict(zip(history, counts, strict=True))
        return (item, *(h for h, _ in kept)), (before[item] + 1, *(c for _, c in kept))
    rest_h, rest_c = history[:at] + history[at + 1 :], counts[:at] + counts[at + 1 :]
    return (item, *rest_h[: k - 1]), (counts[at] + 1, *rest_c[: k - 1])


def push_history_times(user: EntityState, item: str, t: float, k: int) -> tuple[float, ...]:
    """The user's last event time on each entry of ``push_history``'s result: ``t`` for
    ``item``, the others carried along (NaN where a row written before times were kept has
    none) — ``operators.model.state.push_history_times`` on one row of ids."""
    if not k:
        return ()
    history = user.history
    times = user.history_times
    if len(times) != len(history):
        times = (NAN,) * len(history)
    kept = [w for h, w in zip(history, times, strict=True) if h != item]
    return (float(t), *kept[: k - 1])


def _pushed(
    user: EntityState, item: str, t: float, k: int
) -> tuple[tuple[str, ...], tuple[int, ...], tuple[float, ...]]:
    """``push_history`` and ``push_history_times`` in one pass over the history, for the rows
    the stream writes (distinct items, counts and times beside them); any other row takes the
    two functions, which say what is wrong with it."""
    history, counts, times = user.history, user.history_counts, user.history_times
    if not k or not len(counts) == len(times) == len(history) or history.count(item) > 1:
        pushed, pushed_counts = push_history(user, item, k)
        return pushed, pushed_counts, push_history_times(user, item, t, k)
    if item not in history:
        return (item, *history[: k - 1]), (1, *counts[: k - 1]), (float(t), *times[: k - 1])
    at = history.index(item)
    rest = slice(None, k - 1)
    return (
        (item, *(history[:at] + history[at + 1 :])[rest]),
        (counts[at] + 1, *(counts[:at] + counts[at + 1 :])[rest]),
        (float(t), *(times[:at] + times[at + 1 :])[rest]),
    )


def _next_habits(users: list[EntityState], events: list[EventData], k: int) -> np.ndarray:
    """(B, 4) the users' habits after their events, as ``next_habits`` gives them on their
    histories of ids (the item compared with the tuples here: no object arrays)."""
    habits = np.zeros((len(users), len(HABITS)), dtype=np.float64)
    same, new = [], []
    for row, (user, event) in enumerate(zip(users, events, strict=True)):
        history, item = user.history[:k], event.item_id
        same.append(bool(history) and history[0] == item)
        new.append(item not in history)
        if user.habits:
            habits[row] = user.habits
    last = np.array([u.last_time for u in users], dtype=np.float64)
    gaps = np.array([e.timestamp for e in events], dtype=np.float64) - last
    counts = np.array([u.events for u in users], dtype=np.int64)
    return habits_after(habits, np.array(same, dtype=bool), np.array(new, dtype=bool), gaps, counts)


def decayed_counts(items: list[EntityState], ts: list[float]) -> list[float]:
    """Each item's decayed count (``TREND_SECONDS``) after its event at ``ts``, for a batch of
    distinct items at once: the offline store's arithmetic, numpy's exp on the batch's array
    as the store takes it on its rows."""
    last = np.array([i.last_time for i in items], dtype=np.float64)
    age = np.where(np.isnan(last), np.inf, np.array(ts, dtype=np.float64) - last)
    trend = np.array([i.trend for i in items], dtype=np.float64)
    return (trend * np.exp(-age / TREND_SECONDS) + 1.0).tolist()


def counted(
    item: EntityState, embedding: np.ndarray, t: float, trend: float | None = None
) -> EntityState:
    """The item with ``embedding`` after an event at ``t``: its clock moved to ``t``, its
    event count and decayed count (``TREND_SECONDS``) updated (the offline store's rule).
    ``trend``: that decayed count when ``decayed_counts`` computed it for a batch."""
    if trend is None:
        (trend,) = decayed_counts([item], [t])
    # Built field by field: dataclasses.replace, which looks the fields up at every call,
    # cost more than the rest of this per event.
    return EntityState(
        embedding,
        t,
        item.history,
        item.history_counts,
        item.events + 1,
        trend,
        item.history_times,
        item.habits,
    )


Skip = Callable[[Ready[EntityState, EntityState], str], tuple[Any, Any, Any]]


def guarded(
    many: ApplyMany[EntityState, EntityState], skip: Skip
) -> ApplyMany[EntityState, EntityState]:
    """``many`` that never raises: a batch that raises is applied one event at a time, and
    each event that raises alone is ``skip``ped with the exception as its reason."""

    def run(ready: list[Ready[EntityState, EntityState]]) -> list[tuple[Any, Any, Any]]:
        try:
            return many(ready)
        except Exception:  # any input-borne failure: narrowed below
            pass
        results: list[tuple[Any, Any, Any]] = []
        for r in ready:
            try:
                results += many([r])
            except Exception as exc:  # this event is the poison one
                results.append(skip(r, f"exception {type(exc).__name__}: {exc}"[:500]))
        return results

    return run


class CheckpointStates:
    """A checkpoint's entity states by id, as the stream starts from them (converted on use)."""

    def __init__(self, ckpt: Checkpoint) -> None:
        self.users = ckpt.states.users
        self.items = ckpt.states.items
        self._user_rows = {u: r for r, u in enumerate(self.users.ids)}
        self._item_rows = {i: r for r, i in enumerate(self.items.ids)}
        self._item_ids = self.items.ids
        # A checkpoint replayed from interactions.log knows each entity's last event there
        # (its seq): the stream continues each entity's chain from it, and skips the events
        # the checkpoint already holds. Trained from a file: -1, the stream starts after it.
        seqs = getattr(ckpt, "last_seq", None)
        self._user_seq = None if seqs is None else np.asarray(seqs.users, dtype=np.int64)
        self._item_seq = None if seqs is None else np.asarray(seqs.items, dtype=np.int64)

    def user_seq(self, user_id: str) -> int:
        """Seq of the user's last event in the checkpoint's log replay (-1: none known)."""
        row = self._user_rows.get(user_id)
        return -1 if row is None or self._user_seq is None else int(self._user_seq[row])

    def item_seq(self, item_id: str) -> int:
        row = self._item_rows.get(item_id)
        return -1 if row is None or self._item_seq is None else int(self._item_seq[row])

    def user(self, user_id: str) -> EntityState:
        row = self._user_rows.get(user_id)
        if row is None or np.isnan(self.users.last_time[row]):
            return NEW
        users = self.users
        entries = users.history[row].tolist()
        counts = users.history_counts[row].tolist()
        times = users.history_times[row].tolist()
        kept = [
            (self._item_ids[h], int(c), float(w))
            for h, c, w in zip(entries, counts, times, strict=True)
            if h >= 0
        ]
        # A checkpoint saved before times and habits were kept leaves them unknown (empty).
        known = "history_times" not in users.missing
        return EntityState(
            users.emb[row].numpy().copy(),
            float(users.last_time[row]),
            tuple(h for h, _, _ in kept),
            tuple(c for _, c, _ in kept),
            int(users.count[row]),
            0.0,
            tuple(w for _, _, w in kept) if known else (),
            tuple(float(x) for x in users.habits[row].tolist())
            if "habits" not in users.missing
            else (),
        )

    def item(self, item_id: str) -> EntityState:
        row = self._item_rows.get(item_id)
        if row is None or np.isnan(self.items.last_time[row]):
            return NEW
        return EntityState(
            self.items.emb[row].numpy().copy(),
            float(self.items.last_time[row]),
            events=int(self.items.count[row]),
            trend=float(self.items.trend[row]),
        )

    def item_stats(self, ids: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(count, trend, last_time) of these checkpoint items, float64 (n,) each."""
        rows = [self._item_rows[i] for i in ids]
        return (
            self.items.count[rows].astype(np.float64),
            np.asarray(self.items.trend[rows], dtype=np.float64),
            np.asarray(self.items.last_time[rows], dtype=np.float64),
        )

    def item_vectors(self) -> tuple[list[str], np.ndarray]:
        """[i, ī] of every item the checkpoint has seen: the candidate index's first contents."""
        rows = [r for r in range(len(self._item_ids)) if not np.isnan(self.items.last_time[r])]
        ids = [self._item_ids[r] for r in rows]
        if not rows:
            return ids, np.zeros((0, 0), dtype=np.float32)
        dyn = self.items.emb[rows].numpy()
        return ids, np.concatenate([dyn, self.items.static[rows].numpy()], axis=1)

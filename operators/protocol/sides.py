"""JODIE split across the two sides of the exchange: what a user owner and an item owner apply.

The streaming workers never see both states of an event in one place: the user's owner holds
u(t⁻) and receives i(t⁻) from the item's owner, and vice versa (operators.protocol.exchange).
Both run the very operators of ``operators.model.online`` (the frozen evaluation's sequential
replay) on the same float32 inputs, so a stream reproduces that replay:

- user side: first the paper's query before the event, as the frozen evaluation ranks it:
  j̃⁻ = predict(project(u(t⁻), Δu), ū, p, p̄) with p the user's previous item (its pre-state
  when it is this event's item, else its state as this side last computed it); then
  u(t) = update_user(u(t⁻), i(t⁻), Δu, f); it also computes i(t) with the item's
  operator (same inputs as the item side) because the recommendation after the event predicts
  from the user's last item as it is now; then û = project(u(t), horizon) and
  j̃ = predict(û, ū, i(t), ī), plus the state-change probability when the model has the head;
- item side: i(t) = update_item(i(t⁻), u(t⁻), Δi, f) and the item's retrieval vector [i(t), ī].
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from torch import Tensor

from operators.model.checkpoint import Checkpoint
from operators.model.jodie import Jodie, standardise_delta
from operators.model.online import gap
from operators.model.static import static_embeddings
from operators.protocol.exchange import Apply, ApplyMany, Pending, Ready

NAN = float("nan")


@dataclass(frozen=True)
class EntityState:
    """One user's or item's model state, as kept in its table.

    ``embedding`` is None until the entity's first event (the model's learned initial state
    applies); ``last_time`` is NaN until then. ``history`` (users only): distinct recent item
    ids, most recent first, at most ``ModelConfig.history_size``.
    """

    embedding: np.ndarray | None  # (d,) float32
    last_time: float = NAN
    history: tuple[str, ...] = ()

    @property
    def is_new(self) -> bool:
        return math.isnan(self.last_time)


NEW = EntityState(embedding=None)


@dataclass(frozen=True)
class EventData:
    """What both sides know of an event (from the canonical log)."""

    event_id: str
    user_id: str
    item_id: str
    timestamp: float
    features: tuple[float, ...]


@dataclass(frozen=True)
class UserOutput:
    """The recommendation material produced when a user applies an event."""

    event: EventData
    user: np.ndarray  # (d,) u(t)
    projected: np.ndarray  # (d,) û(t + horizon)
    predicted: np.ndarray  # (d + s_item,) j̃
    history: tuple[str, ...]
    state_change_probability: float | None
    # The query before the event (what the live evaluation ranks the true item against):
    query: np.ndarray  # (d + s_item,) j̃ from u(t⁻) projected to t
    true_vector: np.ndarray | None  # (d + s_item,) [i(t⁻), ī]; None for an unseen item


@dataclass(frozen=True)
class ItemOutput:
    """An item's new retrieval vector [i(t), ī] after it applied an event."""

    event: EventData
    vector: np.ndarray  # (d + s_item,)


class StreamModel:
    """Fixed weights applied one side at a time; every method is pure given its inputs."""

    def __init__(self, model: Jodie, horizon_s: float | None = None) -> None:
        self.model = model.eval()
        cfg = model.config
        self.config = cfg
        with torch.no_grad():
            self._u_init = model.initial_user().detach().reshape(1, -1)  # (1, d)
            self._i_init = model.initial_item().detach().reshape(1, -1)  # (1, d)
        self._no_features = torch.zeros(1, cfg.n_features)
        self._no_item_static = torch.zeros(1, cfg.item_static_dim)
        self._du = (cfg.delta_user_mean, cfg.delta_user_std)
        self._di = (cfg.delta_item_mean, cfg.delta_item_std)
        # Default horizon: the mean gap between a user's events in the training data, i.e.
        # "where will this user be at their next event".
        self.horizon_s = cfg.delta_user_mean if horizon_s is None else horizon_s
        self._user_static = lru_cache(maxsize=1 << 16)(self._static_user)
        self._item_static = lru_cache(maxsize=1 << 16)(self._static_item)

    # -- helpers ---------------------------------------------------------------------------
    def _static_user(self, user_id: str) -> Tensor:
        return torch.from_numpy(static_embeddings("user", [user_id], self.config.user_static_dim))

    def _static_item(self, item_id: str) -> Tensor:
        return torch.from_numpy(static_embeddings("item", [item_id], self.config.item_static_dim))

    def item_static(self, item_id: str) -> np.ndarray:
        """ī of an item; (s_item,)."""
        return self._item_static(item_id).numpy().reshape(-1)

    # -- batched inputs ----------------------------------------------------------------------
    def _dyns(self, states: list[EntityState], initial: Tensor) -> Tensor:
        """(B, d): each state's embedding, the learned initial one for a new entity."""
        rows = [
            initial.reshape(-1).numpy()
            if s.embedding is None or s.is_new
            else np.asarray(s.embedding, dtype=np.float32)
            for s in states
        ]
        return torch.from_numpy(np.stack(rows))

    @staticmethod
    def _deltas(lasts: list[float], ts: list[float], stats: tuple[float, float]) -> Tensor:
        gaps = np.array([[gap(last, t)] for last, t in zip(lasts, ts, strict=True)])
        return torch.from_numpy(standardise_delta(gaps, *stats))  # (B, 1)

    def _features_of(self, events: list[EventData]) -> Tensor:
        if not any(e.features for e in events):
            return self._no_features.expand(len(events), -1)
        return torch.tensor([e.features for e in events], dtype=torch.float32)  # (B, F)

    def _statics(self, ids: list[str], of: Callable[[str], Tensor]) -> Tensor:
        return torch.cat([of(i) for i in ids], dim=0)

    # -- the two sides ---------------------------------------------------------------------
    def apply_user(
        self,
        user: EntityState,
        item_pre: EntityState,
        event: EventData,
        last_item: EntityState | None = None,
    ) -> tuple[EntityState, UserOutput, EntityState]:
        """The user's owner applies ``event`` given the item's state just before it.

        ``last_item`` is the state of the user's previous item (``user.history[0]``) used for
        the query before the event; None when the user has no previous item.
        Returns the user's post-state, the recommendation material and the item's post-state
        (which the item's owner computes identically).
        """
        return self.apply_users([user], [item_pre], [event], [last_item])[0]

    @torch.inference_mode()
    def apply_users(
        self,
        users: list[EntityState],
        items_pre: list[EntityState],
        events: list[EventData],
        last_items: list[EntityState | None],
    ) -> list[tuple[EntityState, UserOutput, EntityState]]:
        """``apply_user`` for events of distinct users at once (one batch of model calls)."""
        ts = [e.timestamp for e in events]
        u_prev = self._dyns(users, self._u_init)  # (B, d)
        i_prev = self._dyns(items_pre, self._i_init)  # (B, d)
        f = self._features_of(events)
        du = self._deltas([u.last_time for u in users], ts, self._du)
        di = self._deltas([i.last_time for i in items_pre], ts, self._di)
        u_static = self._statics([e.user_id for e in events], self._user_static)
        # The query as OnlineJodie.query makes it (no previous item: initial state, zero ī).
        p_dyn = self._dyns([last or NEW for last in last_items], self._i_init)
        p_static = torch.cat(
            [self._item_static(u.history[0]) if u.history else self._no_item_static for u in users]
        )
        query = self.model.predict(self.model.project(u_prev, du), u_static, p_dyn, p_static)
        u_new = self.model.update_user(u_prev, i_prev, du, f)  # (B, d)
        i_new = self.model.update_item(i_prev, u_prev, di, f)  # (B, d), as the item side does
        horizon = torch.from_numpy(
            standardise_delta(np.full((len(events), 1), self.horizon_s), *self._du)
        )  # (B, 1)
        projected = self.model.project(u_new, horizon)  # (B, d)
        i_static = self._statics([e.item_id for e in events], self._item_static)
        predicted = self.model.predict(projected, u_static, i_new, i_static)  # (B, d + s_item)
        probs = None
        if self.model.state_head is not None:
            probs = torch.softmax(self.model.state_change_logits(u_new), dim=1)[:, 1].tolist()
        k = self.config.history_size
        i_prev_np, i_static_np = i_prev.numpy(), i_static.numpy()
        u_np, i_np = u_new.numpy(), i_new.numpy()
        proj_np, pred_np, query_np = projected.numpy(), predicted.numpy(), query.numpy()
        out = []
        for b, (user, item_pre, event) in enumerate(zip(users, items_pre, events, strict=True)):
            history = (
                (event.item_id, *[h for h in user.history if h != event.item_id])[:k] if k else ()
            )
            new_state = EntityState(u_np[b].copy(), event.timestamp, history)
            true_vector = (
                None if item_pre.is_new else np.concatenate([i_prev_np[b], i_static_np[b]])
            )
            material = UserOutput(
                event=event,
                user=new_state.embedding,  # type: ignore[arg-type]
                projected=proj_np[b].copy(),
                predicted=pred_np[b].copy(),
                history=history,
                state_change_probability=None if probs is None else float(probs[b]),
                query=query_np[b].copy(),
                true_vector=true_vector,
            )
            out.append((new_state, material, EntityState(i_np[b].copy(), event.timestamp)))
        return out

    def apply_item(
        self, item: EntityState, user_pre: EntityState, event: EventData
    ) -> tuple[EntityState, ItemOutput, EntityState]:
        """The item's owner applies ``event`` given the user's state just before it.

        Returns the item's post-state, its retrieval vector and the user's post-state
        embedding and time (the user's history is the user owner's business).
        """
        return self.apply_items([item], [user_pre], [event])[0]

    @torch.inference_mode()
    def apply_items(
        self, items: list[EntityState], users_pre: list[EntityState], events: list[EventData]
    ) -> list[tuple[EntityState, ItemOutput, EntityState]]:
        """``apply_item`` for events of distinct items at once."""
        ts = [e.timestamp for e in events]
        i_prev = self._dyns(items, self._i_init)
        u_prev = self._dyns(users_pre, self._u_init)
        f = self._features_of(events)
        di = self._deltas([i.last_time for i in items], ts, self._di)
        du = self._deltas([u.last_time for u in users_pre], ts, self._du)
        i_new = self.model.update_item(i_prev, u_prev, di, f).numpy()  # (B, d)
        u_new = self.model.update_user(u_prev, i_prev, du, f).numpy()  # (B, d), as the user side
        i_static = self._statics([e.item_id for e in events], self._item_static).numpy()
        out = []
        for b, (item, event) in enumerate(zip(items, events, strict=True)):
            emb = i_new[b].copy()
            vector = np.concatenate([emb, i_static[b]])
            user_post = EntityState(u_new[b].copy(), event.timestamp)
            out.append(
                (
                    replace(item, embedding=emb, last_time=event.timestamp),
                    ItemOutput(event, vector),
                    user_post,
                )
            )
        return out

    # -- adapters for operators.protocol.exchange --------------------------------------------
    def user_apply(
        self, known_item: Callable[[str], EntityState] | None = None
    ) -> Apply[EntityState, EntityState]:
        """``Inbox`` apply function of the user side (the pending payload is EventData).

        The previous item's state for the query: the event's own item pre-state when the user
        repeats it, else the post-state this side computed at the user's previous event, else
        (first event since the checkpoint) ``known_item`` of it.
        """

        def apply(
            state: EntityState,
            partner: EntityState,
            pending: Pending,
            previous: EntityState | None,
        ) -> tuple[EntityState, UserOutput, EntityState]:
            event: EventData = pending.payload
            last = _last_item(state, partner, event, previous, known_item)
            return self.apply_user(state, partner, event, last)

        return apply

    def user_apply_many(
        self, known_item: Callable[[str], EntityState] | None = None
    ) -> ApplyMany[EntityState, EntityState]:
        """The batched ``user_apply`` for ``operators.protocol.exchange.drive``."""

        def many(ready: list[Ready[EntityState, EntityState]]) -> list[tuple[Any, Any, Any]]:
            events = [r.event.payload for r in ready]
            lasts = [
                _last_item(r.state, r.partner, e, r.previous, known_item)
                for r, e in zip(ready, events, strict=True)
            ]
            return list(
                self.apply_users(
                    [r.state for r in ready], [r.partner for r in ready], events, lasts
                )
            )

        return many

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

        return many

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


def _last_item(
    user: EntityState,
    item_pre: EntityState,
    event: EventData,
    previous: EntityState | None,
    known_item: Callable[[str], EntityState] | None,
) -> EntityState | None:
    """The state of the user's previous item for the query before ``event``."""
    if not user.history:
        return None
    p = user.history[0]
    if p == event.item_id:
        return item_pre
    if previous is not None:
        return previous
    return known_item(p) if known_item is not None else None


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
        hist = tuple(self._item_ids[h] for h in self.users.history[row].tolist() if h >= 0)
        return EntityState(
            self.users.emb[row].numpy().copy(), float(self.users.last_time[row]), hist
        )

    def item(self, item_id: str) -> EntityState:
        row = self._item_rows.get(item_id)
        if row is None or np.isnan(self.items.last_time[row]):
            return NEW
        return EntityState(self.items.emb[row].numpy().copy(), float(self.items.last_time[row]))

    def item_vectors(self) -> tuple[list[str], np.ndarray]:
        """[i, ī] of every item the checkpoint has seen: the candidate index's first contents."""
        rows = [r for r in range(len(self._item_ids)) if not np.isnan(self.items.last_time[r])]
        ids = [self._item_ids[r] for r in rows]
        if not rows:
            return ids, np.zeros((0, 0), dtype=np.float32)
        dyn = self.items.emb[rows].numpy()
        return ids, np.concatenate([dyn, self.items.static[rows].numpy()], axis=1)

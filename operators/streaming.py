"""JODIE split across the two sides of the exchange: what a user owner and an item owner apply.

The streaming workers never see both states of an event in one place: the user's owner holds
u(t⁻) and receives i(t⁻) from the item's owner, and vice versa (operators.exchange). Both run
the very operators of ``operators.online`` (the frozen evaluation's sequential replay) on the
same float32 inputs, so a stream reproduces that replay:

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

import numpy as np
import torch
from torch import Tensor

from operators.checkpoint import Checkpoint
from operators.exchange import Apply, Pending
from operators.model import Jodie, standardise_delta
from operators.online import gap
from operators.static import static_embeddings

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

    @staticmethod
    def _delta(last: float, t: float, stats: tuple[float, float]) -> Tensor:
        return torch.from_numpy(standardise_delta(np.array([[gap(last, t)]]), *stats))  # (1, 1)

    def _dyn(self, state: EntityState, initial: Tensor) -> Tensor:
        if state.embedding is None or state.is_new:
            return initial
        return torch.from_numpy(np.asarray(state.embedding, dtype=np.float32)).reshape(1, -1)

    def _features(self, event: EventData) -> Tensor:
        if not event.features:
            return self._no_features
        return torch.tensor([event.features], dtype=torch.float32)  # (1, F)

    # -- the two sides ---------------------------------------------------------------------
    @torch.inference_mode()
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
        t = event.timestamp
        u_prev = self._dyn(user, self._u_init)
        i_prev = self._dyn(item_pre, self._i_init)
        f = self._features(event)
        du = self._delta(user.last_time, t, self._du)
        di = self._delta(item_pre.last_time, t, self._di)
        u_static = self._user_static(event.user_id)
        # The query as OnlineJodie.query makes it (no previous item: initial state, zero ī).
        if user.history:
            p_dyn = self._dyn(last_item or NEW, self._i_init)
            p_static = self._item_static(user.history[0])
        else:
            p_dyn, p_static = self._i_init, self._no_item_static
        query = self.model.predict(self.model.project(u_prev, du), u_static, p_dyn, p_static)
        true_vector = (
            None
            if item_pre.is_new
            else np.concatenate([i_prev.reshape(-1).numpy(), self.item_static(event.item_id)])
        )
        u_new = self.model.update_user(u_prev, i_prev, du, f)  # (1, d)
        i_new = self.model.update_item(i_prev, u_prev, di, f)  # (1, d), as the item side computes
        k = self.config.history_size
        history = (event.item_id, *[h for h in user.history if h != event.item_id])[:k] if k else ()
        horizon = torch.from_numpy(
            standardise_delta(np.array([[self.horizon_s]]), *self._du)
        )  # (1, 1)
        projected = self.model.project(u_new, horizon)  # (1, d)
        predicted = self.model.predict(
            projected, u_static, i_new, self._item_static(event.item_id)
        )  # (1, d + s_item)
        probability = None
        if self.model.state_head is not None:
            logits = self.model.state_change_logits(u_new)
            probability = float(torch.softmax(logits, dim=1)[0, 1])
        new_state = EntityState(u_new.reshape(-1).numpy().copy(), t, history)
        out = UserOutput(
            event=event,
            user=new_state.embedding,  # type: ignore[arg-type]
            projected=projected.reshape(-1).numpy().copy(),
            predicted=predicted.reshape(-1).numpy().copy(),
            history=history,
            state_change_probability=probability,
            query=query.reshape(-1).numpy().copy(),
            true_vector=true_vector,
        )
        item_post = EntityState(i_new.reshape(-1).numpy().copy(), t)
        return new_state, out, item_post

    @torch.inference_mode()
    def apply_item(
        self, item: EntityState, user_pre: EntityState, event: EventData
    ) -> tuple[EntityState, ItemOutput, EntityState]:
        """The item's owner applies ``event`` given the user's state just before it.

        Returns the item's post-state, its retrieval vector and the user's post-state
        embedding and time (the user's history is the user owner's business).
        """
        t = event.timestamp
        i_prev = self._dyn(item, self._i_init)
        u_prev = self._dyn(user_pre, self._u_init)
        f = self._features(event)
        di = self._delta(item.last_time, t, self._di)
        du = self._delta(user_pre.last_time, t, self._du)
        i_new = self.model.update_item(i_prev, u_prev, di, f)  # (1, d)
        u_new = self.model.update_user(u_prev, i_prev, du, f)  # (1, d), as the user side computes
        emb = i_new.reshape(-1).numpy().copy()
        vector = np.concatenate([emb, self.item_static(event.item_id)])
        user_post = EntityState(u_new.reshape(-1).numpy().copy(), t)
        return replace(item, embedding=emb, last_time=t), ItemOutput(event, vector), user_post

    # -- adapters for operators.exchange ----------------------------------------------------
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
            last: EntityState | None = None
            if state.history:
                p = state.history[0]
                if p == event.item_id:
                    last = partner
                elif previous is not None:
                    last = previous
                elif known_item is not None:
                    last = known_item(p)
            return self.apply_user(state, partner, event, last)

        return apply

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


class CheckpointStates:
    """A checkpoint's entity states by id, as the stream starts from them (converted on use)."""

    def __init__(self, ckpt: Checkpoint) -> None:
        self.users = ckpt.states.users
        self.items = ckpt.states.items
        self._user_rows = {u: r for r, u in enumerate(self.users.ids)}
        self._item_rows = {i: r for r, i in enumerate(self.items.ids)}
        self._item_ids = self.items.ids

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

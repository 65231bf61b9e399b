"""One-event-at-a-time JODIE over a ``States``: the sequential semantics the stream follows.

For an event (user u, item i, time t, features f), with every earlier event applied, the
kernel (``operators.model.kernel``) computes the query j̃ before the event (Δu = t −
last_time(u), 0 for a first event, standardised with the checkpoint's training statistics)
and both updates from the pre-event states; then u(t), i(t) and the last times are written
and i moves to the front of u's bounded history. The frozen evaluation, the scorer's fit and
the offline replay are this loop; the stream runs the same kernel on the same float32
inputs, so it reproduces their states.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from operators.model.jodie import Jodie, standardise_delta
from operators.model.kernel import feature_rows, query, step
from operators.model.state import States


@dataclass(frozen=True)
class Query:
    """What the model predicts for a user at time t, before the user's event is applied."""

    user_row: int
    u_proj: Tensor  # (1, d) projected user embedding û(t)
    pred: Tensor  # (1, d + s_item) predicted next-item embedding j̃ = [j̃_dyn, j̃_static]
    history: np.ndarray  # (K,) item rows, most recent first, -1 padded
    history_counts: np.ndarray  # (K,) the user's events on each history entry
    history_times: np.ndarray | None = None  # (K,) the user's last time on each entry
    habits: np.ndarray | None = None  # (4,) operators.model.state.HABITS
    events: int = 0  # the user's events before this one
    last_time: float = math.nan  # the user's previous event time


def gap(last_time: float, t: float) -> float:
    """Seconds since the entity's previous event; 0 for its first one."""
    return 0.0 if math.isnan(last_time) else t - last_time


class OnlineJodie:
    """Applies events one at a time to ``states`` with fixed weights (no autograd)."""

    def __init__(self, model: Jodie, states: States) -> None:
        self.model = model
        self.states = states
        cfg = model.config
        with torch.no_grad():
            self._u_init = model.initial_user().detach().unsqueeze(0)  # (1, d)
            self._i_init = model.initial_item().detach().unsqueeze(0)  # (1, d)
        self._no_static = torch.zeros(1, cfg.item_static_dim)
        self._no_features = torch.zeros(1, cfg.n_features)
        self._width = cfg.n_features
        self._du = (cfg.delta_user_mean, cfg.delta_user_std)
        self._di = (cfg.delta_item_mean, cfg.delta_item_std)

    def _delta(self, last: float, t: float, stats: tuple[float, float]) -> Tensor:
        return torch.from_numpy(standardise_delta(np.array([[gap(last, t)]]), *stats))  # (1, 1)

    def _user(self, row: int) -> Tensor:
        users = self.states.users
        return self._u_init if math.isnan(users._last_time[row]) else users._emb[row : row + 1]

    def _item(self, row: int) -> Tensor:
        items = self.states.items
        if row < 0 or math.isnan(items._last_time[row]):
            return self._i_init
        return items._emb[row : row + 1]

    @torch.inference_mode()
    def query(self, user_id: str, t: float) -> Query:
        """û and j̃ for ``user_id`` at time ``t`` (adds the user if unseen)."""
        users, items = self.states.users, self.states.items
        u = users.add(user_id)
        du = self._delta(float(users._last_time[u]), t, self._du)
        history = users._history[u].copy()
        counts = users._history_counts[u].copy()
        times = users._history_times[u].copy()
        habits = users._habits[u].copy()
        p = int(history[0]) if history.size else -1
        p_static = items._static[p : p + 1] if p >= 0 else self._no_static
        u_static = users._static[u : u + 1]
        u_proj, pred = query(self.model, self._user(u), du, u_static, self._item(p), p_static)
        return Query(
            u,
            u_proj,
            pred,
            history,
            counts,
            times,
            habits,
            int(users._count[u]),
            float(users._last_time[u]),
        )

    @torch.inference_mode()
    def observe(
        self, user_id: str, item_id: str, t: float, features: np.ndarray | None = None
    ) -> tuple[Tensor, Tensor]:
        """Apply one event; returns the new (u(t), i(t)), each (1, d). A quarantined event
        (``operators.model.kernel``) keeps both embeddings; its time and item still count."""
        users, items = self.states.users, self.states.items
        u = users.add(user_id)
        i = items.add(item_id)
        f, admitted = (
            feature_rows([np.asarray(features, dtype=np.float32).reshape(-1)], self._width)
            if features is not None and np.size(features)
            else (self._no_features, None)
        )
        du = self._delta(float(users._last_time[u]), t, self._du)
        di = self._delta(float(items._last_time[i]), t, self._di)
        out = step(self.model, self._user(u), self._item(i), du, di, f, admitted=admitted)
        u_new, i_new = out.user, out.item
        users.update_one(u, u_new, t, item=i)
        items.update_one(i, i_new, t)
        return u_new, i_new

"""Per-event model inputs of a log: entity rows, raw time gaps, the user's previous item."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from operators.dataset import InteractionLog
from operators.model.config import ModelConfig
from operators.model.jodie import standardise_delta
from operators.model.state import States


@dataclass(frozen=True)
class EncodedEvents:
    """Columns of N time-ordered events, ready for the batched operators."""

    user_rows: np.ndarray  # (N,) int64
    item_rows: np.ndarray  # (N,) int64
    prev_item: np.ndarray  # (N,) int64, the user's previous item row, -1 if none
    timestamps: np.ndarray  # (N,) float64
    gap_user: np.ndarray  # (N,) float64 seconds since the user's previous event (0 if none)
    gap_item: np.ndarray  # (N,) float64 seconds since the item's previous event (0 if none)
    features: np.ndarray  # (N, F) float32
    labels: np.ndarray  # (N,) int8

    def __len__(self) -> int:
        return int(self.timestamps.shape[0])

    def take(self, index: np.ndarray) -> EncodedEvents:
        return EncodedEvents(
            self.user_rows[index],
            self.item_rows[index],
            self.prev_item[index],
            self.timestamps[index],
            self.gap_user[index],
            self.gap_item[index],
            self.features[index],
            self.labels[index],
        )


@dataclass(frozen=True)
class EventTensors:
    """The float inputs of EncodedEvents as torch tensors (shared memory, no copy per batch)."""

    delta_user: Tensor  # (N, 1) float32, standardised
    delta_item: Tensor  # (N, 1) float32, standardised
    features: Tensor  # (N, F) float32
    labels: Tensor  # (N,) int64

    @classmethod
    def of(cls, ev: EncodedEvents, config: ModelConfig) -> EventTensors:
        du = standardise_delta(ev.gap_user, config.delta_user_mean, config.delta_user_std)
        di = standardise_delta(ev.gap_item, config.delta_item_mean, config.delta_item_std)
        return cls(
            torch.from_numpy(du).reshape(-1, 1),
            torch.from_numpy(di).reshape(-1, 1),
            torch.from_numpy(np.ascontiguousarray(ev.features, dtype=np.float32)),
            torch.from_numpy(ev.labels.astype(np.int64)),
        )


def _previous(rows: np.ndarray, values: np.ndarray, before: np.ndarray) -> np.ndarray:
    """For each event, ``values`` of the same entity's previous event, ``before[row]`` if first."""
    order = np.argsort(rows, kind="stable")  # groups by entity, time order kept inside
    r = rows[order]
    v = values[order]
    prev = np.empty_like(v)
    prev[1:] = v[:-1]
    first = np.r_[True, r[1:] != r[:-1]] if r.size else np.zeros(0, dtype=bool)
    prev[first] = before[r[first]]
    out = np.empty_like(prev)
    out[order] = prev
    return out


def encode(log: InteractionLog, states: States) -> EncodedEvents:
    """Encode ``log`` as it follows the events already in ``states`` (adds unseen ids as rows)."""
    users = states.users.encode(log.user_ids)
    items = states.items.encode(log.item_ids)
    t = log.timestamps
    last_u = states.users.last_time
    last_i = states.items.last_time
    gap_u = t - _previous(users, t, last_u)
    gap_i = t - _previous(items, t, last_i)
    gap_u[np.isnan(gap_u)] = 0.0  # first event of an entity: Δ = 0 (no start-of-data clock)
    gap_i[np.isnan(gap_i)] = 0.0
    hist = states.users.history
    last_item = hist[:, 0] if hist.shape[1] else np.full(len(states.users), -1, dtype=np.int64)
    prev_item = _previous(users, items, last_item)
    features = log.features
    if features.shape[0] != len(log):  # an empty log has a (0, 0) feature block
        features = np.zeros((len(log), 0), dtype=np.float32)
    return EncodedEvents(
        users, items, prev_item, t, gap_u, gap_i, features, log.state_labels.copy()
    )

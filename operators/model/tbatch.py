"""t-batch (JODIE paper, Algorithm 1): parallel batches that reproduce sequential processing.

Within a timespan, an event goes to batch ``max(last batch of its user, last batch of its
item) + 1``; spans are chained so a span's batches all come after the previous span's. Each
user and each item then appears at most once per batch, and each entity's events keep their
time order across batches, so applying the batches in order gives the sequential result.
Unlike the reference, the events after the last span boundary are batched too.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TBatches:
    """Events grouped into t-batches.

    ``order`` lists event indices batch by batch (time order inside a batch); batch b is
    ``order[bounds[b]:bounds[b + 1]]`` and belongs to span ``batch_span[b]``. The spans'
    batches are ``span_bounds[s]:span_bounds[s + 1]`` (indices into batches).
    """

    order: np.ndarray  # (N,) int64
    bounds: np.ndarray  # (n_batches + 1,) int64
    batch_span: np.ndarray  # (n_batches,) int64
    span_bounds: np.ndarray  # (n_spans + 1,) int64

    @property
    def n_batches(self) -> int:
        return int(self.bounds.shape[0] - 1)

    @property
    def n_spans(self) -> int:
        return int(self.span_bounds.shape[0] - 1)


def span_ids(timestamps: np.ndarray, timespan: float) -> np.ndarray:
    """Span of each event (N,) → (N,) int64, by the reference's rule.

    A span starts at its first event and closes once an event is more than ``timespan``
    seconds after that start; that event opens the next span.
    """
    out = np.zeros(timestamps.shape[0], dtype=np.int64)
    if timestamps.size == 0 or timespan <= 0:
        return out
    span, start = 0, float(timestamps[0])
    for k, t in enumerate(timestamps.tolist()):  # one pass over N floats
        if t - start > timespan:
            span += 1
            start = t
        out[k] = span
    return out


def default_timespan(timestamps: np.ndarray, n_spans: int = 500) -> float:
    """The paper's timespan: (t_last − t_first) / n_spans."""
    if timestamps.size == 0:
        return 0.0
    return float(timestamps[-1] - timestamps[0]) / n_spans


def assign_batches(user_rows: np.ndarray, item_rows: np.ndarray, spans: np.ndarray) -> np.ndarray:
    """Global batch id of each event (N,) → (N,) int64, given time-ordered events and spans."""
    n = user_rows.shape[0]
    out = np.empty(n, dtype=np.int64)
    if n == 0:
        return out
    last_user = np.full(int(user_rows.max()) + 1, -1, dtype=np.int64).tolist()
    last_item = np.full(int(item_rows.max()) + 1, -1, dtype=np.int64).tolist()
    span_floor = -1  # every batch of a new span comes after every batch of the previous ones
    top = -1
    current_span = int(spans[0])
    for k, (u, i, s) in enumerate(
        zip(user_rows.tolist(), item_rows.tolist(), spans.tolist(), strict=True)
    ):  # the single O(N) pass
        if s != current_span:
            current_span = s
            span_floor = top
        b = max(last_user[u], last_item[i], span_floor) + 1
        last_user[u] = b
        last_item[i] = b
        if b > top:
            top = b
        out[k] = b
    return out


def _run_starts(values: np.ndarray) -> np.ndarray:
    """Indices where a run of equal values starts in a sorted array (N,) → (R,) int64."""
    if values.size == 0:
        return np.zeros(0, dtype=np.int64)
    return np.flatnonzero(np.r_[True, values[1:] != values[:-1]]).astype(np.int64)


def group(batch_ids: np.ndarray, spans: np.ndarray) -> TBatches:
    """Group events by batch id with one stable argsort (time order kept inside batches)."""
    order = np.argsort(batch_ids, kind="stable").astype(np.int64)
    sorted_ids = batch_ids[order]
    starts = _run_starts(sorted_ids)
    bounds = np.r_[starts, order.size].astype(np.int64)
    batch_span = spans[order[starts]].astype(np.int64)
    span_bounds = np.r_[_run_starts(batch_span), batch_span.size].astype(np.int64)
    return TBatches(order, bounds, batch_span, span_bounds)


def tbatch(
    user_rows: np.ndarray, item_rows: np.ndarray, timestamps: np.ndarray, timespan: float
) -> TBatches:
    """t-batches of time-ordered events (N,) given entity rows and the span length in seconds."""
    spans = span_ids(timestamps, timespan)
    return group(assign_batches(user_rows, item_rows, spans), spans)

"""What a scorer may read of one user at a query (``operators.evaluation.scorer``)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class UserContext:
    """The per-user bounded state a scorer may read, at the query's time ``now``.

    ``history`` and ``counts`` are all the history scorer reads; the learned ranker
    (``operators.evaluation.ranker``) also reads the entries' last times, the user's habits
    (``operators.model.state.HABITS``), event count and last event time. A caller that does
    not know them leaves the defaults, and the ranker then scores without those terms.
    """

    history: np.ndarray  # (K,) item rows, most recent first, -1 padded
    counts: np.ndarray  # (K,) the user's events on each history entry
    times: np.ndarray | None = None  # (K,) the user's last event time on each entry, NaN pad
    habits: np.ndarray | None = None  # (4,) operators.model.state.HABITS
    events: int = 0  # the user's events so far
    last_time: float = math.nan  # the user's last event time, NaN before the first
    now: float = math.nan  # the time of the query

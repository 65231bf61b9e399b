"""Shared builders for the operators tests: tiny interaction logs and tiny models."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pytest
import torch

from operators.dataset import InteractionLog
from operators.model.config import ModelConfig
from operators.model.jodie import Jodie

LogFactory = Callable[..., InteractionLog]


def build_log(
    users: Sequence[str],
    items: Sequence[str],
    times: Sequence[float],
    labels: Sequence[int] | None = None,
    features: np.ndarray | None = None,
) -> InteractionLog:
    n = len(users)
    return InteractionLog(
        user_ids=np.asarray(users, dtype=str),
        item_ids=np.asarray(items, dtype=str),
        timestamps=np.asarray(times, dtype=np.float64),
        state_labels=np.asarray(labels if labels is not None else [0] * n, dtype=np.int8),
        features=features if features is not None else np.zeros((n, 0), dtype=np.float32),
        lines=np.arange(2, n + 2, dtype=np.int64),
    )


@pytest.fixture
def make_log() -> LogFactory:
    return build_log


def tiny_config(**changes: object) -> ModelConfig:
    base = ModelConfig(
        embedding_dim=8,
        user_static_dim=8,
        item_static_dim=8,
        state_change_hidden=4,
        history_size=4,
    )
    return base.with_(**changes)


@pytest.fixture
def tiny_model() -> Jodie:
    torch.manual_seed(0)
    return Jodie(tiny_config()).eval()

"""Training: a tiny model learns planted dynamics that the recency baseline cannot follow."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from operators.evaluation.baselines import baseline_ranks
from operators.evaluation.metrics import mrr
from operators.evaluation.protocols import evaluate
from operators.model.config import TrainConfig
from operators.training.trainer import train
from tests.operators.conftest import build_log, tiny_config


def planted_stream(n_events: int = 2400, n_users: int = 20, n_items: int = 10, seed: int = 0):
    """Every user walks the items in a fixed cycle (k → k + 1 mod n) with 10% random jumps.

    The next item is never the last one, so "the user's most recent item first" is wrong
    on nearly every event, while the successor is a function of the previous item.
    """
    rng = np.random.default_rng(seed)
    last = rng.integers(n_items, size=n_users)
    users, items = [], []
    for _ in range(n_events):
        u = int(rng.integers(n_users))
        nxt = (last[u] + 1) % n_items if rng.uniform() < 0.9 else int(rng.integers(n_items))
        last[u] = nxt
        users.append(f"user{u}")
        items.append(f"item{nxt}")
    times = np.cumsum(rng.exponential(10.0, size=n_events))
    return build_log(users, items, times)


@pytest.mark.slow
def test_tiny_model_beats_most_recent_item_baseline() -> None:
    log = planted_stream()
    config = TrainConfig(
        epochs=6,
        seed=0,
        n_spans=60,
        progress=False,
        lr=5e-3,
        model=tiny_config(
            embedding_dim=16,
            user_static_dim=16,
            item_static_dim=16,
            scorer="plain",
            state_change=False,
        ),
    )
    result = train(log, config)
    bounds = {k: result.split.bounds(k) for k in ("train", "valid", "test")}
    model_eval = evaluate(result.model, result.states.copy(), log, bounds, "frozen", "test")
    recency = baseline_ranks(log, *bounds["test"], "recency")
    assert mrr(recency) < 0.45
    assert model_eval.summary()["mrr"] > mrr(recency) + 0.2
    # deterministic for a seed
    again = train(log, config)
    for k, v in result.model.state_dict().items():
        assert torch.equal(again.model.state_dict()[k], v), k

"""Evaluation protocols: open-world ranks, exact frozen replay, limits, paper training."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from operators.evaluation.protocols import evaluate, event_categories, frozen_replay
from operators.evaluation.scorer import PlainScorer
from operators.model.config import TrainConfig
from operators.model.events import encode
from operators.model.jodie import Jodie
from operators.model.kernel import batched, replay
from operators.model.online import OnlineJodie
from operators.model.state import States
from tests.operators.conftest import build_log, tiny_config

# 8 training events, 2 valid, 3 test; the test has an unseen user (u9) and an unseen item (z)
USERS = ["a", "b", "a", "c", "b", "a", "c", "b", "a", "c", "u9", "a", "b"]
ITEMS = ["x", "y", "y", "x", "w", "x", "y", "w", "y", "w", "x", "z", "y"]
BOUNDS = {"train": (0, 8), "valid": (8, 10), "test": (10, 13)}


def _trained_states(model: Jodie) -> tuple[States, object]:
    log = build_log(USERS, ITEMS, np.arange(len(USERS), dtype=float) * 10)
    states = States.empty(8, 8, 8, 4)
    replay(model, states, batched(encode(log.slice(0, 8), states), model.config, 20.0))
    return states, log


def test_unseen_user_and_item_at_evaluation_time(tiny_model: Jodie) -> None:
    states, log = _trained_states(tiny_model)
    n_known_items = len(states.items)  # x, y, w
    result = evaluate(tiny_model, states, log, BOUNDS, "frozen", "test")
    assert result.n_events == 3
    assert 1 <= result.ranks[0] <= n_known_items  # the new user u9 is ranked at once
    assert result.ranks[1] == n_known_items + 1  # item z was never seen: n_known + 1
    assert states.users.row("u9") is not None and states.items.row("z") is not None
    assert not np.isnan(states.users.last_time[states.users.row("u9")])


def test_frozen_is_the_exact_sequential_replay(tiny_model: Jodie) -> None:
    states, log = _trained_states(tiny_model)
    reference = states.copy()
    result = evaluate(tiny_model, states, log, BOUNDS, "frozen", "test")
    online = OnlineJodie(tiny_model, reference)
    items = reference.items
    ranks = []
    for k in range(8, 13):
        q = online.query(USERS[k], 10.0 * k)
        row = items.row(ITEMS[k])
        if k >= 10:
            pred = q.pred[0]
            d2 = ((items.emb - pred[:8]) ** 2).sum(1) + ((items.static - pred[8:]) ** 2).sum(1)
            ranks.append(len(items) + 1 if row is None else 1 + int((d2 < d2[row]).sum()))
        online.observe(USERS[k], ITEMS[k], 10.0 * k)
    assert result.ranks.tolist() == ranks
    assert torch.equal(states.users.emb, reference.users.emb)
    assert torch.equal(states.items.emb, reference.items.emb)


def test_limit_scores_a_prefix_of_the_split(tiny_model: Jodie) -> None:
    states, log = _trained_states(tiny_model)
    full = evaluate(tiny_model, states.copy(), log, BOUNDS, "frozen", "test")
    head = evaluate(tiny_model, states.copy(), log, BOUNDS, "frozen", "test", limit=2)
    assert head.n_events == 2 and head.ranks.tolist() == full.ranks[:2].tolist()
    valid = evaluate(tiny_model, states.copy(), log, BOUNDS, "frozen", "valid")
    assert valid.n_events == 2


def test_paper_protocol_trains_the_weights_on_the_stream(tiny_model: Jodie) -> None:
    states, log = _trained_states(tiny_model)
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    result = evaluate(
        tiny_model, states, log, BOUNDS, "paper", "test", PlainScorer(), None, TrainConfig(), 15.0
    )
    assert result.n_events == 3 and result.ranks[1] == 4
    changed = [k for k, v in tiny_model.state_dict().items() if not torch.equal(v, before[k])]
    assert "prediction.weight" in changed and "user_rnn.weight_hh" in changed


def test_frozen_replay_reports_state_change_probabilities(tiny_model: Jodie) -> None:
    states, log = _trained_states(tiny_model)
    ranks, probs = frozen_replay(tiny_model, states, log.slice(8, 13), PlainScorer(), skip=1)
    assert ranks.shape == (4,) and probs is not None and np.all((probs > 0) & (probs < 1))


def test_event_categories() -> None:
    log = build_log(["a", "a", "a", "a", "b"], ["x", "x", "y", "x", "x"], [0, 1, 2, 3, 4])
    cats = event_categories(log, 1, 5).tolist()
    assert cats == ["repeat_last", "new_for_user", "repeat_older", "new_for_user"]


@pytest.mark.parametrize("protocol", ["frozen", "paper"])
def test_empty_split_is_fine(tiny_model: Jodie, protocol: str) -> None:
    states, log = _trained_states(tiny_model)
    bounds = {"train": (0, 8), "valid": (8, 10), "test": (10, 10)}
    result = evaluate(
        tiny_model,
        states,
        log.slice(0, 10),
        bounds,
        protocol,
        "test",
        PlainScorer(),
        None,
        TrainConfig(),
        15.0,
    )  # type: ignore[arg-type]
    assert result.n_events == 0


def test_model_with_features(make_log) -> None:
    torch.manual_seed(0)
    model = Jodie(tiny_config(n_features=3)).eval()
    feats = np.random.default_rng(0).normal(size=(13, 3)).astype(np.float32)
    log = build_log(USERS, ITEMS, np.arange(13, dtype=float), features=feats)
    states = States.empty(8, 8, 8, 4)
    replay(model, states, batched(encode(log.slice(0, 8), states), model.config, 3.0))
    result = evaluate(model, states, log, BOUNDS, "frozen", "valid")
    assert result.n_events == 2

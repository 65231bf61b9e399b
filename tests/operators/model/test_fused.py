"""The trainer's fused pass computes what the t-batch kernel's step-by-step pass computes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from operators.dataset import InteractionLog
from operators.model.events import EventTensors, encode
from operators.model.fused import TrainPlan, _latest_before, train_spans
from operators.model.jodie import Jodie
from operators.model.kernel import batched, run_spans
from operators.model.state import States
from operators.model.tbatch import default_timespan
from tests.operators.conftest import build_log, tiny_config


@st.composite
def logs_with_history(draw: st.DrawFn) -> tuple[InteractionLog, int, int, np.ndarray]:
    """A log with 3 features and state labels, a prefix replayed before training (so some
    entities start from stored states, others are fresh), and a number of spans."""
    n = draw(st.integers(2, 70))
    users = draw(st.lists(st.integers(0, 6), min_size=n, max_size=n))
    items = draw(st.lists(st.integers(0, 5), min_size=n, max_size=n))
    steps = draw(st.lists(st.integers(0, 3), min_size=n, max_size=n))  # 0 gives equal times
    labels = draw(st.lists(st.integers(0, 1), min_size=n, max_size=n))
    features = np.random.default_rng(draw(st.integers(0, 99))).normal(size=(n, 3))
    log = build_log(
        [f"u{u}" for u in users],
        [f"i{i}" for i in items],
        np.cumsum(steps).astype(float),
        labels,
        features.astype(np.float32),
    )
    prefix = draw(st.integers(0, n - 1))
    return log, prefix, draw(st.integers(1, 6)), np.asarray(labels)


def _training_pass(case, fused: bool) -> tuple[list[float], dict[str, torch.Tensor], States]:
    log, prefix, n_spans, labels = case
    torch.manual_seed(3)
    model = Jodie(tiny_config(n_features=3, delta_user_std=2.0, delta_item_std=2.0))
    states = States.empty(8, 8, 8, 4)
    ev = encode(log, states)
    before = ev.take(np.arange(prefix))
    if prefix:  # states from earlier events, without gradients
        run_spans(
            model,
            states,
            before,
            EventTensors.of(before, model.config),
            np.arange(prefix + 1),
            np.array([0, prefix]),
            None,
        )
    rest = ev.take(np.arange(prefix, len(ev)))
    data = batched(rest, model.config, default_timespan(rest.timestamps, n_spans))
    losses: list[float] = []
    weight = torch.tensor([1.0, 3.0]) if labels.any() else None
    args = (
        model,
        states,
        data.ev,
        data.evt,
        data.tb.bounds,
        data.tb.span_bounds,
        torch.optim.SGD(model.parameters(), lr=0.05),
    )
    record = lambda _s, value: losses.append(value)  # noqa: E731
    if fused:
        plan = TrainPlan.of(data.ev, data.evt, data.tb.bounds)
        train_spans(*args, plan, weight, on_span=record)
    else:
        run_spans(*args, weight, on_span=record)
    return losses, model.state_dict(), states


@settings(max_examples=60, deadline=None)
@given(logs_with_history())
def test_the_fused_training_pass_equals_the_step_by_step_one(case) -> None:
    """Same span losses, same weights after every optimizer step, same states and histories,
    whether entities start fresh, from stored states or from earlier t-batches of the span."""
    losses_a, weights_a, states_a = _training_pass(case, fused=False)
    losses_b, weights_b, states_b = _training_pass(case, fused=True)
    np.testing.assert_allclose(losses_b, losses_a, rtol=1e-5, atol=1e-6)
    for name, value in weights_a.items():
        torch.testing.assert_close(weights_b[name], value, atol=1e-5, rtol=1e-5, msg=name)
    for side in ("users", "items"):
        a, b = getattr(states_a, side), getattr(states_b, side)
        torch.testing.assert_close(b.emb, a.emb, atol=1e-5, rtol=0)
        np.testing.assert_array_equal(b.last_time, a.last_time)
        np.testing.assert_array_equal(b.count, a.count)
    np.testing.assert_array_equal(states_b.users.history, states_a.users.history)


@pytest.mark.parametrize(
    ("rows", "queries", "before", "expected"),
    [
        # entity 1's events are 1 and 3: before 3 → 1, before 4 → 3, before 1 → none
        ([0, 1, 0, 1], [1, 1, 1, 0, -1], [3, 4, 1, 2, 4], [1, 3, -1, 0, -1]),
        ([2, 2], [0, 2], [2, 0], [-1, -1]),
    ],
)
def test_latest_before(rows, queries, before, expected) -> None:
    got = _latest_before(np.array(rows), np.array(queries), np.array(before))
    np.testing.assert_array_equal(got, expected)

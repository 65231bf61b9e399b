"""t-batch properties (hypothesis): exclusivity, per-entity order, sequential-equal states."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from operators.dataset import InteractionLog
from operators.model.events import EventTensors, encode
from operators.model.fused import TrainPlan, train_spans
from operators.model.jodie import Jodie
from operators.model.kernel import batched, run_spans
from operators.model.online import OnlineJodie
from operators.model.state import States
from operators.model.tbatch import default_timespan, span_ids, tbatch
from tests.operators.conftest import build_log, tiny_config


@st.composite
def event_logs(draw: st.DrawFn) -> tuple[InteractionLog, int]:
    n = draw(st.integers(1, 60))
    users = draw(st.lists(st.integers(0, 6), min_size=n, max_size=n))
    items = draw(st.lists(st.integers(0, 5), min_size=n, max_size=n))
    steps = draw(st.lists(st.integers(0, 3), min_size=n, max_size=n))  # 0 gives equal times
    times = np.cumsum(steps).astype(float)
    n_spans = draw(st.integers(1, 6))
    log = build_log([f"u{u}" for u in users], [f"i{i}" for i in items], times)
    return log, n_spans


def _batches(log: InteractionLog, n_spans: int):
    states = States.empty(8, 8, 8, 4)
    ev = encode(log, states)
    return ev, tbatch(
        ev.user_rows, ev.item_rows, ev.timestamps, default_timespan(ev.timestamps, n_spans)
    )


@settings(max_examples=150, deadline=None)
@given(event_logs())
def test_every_event_once_and_each_entity_at_most_once_per_batch(case) -> None:
    log, n_spans = case
    ev, tb = _batches(log, n_spans)
    assert sorted(tb.order.tolist()) == list(range(len(log)))  # nothing dropped or doubled
    for b in range(tb.n_batches):
        idx = tb.order[tb.bounds[b] : tb.bounds[b + 1]]
        assert len(set(ev.user_rows[idx].tolist())) == idx.size
        assert len(set(ev.item_rows[idx].tolist())) == idx.size
        assert np.all(np.diff(idx) > 0)  # time order inside a batch


@settings(max_examples=150, deadline=None)
@given(event_logs())
def test_entity_events_keep_time_order_and_spans_stay_ordered(case) -> None:
    log, n_spans = case
    ev, tb = _batches(log, n_spans)
    batch_of = np.empty(len(log), dtype=np.int64)
    for b in range(tb.n_batches):
        batch_of[tb.order[tb.bounds[b] : tb.bounds[b + 1]]] = b
    for rows in (ev.user_rows, ev.item_rows):
        for r in np.unique(rows):
            assert np.all(np.diff(batch_of[rows == r]) > 0)
    spans = span_ids(ev.timestamps, default_timespan(ev.timestamps, n_spans))
    assert np.all(np.diff(spans[tb.order]) >= 0)  # spans are processed one after another
    assert np.all(np.diff(tb.batch_span) >= 0)


def test_events_after_the_last_boundary_are_batched() -> None:
    times = np.array([0.0, 1.0, 2.0, 10.0, 10.0])
    spans = span_ids(times, default_timespan(times, 2))
    assert spans.tolist() == [0, 0, 0, 1, 1]
    tb = tbatch(np.array([0, 0, 1, 0, 1]), np.array([0, 1, 1, 2, 0]), times, 5.0)
    assert tb.order.size == 5 and tb.n_spans == 2


@settings(max_examples=40, deadline=None)
@given(event_logs())
def test_tbatch_replay_equals_sequential_processing(case) -> None:
    log, n_spans = case
    torch.manual_seed(1)
    model = Jodie(tiny_config()).eval()
    cfg = model.config.with_(delta_user_std=3.0, delta_item_std=2.0, delta_user_mean=1.0)
    model.config = cfg
    # sequential, one event at a time, as the stream does
    seq = States.empty(8, 8, 8, 4)
    online = OnlineJodie(model, seq)
    for u, i, t in zip(
        log.user_ids.tolist(), log.item_ids.tolist(), log.timestamps.tolist(), strict=True
    ):
        online.observe(u, i, t)
    # t-batches
    par = States.empty(8, 8, 8, 4)
    ev = encode(log, par)
    tb = tbatch(ev.user_rows, ev.item_rows, ev.timestamps, default_timespan(ev.timestamps, n_spans))
    ordered = ev.take(tb.order)
    run_spans(model, par, ordered, EventTensors.of(ordered, cfg), tb.bounds, tb.span_bounds, None)
    assert seq.users.ids == par.users.ids and seq.items.ids == par.items.ids
    torch.testing.assert_close(par.users.emb, seq.users.emb, atol=1e-5, rtol=0)
    torch.testing.assert_close(par.items.emb, seq.items.emb, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(par.users.last_time, seq.users.last_time)
    np.testing.assert_array_equal(par.users.history, seq.users.history)
    np.testing.assert_array_equal(par.users.history_counts, seq.users.history_counts)
    np.testing.assert_array_equal(par.items.count, seq.items.count)


@settings(max_examples=30, deadline=None)
@given(event_logs())
def test_a_training_pass_without_bookkeeping_learns_and_queries_alike(case) -> None:
    """The trainer's epochs skip the histories, habits and trends (only scorers read them):
    the loss, the weights, the states and what the next query reads (last time, last item,
    count) are bitwise those of a pass that keeps them."""
    log, n_spans = case
    runs = []
    for bookkeeping in (True, False):
        torch.manual_seed(1)
        model = Jodie(tiny_config())
        states = States.empty(8, 8, 8, 4)
        ev = encode(log, states)
        data = batched(ev, model.config, default_timespan(ev.timestamps, n_spans))
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        loss = train_spans(  # the trainer's pass
            model,
            states,
            data.ev,
            data.evt,
            data.tb.bounds,
            data.tb.span_bounds,
            optimizer,
            TrainPlan.of(data.ev, data.evt, data.tb.bounds),
            bookkeeping=bookkeeping,
        )
        runs.append((loss, model.state_dict(), states))
    (loss_a, weights_a, kept), (loss_b, weights_b, light) = runs
    assert loss_a == loss_b
    for name, value in weights_a.items():
        assert torch.equal(value, weights_b[name]), name
    assert torch.equal(kept.users.emb, light.users.emb)
    assert torch.equal(kept.items.emb, light.items.emb)
    np.testing.assert_array_equal(kept.users.last_time, light.users.last_time)
    np.testing.assert_array_equal(kept.items.last_time, light.items.last_time)
    np.testing.assert_array_equal(kept.users.history[:, 0], light.users.history[:, 0])
    np.testing.assert_array_equal(kept.items.count, light.items.count)
    np.testing.assert_array_equal(kept.users.count, light.users.count)

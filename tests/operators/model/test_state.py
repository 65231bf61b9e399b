"""Entity stores: row assignment, growth, history, lifecycle."""

import numpy as np
import pytest
import torch

from operators.model.kernel import read_states
from operators.model.state import (
    EntityStore,
    States,
    next_habits,
    push_history,
    push_history_times,
)


def test_encode_assigns_rows_in_first_appearance_order() -> None:
    store = EntityStore("user", 4, 4)
    rows = store.encode(np.array(["b", "a", "b", "c"]))
    assert rows.tolist() == [0, 1, 0, 2]
    assert store.ids == ["b", "a", "c"]
    assert store.encode(np.array(["c", "d"])).tolist() == [2, 3]
    assert store.row("zzz") is None and store.add("zzz") == 4


def test_growth_keeps_existing_rows() -> None:
    store = EntityStore("item", 3, 2)
    store.encode(np.array(["x"]))
    store.update(np.array([0]), torch.tensor([[1.0, 2.0, 3.0]]), np.array([5.0]))
    store.encode(np.array([str(k) for k in range(500)]))
    assert len(store) == 501
    torch.testing.assert_close(store.emb[0], torch.tensor([1.0, 2.0, 3.0]))
    assert store.last_time[0] == 5.0 and np.isnan(store.last_time[1])


def test_push_history_moves_item_to_front_and_keeps_distinct() -> None:
    hist = np.array([[3, 1, 2, -1], [5, 6, 7, 8], [-1, -1, -1, -1]])
    counts = np.array([[1, 4, 2, 0], [1, 1, 1, 9], [0, 0, 0, 0]])
    out, out_counts = push_history(hist, counts, np.array([2, 9, 4]))
    assert out.tolist() == [[2, 3, 1, -1], [9, 5, 6, 7], [4, -1, -1, -1]]
    # item 2 had 2 events → 3; the evicted item 8 takes its count with it
    assert out_counts.tolist() == [[3, 1, 4, 0], [1, 1, 1, 1], [1, 0, 0, 0]]


def test_reset_makes_every_row_fresh_and_keeps_ids() -> None:
    states = States.empty(2, 2, 2, 3)
    states.users.encode(np.array(["u"]))
    states.users.update(np.array([0]), torch.ones(1, 2), np.array([1.0]), items=np.array([7]))
    assert not states.users.fresh(np.array([0]))[0]
    states.reset()
    assert states.users.fresh(np.array([0]))[0]
    assert states.users.history[0].tolist() == [-1, -1, -1]
    assert states.users.ids == ["u"]
    init = torch.tensor([0.6, 0.8])
    torch.testing.assert_close(
        read_states(states.users, np.array([0]), initial=init), init.unsqueeze(0)
    )


def test_update_one_matches_batched_update() -> None:
    a = EntityStore("user", 2, 2, 3)
    b = EntityStore("user", 2, 2, 3)
    for store in (a, b):
        store.encode(np.array(["u", "v"]))
    events = [(0, 5, 1.0), (0, 6, 2.0), (1, 5, 2.5), (0, 5, 3.0), (0, 7, 4.0), (0, 8, 5.0)]
    for row, item, t in events:
        emb = torch.tensor([[t, -t]])
        a.update(np.array([row]), emb, np.array([t]), items=np.array([item]))
        b.update_one(row, emb, t, item=item)
    assert torch.equal(a.emb, b.emb)
    np.testing.assert_array_equal(a.history, b.history)
    assert b.history[0].tolist() == [8, 7, 5]
    assert b.history_counts[0].tolist() == [1, 1, 2]
    np.testing.assert_array_equal(a.history_counts, b.history_counts)
    np.testing.assert_array_equal(a.count, b.count)
    assert b.count.tolist() == [5, 1]
    np.testing.assert_allclose(a._trend, b._trend)
    # decayed count of u at t = 5: events at 1, 2, 3, 4, 5 with a one-day time constant
    expected = sum(np.exp(-(5.0 - t) / 86400.0) for t in (1.0, 2.0, 3.0, 4.0, 5.0))
    assert b.trend_at(5.0)[0] == pytest.approx(expected)
    assert b.trend_at(5.0 + 86400.0)[0] == pytest.approx(expected / np.e)
    np.testing.assert_array_equal(a.last_time, b.last_time)


def test_history_times_and_habits_by_hand_batched_or_one_by_one() -> None:
    a = EntityStore("user", 2, 2, 3)
    b = EntityStore("user", 2, 2, 3)
    for store in (a, b):
        store.encode(np.array(["u"]))
    for item, t in ((5, 1.0), (6, 2.0), (6, 4.0), (5, 8.0)):
        emb = torch.tensor([[t, -t]])
        a.update(np.array([0]), emb, np.array([t]), items=np.array([item]))
        b.update_one(0, emb, t, item=item)
    np.testing.assert_array_equal(a.history_times, b.history_times)
    np.testing.assert_array_equal(a.habits, b.habits)
    assert b.history[0].tolist() == [5, 6, -1]
    np.testing.assert_array_equal(b.history_times[0], [8.0, 4.0, np.nan])
    # repeats: the second 6; news: 5 and 6 (5 was still in the history when it came back);
    # run: 1 (5 after 6); mean log gap over the gaps 1, 2, 4 (a window of 20 averages all)
    log_gap = np.mean(np.log1p([1.0, 2.0, 4.0]))
    np.testing.assert_allclose(b.habits[0], [1.0, 2.0, 1.0, log_gap])


def test_states_saved_before_the_ranker_state_say_what_they_miss() -> None:
    states = States.empty(2, 2, 2, 3)
    states.users.encode(np.array(["u"]))
    states.users.update(np.array([0]), torch.ones(1, 2), np.array([1.0]), items=np.array([7]))
    tensors = states.users.tensors("user")
    full = EntityStore.from_tensors("user", ["u"], tensors, "user", 2)
    assert full.missing == ()
    np.testing.assert_array_equal(full.history_times, states.users.history_times)
    old = {k: v for k, v in tensors.items() if not k.endswith(("history_times", "habits"))}
    loaded = EntityStore.from_tensors("user", ["u"], old, "user", 2)
    assert loaded.missing == ("history_times", "habits")
    assert loaded.history[0].tolist() == [7, -1, -1] and np.isnan(loaded.history_times).all()


def test_habits_and_times_from_ids_equal_those_from_rows() -> None:
    rows = np.array([[3, 1, -1]])
    ids = np.array([["c", "a", ""]], dtype=object)
    habits = np.array([[2.0, 1.0, 3.0, 0.5]])
    for item, label in ((3, "c"), (1, "a"), (9, "z")):
        by_row = next_habits(habits, rows, np.array([item]), np.array([5.0]), np.array([4]))
        by_id = next_habits(
            habits, ids, np.array([label], dtype=object), np.array([5.0]), np.array([4])
        )
        np.testing.assert_array_equal(by_row, by_id)
    times = np.array([[9.0, 7.0, np.nan]])
    np.testing.assert_array_equal(
        push_history_times(rows, times, np.array([1]), np.array([10.0])),
        push_history_times(ids, times, np.array(["a"], dtype=object), np.array([10.0])),
    )
    assert push_history_times(rows, times, np.array([1]), np.array([10.0])).tolist()[0][:2] == [
        10.0,
        9.0,
    ]

"""The stream's split-side JODIE equals the sequential (frozen) replay, at any delivery order."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from operators.model.config import ModelConfig
from operators.model.jodie import Jodie
from operators.model.kernel import query
from operators.model.online import OnlineJodie
from operators.model.state import TREND_SECONDS, States, next_habits
from operators.protocol.exchange import (
    Applied,
    Inbox,
    PartnerState,
    Pending,
    Ready,
    SendPreState,
)
from operators.protocol.sequencer import Interaction, Sequencer
from operators.protocol.sides import (
    NEW,
    EntityState,
    EventData,
    StreamModel,
    _next_habits,
    _pushed,
    counted,
    decayed_counts,
    pack_features,
    push_history,
    push_history_times,
    unpack_features,
)

CFG = ModelConfig(
    embedding_dim=8,
    user_static_dim=4,
    item_static_dim=4,
    n_features=2,
    history_size=3,
    delta_user_mean=5.0,
    delta_user_std=3.0,
    delta_item_mean=2.0,
    delta_item_std=1.5,
)


def _events(n: int, seed: int) -> list[EventData]:
    rng = np.random.default_rng(seed)
    t = 0.0
    out = []
    for k in range(n):
        t += float(rng.exponential(3.0))
        f = pack_features(rng.normal(size=2).tolist())
        out.append(EventData(f"e{k:05d}", f"u{rng.integers(6)}", f"i{rng.integers(5)}", t, f))
    return out


def _floats(e: EventData) -> np.ndarray:
    """The event's features as the sequential replay takes them; bytes that are no whole
    number of floats as a row of the wrong length."""
    if len(e.features) % 4:
        return np.zeros(len(e.features), dtype=np.float32)
    return np.array(unpack_features(e.features), dtype=np.float32)


def _baseline(online: OnlineJodie) -> tuple[dict[str, EntityState], dict[str, EntityState]]:
    """The checkpoint-style states the stream starts from, read out of the sequential store."""
    users, items = online.states.users, online.states.items
    item_ids = items.ids
    u_states = {}
    for row, uid in enumerate(users.ids):
        u_states[uid] = EntityState(
            users.emb[row].numpy().copy(), float(users.last_time[row]), *_user_row(online, row)
        )
    i_states = {
        iid: EntityState(items.emb[row].numpy().copy(), float(items.last_time[row]))
        for row, iid in enumerate(item_ids)
    }
    return u_states, i_states


def _user_row(online: OnlineJodie, row: int) -> tuple:
    """(history, counts, count, trend, times, habits) of an offline user row, as a stream's
    EntityState holds them (ids, no padding)."""
    users, item_ids = online.states.users, online.states.items.ids
    valid = users.history[row] >= 0
    return (
        tuple(item_ids[h] for h in users.history[row][valid].tolist()),
        tuple(users.history_counts[row][valid].tolist()),
        int(users.count[row]),
        0.0,
        tuple(users.history_times[row][valid].tolist()),
        tuple(users.habits[row].tolist()),
    )


#: Features by event index: another length and not finite are quarantined
#: (operators.model.kernel); none, and finite but huge (the update saturates), are applied.
POISON = {
    70: pack_features((1.0, 2.0, 3.0)),
    75: pack_features((float("inf"), 0.0)),
    80: pack_features((float("nan"), 1.0)),
    85: b"\x00\x00\x80\x3f\x00\x00\x80",  # 7 bytes: no whole number of floats
    90: b"",  # no features: zeros, applied like any event
    95: pack_features((3e38, -3e38)),
}


@pytest.mark.parametrize("poisoned", [False, True])
def test_stream_sides_reproduce_the_sequential_replay(poisoned: bool) -> None:
    """``poisoned``: some events carry features the model cannot take; both sides and the
    sequential replay quarantine the same ones and keep the same states."""
    torch.manual_seed(0)
    model = Jodie(CFG)
    online = OnlineJodie(model, States.empty(8, 4, 4, 3))
    events = _events(120, seed=1)
    if poisoned:
        events = [e._replace(features=POISON.get(k, e.features)) for k, e in enumerate(events)]
    for e in events[:60]:  # history the "checkpoint" already holds
        online.observe(e.user_id, e.item_id, e.timestamp, _floats(e))
    users, items = _baseline(online)
    for e in events[60:]:
        online.observe(e.user_id, e.item_id, e.timestamp, _floats(e))

    stream = StreamModel(model)
    seq = Sequencer(partitions=[0], n_features=2)
    by_id = {e.event_id: e for e in events[60:]}
    for n, e in enumerate(events[60:]):
        # The sequencer would refuse the poison (the router's check); the worker's own
        # guard is what is tested here, so it is sequenced with plain features.
        seq.offer(0, Interaction(e.event_id, e.user_id, e.item_id, e.timestamp, (0, 0), None), n)
    pool: list[tuple[str, str, object]] = []
    for s in seq.drain(idle={0}).sequenced:
        data = by_id[s.event.event_id]
        pool.append(
            (
                "user",
                data.user_id,
                Pending(s.seq, s.prev_user_seq, data.item_id, data, s.prev_item_seq),
            )
        )
        pool.append(
            (
                "item",
                data.item_id,
                Pending(s.seq, s.prev_item_seq, data.user_id, data, s.prev_user_seq),
            )
        )
    boxes: dict[str, dict[str, Inbox]] = {"user": {}, "item": {}}
    baselines = {"user": users, "item": items}
    applies = {"user": stream.user_apply(), "item": stream.item_apply()}
    rng = random.Random(7)
    sent = 0
    quarantined: dict[str, set[str]] = {"user": set(), "item": set()}
    while pool:
        side, key, body = pool.pop(rng.randrange(len(pool)))
        box = boxes[side].setdefault(key, Inbox(state=baselines[side].get(key, NEW)))
        if isinstance(body, Pending):
            outs = box.on_event(body, applies[side])
        else:
            assert isinstance(body, PartnerState)
            outs = box.on_partner(body, applies[side])
        for o in outs:
            if isinstance(o, SendPreState):
                sent += 1
                pool.append(
                    ("item" if side == "user" else "user", o.partner, PartnerState(o.seq, o.state))
                )
            else:
                assert isinstance(o, Applied)
                if o.output.quarantined is not None:
                    quarantined[side].add(o.output.event.event_id)

    # Both sides quarantine the same events: the non-finite ones and the wrong lengths.
    expected = {f"e{k:05d}" for k in (70, 75, 80, 85)} if poisoned else set()
    assert quarantined["user"] == quarantined["item"] == expected
    assert sent < 2 * 60  # repeating pairs were resolved locally
    for uid, box in boxes["user"].items():
        row = online.states.users.row(uid)
        assert row is not None
        np.testing.assert_allclose(
            box.state.embedding, online.states.users.emb[row].numpy(), atol=1e-6
        )
        assert box.state.last_time == online.states.users.last_time[row]
        # The rankers' user terms, bit for bit: history, counts, times, habits, event count.
        history, counts, count, _trend, times, habits = _user_row(online, row)
        state = box.state
        assert (state.history, state.history_counts, state.events) == (history, counts, count)
        assert (state.history_times, state.habits) == (times, habits)
    for iid, box in boxes["item"].items():
        row = online.states.items.row(iid)
        assert row is not None
        np.testing.assert_allclose(
            box.state.embedding, online.states.items.emb[row].numpy(), atol=1e-6
        )


def test_recommendation_matches_an_online_query_right_after_the_event() -> None:
    torch.manual_seed(3)
    model = Jodie(CFG)
    online = OnlineJodie(model, States.empty(8, 4, 4, 3))
    stream = StreamModel(model, horizon_s=4.0)
    e = EventData("e0", "u1", "i2", 10.0, pack_features((0.5, -1.0)))
    online.observe("u1", "i2", 10.0, _floats(e))
    _user, out, _item = stream.apply_user(NEW, NEW, e)
    q = online.query("u1", 14.0)  # 4 s later, nothing else happened
    np.testing.assert_allclose(out.projected, q.u_proj.reshape(-1).numpy(), atol=1e-6)
    np.testing.assert_allclose(out.predicted, q.pred.reshape(-1).numpy(), atol=1e-6)
    assert out.state_change_probability is not None and 0.0 < out.state_change_probability < 1.0


def test_the_user_side_hands_over_what_completes_the_frozen_query() -> None:
    """The user side cannot hold its previous item's state at the event (another worker may
    own and have moved it); it hands u(t⁻) and Δu on, and the frozen query is completed from
    them with that item's current state (what operators.evaluation.live does)."""
    torch.manual_seed(4)
    model = Jodie(CFG)
    online = OnlineJodie(model, States.empty(8, 4, 4, 3))
    stream = StreamModel(model)
    events = _events(40, seed=5)
    for e in events[:-1]:
        online.observe(e.user_id, e.item_id, e.timestamp, _floats(e))
    users, items = _baseline(online)
    last = events[-1]
    user = users.get(last.user_id, NEW)
    q = online.query(last.user_id, last.timestamp)
    _u, out, _i = stream.apply_user(user, items.get(last.item_id, NEW), last)
    assert out.previous_item == (user.history[0] if user.history else None)
    assert out.previous_item is not None  # this draw exercises a previous item
    p_row = online.states.items.row(out.previous_item)
    assert p_row is not None
    _, pred = query(
        model,
        torch.from_numpy(out.pre_state).reshape(1, -1),
        torch.tensor([[out.delta_user]]),
        online.states.users.static[online.states.users.row(last.user_id)].reshape(1, -1),
        online.states.items.emb[p_row].reshape(1, -1),
        online.states.items.static[p_row].reshape(1, -1),
    )
    np.testing.assert_allclose(pred.detach().reshape(-1), q.pred.reshape(-1), atol=1e-6)


def test_a_batch_of_users_and_items_equals_one_at_a_time() -> None:
    torch.manual_seed(6)
    model = Jodie(CFG)
    online = OnlineJodie(model, States.empty(8, 4, 4, 3))
    stream = StreamModel(model)
    events = _events(80, seed=7)
    for e in events[:60]:
        online.observe(e.user_id, e.item_id, e.timestamp, _floats(e))
    users, items = _baseline(online)
    batch = list({e.user_id: e for e in events[60:]}.values())  # distinct users
    u_in = [users.get(e.user_id, NEW) for e in batch]
    i_in = [items.get(e.item_id, NEW) for e in batch]
    many = stream.apply_users(u_in, i_in, batch)
    for (state, out, post), u, i, e in zip(many, u_in, i_in, batch, strict=True):
        s1, o1, p1 = stream.apply_user(u, i, e)
        np.testing.assert_allclose(state.embedding, s1.embedding, atol=1e-6)
        np.testing.assert_allclose(out.predicted, o1.predicted, atol=1e-6)
        np.testing.assert_allclose(out.pre_state, o1.pre_state, atol=1e-6)
        assert out.delta_user == o1.delta_user
        np.testing.assert_allclose(post.embedding, p1.embedding, atol=1e-6)
        assert state.history == s1.history
    items_batch = list({e.item_id: e for e in events[60:]}.values())
    it_in = [items.get(e.item_id, NEW) for e in items_batch]
    us_in = [users.get(e.user_id, NEW) for e in items_batch]
    for (state, out, post), i, u, e in zip(
        stream.apply_items(it_in, us_in, items_batch), it_in, us_in, items_batch, strict=True
    ):
        s1, o1, p1 = stream.apply_item(i, u, e)
        np.testing.assert_allclose(state.embedding, s1.embedding, atol=1e-6)
        np.testing.assert_allclose(out.vector, o1.vector, atol=1e-6)
        np.testing.assert_allclose(post.embedding, p1.embedding, atol=1e-6)


def test_an_event_that_raises_is_quarantined_on_its_side_only() -> None:
    """Any exception while applying a batch is narrowed to its event: that one keeps its
    embedding (its time and item are recorded), the rest of the batch applies normally."""
    torch.manual_seed(0)
    stream = StreamModel(Jodie(CFG))
    events = _events(6, seed=3)
    users = [EntityState(np.full(8, 0.1, dtype=np.float32), 0.0, ("i9",)) for _ in events]
    items = [EntityState(np.full(8, 0.2, dtype=np.float32), 0.0) for _ in events]
    ready = [
        Ready(Pending(k, k - 1, e.item_id, e), users[k], items[k], None)
        for k, e in enumerate(events)
    ]
    real = stream.apply_users

    def flaky(us: list, its: list, evs: list[EventData]) -> list:
        if any(e.event_id == "e00003" for e in evs):
            raise RuntimeError("boom")
        return real(us, its, evs)

    stream.apply_users = flaky  # type: ignore[method-assign]
    out = stream.user_apply_many()(ready)
    assert [o.quarantined for _state, o, _post in out] == [
        None,
        None,
        None,
        "exception RuntimeError: boom",
        None,
        None,
    ]
    state, material, item_post = out[3]
    np.testing.assert_array_equal(state.embedding, users[3].embedding)
    np.testing.assert_array_equal(item_post.embedding, items[3].embedding)
    assert state.last_time == events[3].timestamp
    assert state.history == (events[3].item_id, "i9")
    assert material.previous_item == "i9"
    # The others applied (one at a time after the batch failed: equal up to rounding).
    applied = real(users[:3], items[:3], events[:3])
    for (want, _, _), (got, _, _) in zip(applied, out[:3], strict=True):
        np.testing.assert_allclose(want.embedding, got.embedding, atol=1e-6)


def _push_reference(
    history: tuple[str, ...], counts: tuple[int, ...], item: str, k: int
) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """The rule, written plainly: the item to the front with its count + 1 (0 + 1 if new),
    every other entry in order, the oldest falling off beyond k."""
    before = dict(zip(history, counts, strict=True))
    kept = [(h, c) for h, c in zip(history, counts, strict=True) if h != item][: k - 1]
    return (item, *(h for h, _ in kept)), (before.get(item, 0) + 1, *(c for _, c in kept))


def test_push_history_follows_the_rule_on_random_histories() -> None:
    rng = random.Random(4)
    for _ in range(3000):
        k = rng.randint(1, 6)
        history = tuple(rng.sample("abcdefgh", rng.randint(0, k)))
        counts = tuple(rng.randint(1, 9) for _ in history)
        item = rng.choice("abcdefghij")
        user = EntityState(np.zeros(2, dtype=np.float32), 1.0, history, counts)
        assert push_history(user, item, k) == _push_reference(history, counts, item, k)
    # Rows written before counts were kept count each entry as 0.
    old = EntityState(np.zeros(2, dtype=np.float32), 1.0, ("a", "b"), ())
    assert push_history(old, "b", 3) == (("b", "a"), (1, 0))
    assert push_history(old, "a", 0) == ((), ())


def test_one_pass_push_equals_the_two_rules_on_random_rows() -> None:
    """The user side pushes history, counts and times in one pass; rows it never writes
    (duplicates, lengths that disagree, no times) take the two functions."""
    rng = random.Random(7)
    for _ in range(3000):
        k = rng.randint(0, 6)
        history = tuple(rng.sample("abcdefgh", rng.randint(0, 6)))
        if history and rng.random() < 0.1:
            history = (*history, history[0])  # a duplicate, which no row is written with
        counts = tuple(rng.randint(1, 9) for _ in history)
        if rng.random() < 0.1:
            counts = ()
        times = tuple(float(rng.randint(0, 99)) for _ in history)
        if rng.random() < 0.1:
            times = times[1:]
        item, t = rng.choice("abcdefghij"), float(rng.randint(100, 200))
        user = EntityState(np.zeros(2, dtype=np.float32), 1.0, history, counts, 3, 0.0, times)
        want = (*push_history(user, item, k), push_history_times(user, item, t, k))
        assert _pushed(user, item, t, k) == want


def test_habits_from_tuples_equal_next_habits_on_id_arrays() -> None:
    rng = np.random.default_rng(3)
    k = 4
    users, events = [], []
    for b in range(200):
        history = tuple(str(i) for i in rng.choice(8, size=rng.integers(0, 7), replace=False))
        habits = tuple(rng.random(4).tolist()) if b % 5 else ()
        last = float("nan") if b % 7 == 0 else float(rng.integers(0, 100))
        users.append(
            EntityState(
                np.zeros(2, np.float32),
                last,
                history,
                (),
                int(rng.integers(0, 30)),
                0.0,
                (),
                habits,
            )
        )
        events.append(EventData(f"e{b}", f"u{b}", str(rng.integers(0, 9)), 150.0, b""))
    ids = np.full((len(users), k), None, dtype=object)
    for row, user in enumerate(users):
        ids[row, : len(user.history)] = user.history[:k]
    items = np.empty(len(events), dtype=object)
    items[:] = [e.item_id for e in events]
    before = np.array([u.habits or (0.0,) * 4 for u in users])
    want = next_habits(
        before,
        ids,
        items,
        np.array([e.timestamp - u.last_time for u, e in zip(users, events, strict=True)]),
        np.array([u.events for u in users]),
    )
    np.testing.assert_array_equal(_next_habits(users, events, k), want)


def test_counting_an_item_event_keeps_every_other_field() -> None:
    """``counted`` builds the new state field by field: a field it did not name would fall
    back to its default, so every field is set here and checked."""
    item = EntityState(
        np.ones(3, dtype=np.float32), 100.0, ("a",), (2,), 5, 1.5, (90.0,), (0.1, 0.2)
    )
    post = counted(item, np.zeros(3, dtype=np.float32), 100.0 + TREND_SECONDS)
    moved = {"embedding", "last_time", "events", "trend"}
    for name in EntityState._fields:
        if name not in moved:
            assert getattr(post, name) == getattr(item, name), name
    assert post.last_time == 100.0 + TREND_SECONDS and post.events == 6
    assert post.trend == pytest.approx(1.5 * np.exp(-1.0) + 1.0)
    assert post.embedding is not None and not post.embedding.any()


def test_a_batch_of_decayed_counts_equals_the_stores_rule_on_its_rows() -> None:
    """The item side decays a wave's counts on one array; the offline store decays its rows'
    (``EntityStore.update``): the same values, bit for bit, first events included."""
    rng = np.random.default_rng(11)
    n = 500
    last = rng.uniform(0, 1e6, n)
    last[rng.random(n) < 0.2] = np.nan
    trend = rng.uniform(0, 50, n)
    t = last + rng.uniform(0, 5 * TREND_SECONDS, n)
    t[np.isnan(t)] = 2e6
    items = [
        EntityState(None, float(a), events=3, trend=float(b))
        for a, b in zip(last, trend, strict=True)
    ]
    age = np.nan_to_num(t - last, nan=np.inf)
    store = trend * np.exp(-age / TREND_SECONDS) + 1.0
    assert decayed_counts(items, t.tolist()) == store.tolist()
    for b in range(0, n, 50):  # and one at a time, as counted takes them
        assert counted(items[b], np.zeros(1, np.float32), float(t[b])).trend == store[b]

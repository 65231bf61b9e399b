"""The symmetric exchange computes a sequential replay, whatever order messages arrive in."""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from operators.protocol.exchange import (
    Applied,
    ApplyMany,
    DerivedStates,
    Inbox,
    PartnerState,
    Pending,
    Ready,
    SendPreState,
    drive,
)
from operators.protocol.sequencer import Interaction, Sequencer


def _user(u: float, i_pre: float, x: float, seq: int) -> float:
    """A toy non-commutative update: any order mistake changes the result."""
    return 0.5 * u + 0.3 * i_pre + 0.1 * x + 0.01 * seq


def _item(i: float, u_pre: float, x: float) -> float:
    return 0.7 * i - 0.2 * u_pre + 0.05 * x


def user_update(
    u: float, i_pre: float, event: Pending, _previous: float | None = None
) -> tuple[float, float, float]:
    # Each side also computes the partner's post-state, as the JODIE sides do.
    new = _user(u, i_pre, event.payload, event.seq)
    return new, new, _item(i_pre, u, event.payload)


def item_update(
    i: float, u_pre: float, event: Pending, _previous: float | None = None
) -> tuple[float, float, float]:
    new = _item(i, u_pre, event.payload)
    return new, new, _user(u_pre, i, event.payload, event.seq)


def _many(update: Callable[..., tuple[float, float, float]]) -> ApplyMany[float, float]:
    def many(ready: list[Ready[float, float]]) -> list[tuple[float, float, float]]:
        # Each entity at most once per wave (on one side an event belongs to one entity).
        assert len({r.event.seq for r in ready}) == len(ready)
        return [update(r.state, r.partner, r.event, r.previous) for r in ready]

    return many


@dataclass
class Message:
    side: str  # "user" | "item"
    entity: str
    body: Pending | PartnerState[float]


def sequential(events: list[tuple[str, str, float]]) -> tuple[dict[str, float], dict[str, float]]:
    users: dict[str, float] = {}
    items: dict[str, float] = {}
    for seq, (u, i, x) in enumerate(events):
        u_pre, i_pre = users.get(u, 0.0), items.get(i, 0.0)
        users[u] = _user(u_pre, i_pre, x, seq)
        items[i] = _item(i_pre, u_pre, x)
    return users, items


def streamed(
    events: list[tuple[str, str, float]],
    rng: random.Random,
    duplicate_rate: float,
    batched: bool = False,
    derived: bool = False,
) -> tuple[dict[str, float], dict[str, float], dict[str, Inbox], dict[str, Inbox]]:
    seq = Sequencer(partitions=[0], n_features=0)
    for n, (u, i, _x) in enumerate(events):
        seq.offer(0, Interaction(f"e{n:06d}", u, i, float(n), (), None), n)
    payload = {f"e{n:06d}": x for n, (_u, _i, x) in enumerate(events)}
    pool: list[Message] = []
    for e in seq.drain(idle={0}).sequenced:
        x = payload[e.event.event_id]
        pool.append(
            Message(
                "user",
                e.event.user_id,
                Pending(e.seq, e.prev_user_seq, e.event.item_id, x, e.prev_item_seq),
            )
        )
        pool.append(
            Message(
                "item",
                e.event.item_id,
                Pending(e.seq, e.prev_item_seq, e.event.user_id, x, e.prev_user_seq),
            )
        )
    boxes: dict[str, dict[str, Inbox]] = {"user": {}, "item": {}}
    # One process per side, keeping the partners' post-states it computed (small: evictions).
    kept = {side: DerivedStates[float](most=6) if derived else None for side in ("user", "item")}
    steps = 0
    sent = 0
    while pool:
        steps += 1
        assert steps < 100 * len(events) + 100, "the exchange did not converge"
        # One message at a time through on_event/on_partner, or a random batch of messages
        # offered first and then driven in waves (what a worker does with a poll's batch).
        size = rng.randint(1, len(pool)) if batched else 1
        batch = [pool.pop(rng.randrange(len(pool))) for _ in range(size)]
        touched: dict[str, list[Inbox]] = {"user": [], "item": []}
        outs: list[tuple[str, list[SendPreState | Applied]]] = []
        for msg in batch:
            if rng.random() < duplicate_rate:
                pool.append(msg)  # at-least-once delivery: the same message again later
            box = boxes[msg.side].setdefault(msg.entity, Inbox(state=0.0))
            apply = user_update if msg.side == "user" else item_update
            if batched:
                if isinstance(msg.body, Pending):
                    box.offer_event(msg.body)
                else:
                    box.offer_partner(msg.body)
                touched[msg.side].append(box)
            elif isinstance(msg.body, Pending):
                outs.append((msg.side, box.on_event(msg.body, apply)))
            else:
                outs.append((msg.side, box.on_partner(msg.body, apply)))
        if batched:
            for side, update in (("user", user_update), ("item", item_update)):
                many = _many(update)
                outs.append((side, drive(touched[side], many, kept[side])))
        for side, out in outs:
            for o in out:
                if isinstance(o, SendPreState):
                    sent += 1
                    other = "item" if side == "user" else "user"
                    pool.append(Message(other, o.partner, PartnerState(o.seq, o.state)))
                else:
                    assert isinstance(o, Applied)
    users = {k: b.state for k, b in boxes["user"].items()}
    items = {k: b.state for k, b in boxes["item"].items()}
    # A pair repeating with nothing in between exchanges nothing.
    repeats = sum(1 for a, b in itertools.pairwise(events) if a[:2] == b[:2])
    assert sent <= 2 * (len(events) - repeats)
    return users, items, boxes["user"], boxes["item"]


event_lists = st.lists(
    st.tuples(
        st.sampled_from(["u0", "u1", "u2", "u3"]),
        st.sampled_from(["i0", "i1", "i2"]),
        st.floats(-1, 1, allow_nan=False),
    ),
    min_size=1,
    max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(
    events=event_lists,
    seed=st.integers(0, 2**32 - 1),
    dup=st.sampled_from([0.0, 0.3]),
    mode=st.sampled_from(["one by one", "batched", "batched, derived states"]),
)
def test_any_delivery_order_equals_sequential_replay(
    events: list[tuple[str, str, float]], seed: int, dup: float, mode: str
) -> None:
    users, items, user_boxes, item_boxes = streamed(
        events, random.Random(seed), dup, batched=mode != "one by one", derived="derived" in mode
    )
    want_users, want_items = sequential(events)
    assert users == want_users  # bit-equal: the same float operations in the same order
    assert items == want_items
    assert all(b.idle for b in user_boxes.values()) and all(b.idle for b in item_boxes.values())


def test_a_partner_state_before_the_event_waits_in_the_record() -> None:
    box: Inbox[float, float] = Inbox(state=1.0)
    assert box.on_partner(PartnerState(seq=3, state=2.0), user_update) == []
    assert not box.idle
    out = box.on_event(
        Pending(seq=3, prev_seq=-1, partner="i", payload=0.0, partner_prev_seq=-1), user_update
    )
    assert [type(o) for o in out] == [SendPreState, Applied]
    assert out[0].state == 1.0  # the pre-state went out before applying
    assert box.applied_seq == 3 and box.idle


def test_events_wait_for_their_predecessor() -> None:
    box: Inbox[float, float] = Inbox(state=0.0)
    later = Pending(seq=7, prev_seq=2, partner="i", payload=1.0, partner_prev_seq=5)
    assert box.on_event(later, user_update) == []  # event 2 not applied yet: not ready
    first = Pending(seq=2, prev_seq=-1, partner="j", payload=1.0, partner_prev_seq=-1)
    out = box.on_event(first, user_update)
    assert [(type(o).__name__, o.seq) for o in out] == [("SendPreState", 2)]
    out = box.on_partner(PartnerState(2, 0.5), user_update)
    # Applying 2 makes 7 ready: its pre-state (the post-2 state) goes out at once.
    assert [(type(o).__name__, o.seq) for o in out] == [("Applied", 2), ("SendPreState", 7)]


def test_a_repeating_pair_skips_the_exchange() -> None:
    box: Inbox[float, float] = Inbox(state=0.0)
    box.on_event(
        Pending(seq=0, prev_seq=-1, partner="i", payload=1.0, partner_prev_seq=-1), user_update
    )
    out = box.on_partner(PartnerState(0, 0.5), user_update)
    assert [type(o) for o in out] == [Applied]
    # Event 1: the same pair again, nothing in between on either side.
    out = box.on_event(
        Pending(seq=1, prev_seq=0, partner="i", payload=2.0, partner_prev_seq=0), user_update
    )
    assert [type(o) for o in out] == [Applied]  # no SendPreState, no waiting
    i_after_0 = _item(0.5, 0.0, 1.0)
    assert box.state == _user(_user(0.0, 0.5, 1.0, 0), i_after_0, 2.0, 1)


def test_a_derived_partner_state_stands_in_for_the_message() -> None:
    """u1's event on i0 follows u0's: the user side, which applied u0's event and computed
    i0's post-state then, applies u1's without i0's message, and gets what the message
    would have given; a quarantined application's state is never used."""
    events = [("u0", "i0", 0.4), ("u1", "i0", -0.2)]
    want_users, _ = sequential(events)
    for usable, applied in ((True, True), (False, False)):
        kept = DerivedStates[float](most=10, usable=lambda _output, ok=usable: ok)
        u0, u1 = Inbox(state=0.0), Inbox(state=0.0)
        u0.offer_event(Pending(0, -1, "i0", 0.4, -1))
        u0.offer_partner(PartnerState(0, 0.0))
        drive([u0], _many(user_update), kept)
        u1.offer_event(Pending(1, -1, "i0", -0.2, 0))  # i0's previous event: seq 0
        out = drive([u1], _many(user_update), kept)
        assert any(isinstance(o, Applied) for o in out) is applied
        if applied:
            assert u1.state == want_users["u1"] and kept.hits == 1
            # The message, when it comes, is a repeat.
            assert not u1.offer_partner(PartnerState(1, 0.0)) and u1.idle
        else:
            assert u1.applied_seq == -1 and kept.hits == 0

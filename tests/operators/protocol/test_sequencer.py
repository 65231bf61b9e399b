"""The sequencer: canonical merge order, links, validation, duplicates, late events, restore."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from operators.protocol.sequencer import DrainResult, Interaction, Limits, Sequencer, validate


def ev(eid: str, user: str, item: str, t: float, features: tuple[float, ...] = ()) -> Interaction:
    return Interaction(eid, user, item, t, features, None)


def test_merge_is_by_time_then_id_and_links_entities() -> None:
    s = Sequencer(partitions=[0, 1], n_features=0)
    s.offer(0, ev("a", "u1", "i1", 1.0), 0)
    s.offer(0, ev("c", "u1", "i2", 3.0), 1)
    s.offer(1, ev("b", "u2", "i1", 2.0), 0)
    s.offer(1, ev("d", "u2", "i2", 3.0), 1)
    out = s.drain(idle={0, 1}).sequenced
    assert [e.event.event_id for e in out] == ["a", "b", "c", "d"]
    assert [(e.seq, e.prev_user_seq, e.prev_item_seq) for e in out] == [
        (0, -1, -1),
        (1, -1, 0),
        (2, 0, -1),
        (3, 1, 2),
    ]
    assert out[3].prev_user_time == 2.0 and out[3].prev_item_time == 3.0


def test_an_empty_partition_that_is_not_idle_holds_the_merge() -> None:
    s = Sequencer(partitions=[0, 1], n_features=0)
    s.offer(0, ev("a", "u1", "i1", 5.0), 0)
    assert s.drain(idle=set()).sequenced == []  # partition 1 may still bring t < 5
    s.offer(1, ev("b", "u2", "i1", 4.0), 0)
    out = s.drain(idle=set())
    assert [e.event.event_id for e in out.sequenced] == ["b"]  # "a" waits for 1 again
    assert [e.event.event_id for e in s.drain(idle={1}).sequenced] == ["a"]


def test_duplicates_are_rejected_to_the_dlq_and_counted() -> None:
    s = Sequencer(partitions=[0], n_features=0)
    s.offer(0, ev("a", "u", "i", 1.0), 0)
    s.offer(0, ev("a", "u", "i", 1.0), 1)
    out = s.drain(idle={0})
    assert len(out.sequenced) == 1 and out.duplicates == 1
    assert [(r.reason, r.event_id, r.offset) for r in out.rejected] == [("duplicate", "a", 1)]
    assert s.next_seq == 1  # applied once


def test_a_duplicate_is_named_so_even_when_it_also_goes_back_in_time() -> None:
    s = Sequencer(partitions=[0], n_features=0)
    s.offer(0, ev("a", "u", "i", 1.0), 0)
    s.offer(0, ev("b", "u", "i", 2.0), 1)
    s.offer(0, ev("a", "u", "i", 1.0), 2)  # u is at t = 2 by now
    assert [r.reason for r in s.drain(idle={0}).rejected] == ["duplicate"]


def test_late_event_for_an_entity_is_rejected_but_others_flow() -> None:
    s = Sequencer(partitions=[0, 1], n_features=0)
    s.offer(0, ev("a", "u1", "i1", 5.0), 0)
    s.drain(idle={1})
    s.offer(1, ev("late", "u2", "i1", 4.0), 0)  # item i1 already at t=5
    s.offer(1, ev("fine", "u3", "i9", 4.5), 1)
    out = s.drain(idle={0, 1})
    assert [r.reason for r in out.rejected] == ["time_backwards"]
    assert out.rejected[0].event_id == "late" and out.rejected[0].offset == 0
    assert [e.event.event_id for e in out.sequenced] == ["fine"]


@pytest.mark.parametrize(
    ("event", "reason"),
    [
        (ev("", "u", "i", 1.0), "missing_id"),
        (ev("x", "", "i", 1.0), "missing_id"),
        (ev("x", "u", "", 1.0), "missing_id"),
        (ev("x", "u", "i", math.inf), "bad_timestamp"),
        (ev("x", "u", "i", 1.0, (math.nan, 0.0)), "bad_features"),
        (ev("x", "u", "i", 1.0, (1.0,)), "feature_length"),
        (Interaction("x", "u", "i", 1.0, (0.0, 0.0), 3), "bad_label"),
    ],
)
def test_validation_reasons(event: Interaction, reason: str) -> None:
    problem = validate(event, n_features=2)
    assert problem is not None and problem[0] == reason


def test_valid_event_passes_validation() -> None:
    assert validate(ev("x", "u", "i", 1.0, (0.5, 1.5)), n_features=2) is None


def test_restore_continues_the_numbering_and_links() -> None:
    first = Sequencer(partitions=[0], n_features=0)
    first.offer(0, ev("a", "u", "i", 1.0), 0)
    done = first.drain(idle={0}).sequenced
    again = Sequencer(partitions=[0], n_features=0)
    again.restore(done)
    again.offer(0, ev("a", "u", "i", 1.0), 0)  # a re-send after restart: still a duplicate
    again.offer(0, ev("b", "u", "i", 2.0), 1)
    out = again.drain(idle={0})
    assert out.duplicates == 1 and [r.reason for r in out.rejected] == ["duplicate"]
    assert [(e.seq, e.prev_user_seq, e.prev_item_seq) for e in out.sequenced] == [(1, 0, 0)]


def test_decode_rejections_pass_in_line_and_offsets_commit_only_past_handled() -> None:
    from operators.protocol.sequencer import Rejected

    s = Sequencer(partitions=[0, 1], n_features=0)
    s.offer(0, ev("a", "u1", "i1", 1.0), 10)
    s.offer_rejected(Rejected("malformed", "garbage", None, 0, 11))
    s.offer(0, ev("c", "u1", "i1", 3.0), 12)
    assert s.committable({0: 13, 1: 0}) == {0: 10, 1: 0}
    out = s.drain(idle=set())  # partition 1 not idle: nothing may pass yet
    assert out.sequenced == [] and out.rejected == []
    s.offer(1, ev("b", "u2", "i2", 2.0), 0)
    out = s.drain(idle=set())
    assert [e.event.event_id for e in out.sequenced] == ["a", "b"]
    assert [(r.reason, r.offset) for r in out.rejected] == [("malformed", 11)]
    assert s.committable({0: 13, 1: 1}) == {0: 12, 1: 1}  # "c" still waits for partition 1


# --- events that fail validation are rejected on arrival, outside the merge -------------------


@pytest.mark.parametrize("t", [math.inf, -math.inf, math.nan])
def test_a_non_finite_timestamp_is_rejected_at_once_and_holds_back_nothing(t: float) -> None:
    s = Sequencer(partitions=[0, 1, 2], n_features=0)
    s.offer(0, ev("bad", "u1", "i1", t), 7)
    s.offer(0, ev("a", "u1", "i1", 1.0), 8)
    s.offer(1, ev("b", "u2", "i1", 2.0), 0)
    s.offer(2, ev("c", "u3", "i2", 3.0), 0)
    out = s.drain(idle=set())  # no partition idle: only what is surely next may pass
    assert [(r.reason, r.event_id, r.partition, r.offset) for r in out.rejected] == [
        ("bad_timestamp", "bad", 0, 7)
    ]
    assert out.rejected[0].detail == f"timestamp {t} is not finite"
    assert [e.event.event_id for e in out.sequenced] == ["a"]  # then partition 0 is empty
    assert s.committable({0: 9, 1: 1, 2: 1}) == {0: 9, 1: 0, 2: 0}
    assert [e.event.event_id for e in s.drain(idle={0, 1}).sequenced] == ["b", "c"]


@pytest.mark.parametrize("t", [math.inf, math.nan])
def test_a_non_finite_timestamp_does_not_reorder_the_valid_events(t: float) -> None:
    # Merged with the others, "bad" kept "b" (t=0) behind "a" (t=3) and so, for inf, made it
    # go back in time for item i0; a NaN key, equal to every other, broke the heap's order.
    s = Sequencer(partitions=[0, 1, 2], n_features=0)
    s.offer(0, ev("a", "u0", "i0", 3.0), 0)
    s.offer(1, ev("bad", "u1", "i1", t), 0)
    s.offer(1, ev("b", "u1", "i0", 0.0), 1)
    s.offer(2, ev("c", "u2", "i2", 1.0), 0)
    s.offer(2, ev("d", "u2", "i2", 4.0), 1)
    out = s.drain(idle={0, 1, 2})
    assert [(r.reason, r.event_id) for r in out.rejected] == [("bad_timestamp", "bad")]
    assert [e.event.event_id for e in out.sequenced] == ["b", "c", "a", "d"]


def test_invalid_events_are_rejected_on_arrival_in_line_with_their_partition() -> None:
    s = Sequencer(partitions=[0, 1], n_features=1)
    s.offer(0, ev("a", "u1", "i1", 1.0, (0.0,)), 0)
    s.offer(0, ev("", "u1", "i1", 2.0, (0.0,)), 1)
    s.offer(0, ev("x", "u1", "i1", 2.0, (0.0, 1.0)), 2)
    s.offer(0, ev("y", "u1", "i1", 2.0, (math.inf,)), 3)
    s.offer(0, Interaction("z", "u1", "i1", 2.0, (0.0,), 2), 4)
    assert s.committable({0: 5, 1: 0}) == {0: 0, 1: 0}
    out = s.drain(idle=set())  # partition 1 holds back "a": so do the rejections behind it
    assert out.sequenced == [] and out.rejected == []
    out = s.drain(idle={1})
    assert [e.event.event_id for e in out.sequenced] == ["a"]
    expected = [
        ("missing_id", "empty event_id", "", 1),
        ("feature_length", "expected 1 features, got 2", "x", 2),
        ("bad_features", "a feature is NaN or infinite", "y", 3),
        ("bad_label", "state_label 2 is not 0, 1 or null", "z", 4),
    ]
    assert [(r.reason, r.detail, r.event_id, r.offset) for r in out.rejected] == expected
    assert s.buffered() == 0 and s.committable({0: 5, 1: 0}) == {0: 5, 1: 0}


def test_the_first_event_fixes_the_feature_length_in_merge_order() -> None:
    s = Sequencer(partitions=[0, 1], n_features=None)
    s.offer(0, ev("two", "u1", "i1", 2.0, (0.0, 1.0)), 0)  # offered first, merged second
    s.offer(1, ev("one", "u2", "i2", 1.0, (0.0,)), 0)
    s.offer(1, ev("ok", "u2", "i2", 3.0, (1.0,)), 1)
    out = s.drain(idle={0, 1})
    assert [e.event.event_id for e in out.sequenced] == ["one", "ok"]
    assert [(r.reason, r.event_id) for r in out.rejected] == [("feature_length", "two")]
    s.offer(0, ev("late", "u3", "i3", 4.0, ()), 1)  # the length is known now: rejected on arrival
    assert [(r.reason, r.offset) for r in s.drain(idle=set()).rejected] == [("feature_length", 1)]


@st.composite
def schedules(draw: st.DrawFn) -> tuple[int, list[list[Interaction]], list[Any], Interaction, int]:
    """Partitions' events, an order of offers and drains, and a bad event to slip in.

    Small pools of ids, users, items and times give ties (broken by event id), duplicates and
    events that go back in time for their user or item.
    """
    n_parts = draw(st.integers(2, 4))
    event = st.builds(
        ev,
        st.sampled_from([f"e{k}" for k in range(12)]),
        st.sampled_from(["u0", "u1", "u2", "u3"]),
        st.sampled_from(["i0", "i1", "i2"]),
        st.integers(0, 8).map(float),
    )
    parts = [draw(st.lists(event, max_size=8)) for _ in range(n_parts)]
    q = draw(st.integers(0, n_parts - 1))
    where = draw(st.integers(0, len(parts[q])))
    bad = draw(
        st.builds(
            ev,
            st.sampled_from(["bad", "e0", "e1"]),
            st.sampled_from(["u0", "u1", "u9"]),
            st.sampled_from(["i0", "i9"]),
            st.sampled_from([math.inf, -math.inf, math.nan, 1e300, -1e300, 1e9]),
        )
    )
    parts[q].insert(where, bad)
    # An offer from a partition, or a drain with some partitions idle.
    step = st.one_of(
        st.integers(0, n_parts - 1),
        st.frozensets(st.integers(0, n_parts - 1)).map(lambda idle: ("drain", idle)),
    )
    steps = draw(st.lists(step, max_size=60))
    return q, parts, steps, bad, where


def _run(
    parts: list[list[Interaction]], steps: list[Any], skip: tuple[int, int] | None
) -> list[tuple[DrainResult, dict[int, int], list[int]]]:
    """After each drain: its result, the committable offsets and how many events each
    partition has sent so far; ``skip``: an event not offered."""
    # The clock bounds a far-future bad event even when it comes first (no watermark yet).
    s = Sequencer(partitions=range(len(parts)), n_features=0, clock=lambda: 10.0)
    sent = [0] * len(parts)
    nxt = dict.fromkeys(range(len(parts)), 0)
    out = []
    everything = [p for p, events in enumerate(parts) for _ in events]
    for step in [*steps, *everything, ("drain", frozenset(range(len(parts))))]:
        if isinstance(step, tuple):
            out.append((s.drain(idle=set(step[1])), s.committable(nxt), list(sent)))
        elif sent[step] < len(parts[step]):
            offset = sent[step]
            sent[step] += 1
            nxt[step] = offset + 1
            if (step, offset) != skip:
                s.offer(step, parts[step][offset], offset)
    assert s.buffered() == 0
    return out


@settings(max_examples=300, deadline=None)
@given(schedules())
def test_a_bad_timestamp_never_delays_or_reorders_valid_events(
    case: tuple[int, list[list[Interaction]], list[Any], Interaction, int],
) -> None:
    q, parts, steps, bad, where = case
    with_bad = _run(parts, steps, skip=None)
    without = _run(parts, steps, skip=(q, where))
    assert len(with_bad) == len(without)
    found = []
    for (got, committable, sent), (want, committable_without, _) in zip(
        with_bad, without, strict=True
    ):
        mine = [r for r in got.rejected if (r.partition, r.offset) == (q, where)]
        found += mine
        others = [r for r in got.rejected if (r.partition, r.offset) != (q, where)]
        # Every valid event comes out in the same drain, in the same order, with the same
        # numbers and links (and the same rejections and duplicates) as without the bad one.
        assert got.sequenced == want.sequenced
        assert others == want.rejected and got.duplicates == want.duplicates
        assert committable == committable_without
        # Once offered, the bad event waits only for the events before it on its partition:
        # after a drain it is never what the offset of its partition stops at.
        assert sent[q] <= where or committable[q] != where
    # 1e9 is finite and below the absolute bound, but a day past the clock and every event.
    reason = "future_timestamp" if bad.timestamp == 1e9 else "bad_timestamp"
    assert [(r.reason, r.event_id) for r in found] == [(reason, bad.event_id)]


# --- hostile input: ids, timestamps, features (poison is data) ---------------------------------

DAY = 86_400.0


@pytest.mark.parametrize("name", ["event_id", "user_id", "item_id"])
@pytest.mark.parametrize("char", ["\x00", "\n", "\x1b", "\x7f", "\x85"])
def test_a_control_character_in_any_id_is_a_bad_id(name: str, char: str) -> None:
    fields = {"event_id": "e", "user_id": "u", "item_id": "i", name: f"a{char}b"}
    event = Interaction(fields["event_id"], fields["user_id"], fields["item_id"], 1.0, (), None)
    problem = validate(event, n_features=0)
    assert problem == ("bad_id", f"{name} holds control character U+{ord(char):04X}")


@pytest.mark.parametrize("name", ["event_id", "user_id", "item_id"])
def test_an_empty_id_is_missing(name: str) -> None:
    fields = {"event_id": "e", "user_id": "u", "item_id": "i", name: ""}
    event = Interaction(fields["event_id"], fields["user_id"], fields["item_id"], 1.0, (), None)
    assert validate(event, n_features=0) == ("missing_id", f"empty {name}")


@pytest.mark.parametrize("name", ["event_id", "user_id", "item_id"])
def test_an_over_long_id_is_a_bad_id(name: str) -> None:
    fields = {"event_id": "e", "user_id": "u", "item_id": "i", name: "x" * 10_000}
    event = Interaction(fields["event_id"], fields["user_id"], fields["item_id"], 1.0, (), None)
    assert validate(event, n_features=0) == (
        "bad_id",
        f"{name} has 10000 characters, more than 256",
    )
    at_limit = "x" * 256
    assert validate(ev(at_limit, at_limit, at_limit, 1.0), n_features=0) is None
    assert validate(event, n_features=0, limits=Limits(max_id_length=10_000)) is None


def test_a_lone_surrogate_in_an_id_is_a_bad_id() -> None:
    # Not encodable as UTF-8, so it could not become a Kafka key or a table key.
    problem = validate(ev("e", "u\ud800", "i", 1.0), n_features=0)
    assert problem == ("bad_id", "user_id holds control character U+D800")


def test_printable_unicode_ids_are_valid() -> None:
    assert validate(ev("é-1", "用户 7", "🎵 item", 1.0), n_features=0) is None


@pytest.mark.parametrize("t", [1e300, -1e300, 1.5e15, -1.5e15])
def test_an_absurd_timestamp_is_rejected_outright(t: float) -> None:
    problem = validate(ev("x", "u", "i", t), n_features=0)
    assert problem is not None and problem[0] == "bad_timestamp"
    assert validate(ev("x", "u", "i", 1e15), n_features=0) is None


def test_a_far_future_timestamp_is_rejected_and_does_not_poison_the_chains() -> None:
    s = Sequencer(partitions=[0], n_features=0)
    s.offer(0, ev("a", "u", "i", 100.0), 0)
    s.offer(0, ev("future", "u", "i", 100.0 + DAY + 1.0), 1)  # a popular item's next event
    s.offer(0, ev("edge", "v", "j", 100.0 + DAY), 2)  # exactly at the bound: accepted
    s.offer(0, ev("b", "u", "i", 200.0), 3)  # same user and item: must still be accepted
    out = s.drain(idle={0})
    assert [(r.reason, r.event_id, r.offset) for r in out.rejected] == [
        ("future_timestamp", "future", 1)
    ]
    assert out.rejected[0].detail == (
        f"timestamp {100.0 + DAY + 1.0} is past {100.0 + DAY} (the watermark + 86400 s)"
    )
    # One partition is taken in its own order; "b" links to "a" as if "future" never came.
    assert [(e.event.event_id, e.prev_user_seq, e.prev_item_seq) for e in out.sequenced] == [
        ("a", -1, -1),
        ("edge", -1, -1),
        ("b", 0, 0),
    ]
    assert s.watermark == 100.0 + DAY


def test_the_first_event_is_bounded_by_the_clock_when_there_is_one() -> None:
    s = Sequencer(partitions=[0], n_features=0, clock=lambda: 1_000.0)
    s.offer(0, ev("far", "u", "i", 1_000.0 + DAY + 1.0), 0)
    s.offer(0, ev("near", "u", "i", 0.0), 1)  # timestamps from 0, as in the Wikipedia file
    out = s.drain(idle={0})
    assert [r.reason for r in out.rejected] == ["future_timestamp"]
    assert "(the clock + 86400 s)" in out.rejected[0].detail
    assert [e.event.event_id for e in out.sequenced] == ["near"]
    # Without a clock only the absolute bound applies to the first event.
    bare = Sequencer(partitions=[0], n_features=0)
    bare.offer(0, ev("far", "u", "i", 1e12), 0)
    assert [e.event.event_id for e in bare.drain(idle={0}).sequenced] == ["far"]


def test_the_watermark_counts_events_waiting_in_the_merge() -> None:
    # Partition 0's backlog is read days ahead of partition 1 (not idle, nothing yet): its
    # events wait in the merge, and each is within the skew of the one before.
    s = Sequencer(partitions=[0, 1], n_features=0)
    for k in range(4):
        s.offer(0, ev(f"a{k}", "u", "i", k * 0.9 * DAY), k)
    assert s.drain(idle=set()).sequenced == []
    s.offer(1, ev("b", "v", "j", 3.5 * DAY), 0)
    assert s.drain(idle={0, 1}).rejected == []


def test_the_watermark_is_restored_from_the_log() -> None:
    first = Sequencer(partitions=[0], n_features=0)
    first.offer(0, ev("a", "u", "i", 5 * DAY), 0)
    done = first.drain(idle={0}).sequenced
    again = Sequencer(partitions=[0], n_features=0, clock=lambda: 0.0)
    again.restore(done)
    assert again.watermark == 5 * DAY
    again.offer(0, ev("b", "u", "i", 5.5 * DAY), 1)  # past the clock, within the watermark's
    again.offer(0, ev("c", "u", "i", 7 * DAY), 2)
    out = again.drain(idle={0})
    assert [e.event.event_id for e in out.sequenced] == ["b"]
    assert [r.reason for r in out.rejected] == ["future_timestamp"]


@pytest.mark.parametrize(
    ("features", "detail"),
    [
        ((math.nan, 0.0), "a feature is NaN or infinite"),
        ((0.0, math.inf), "a feature is NaN or infinite"),
        ((-math.inf, 0.0), "a feature is NaN or infinite"),
        ((1e6 + 1, 0.0), "a feature is beyond ±1e+06"),
        ((0.0, -1e300), "a feature is beyond ±1e+06"),
    ],
)
def test_a_non_finite_or_huge_feature_is_rejected(features: tuple[float, ...], detail: str) -> None:
    assert validate(ev("x", "u", "i", 1.0, features), n_features=2) == ("bad_features", detail)
    assert validate(ev("x", "u", "i", 1.0, (1e6, -1e6)), n_features=2) is None


def _exact_feature_verdict(features: tuple[float, ...], bound: float) -> tuple[str, str] | None:
    """The feature check one value at a time, as the quick one must answer."""
    if all(-bound <= x <= bound for x in features):
        return None
    if not all(math.isfinite(x) for x in features):
        return "bad_features", "a feature is NaN or infinite"
    return "bad_features", f"a feature is beyond ±{bound:g}"


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.floats(allow_nan=True, allow_infinity=True),
            st.floats(min_value=-1e6, max_value=1e6),
            st.sampled_from([1e6, -1e6, 0.0, -0.0, math.nan, math.inf, 1.7e308]),
        ),
        min_size=1,
        max_size=8,
    ),
    st.sampled_from([1e6, 1e300, math.inf]),
)
def test_the_quick_feature_check_agrees_with_the_exact_one(
    features: list[float], bound: float
) -> None:
    event = ev("x", "u", "i", 1.0, tuple(features))
    limits = Limits(max_feature_abs=bound)
    assert validate(event, n_features=len(features), limits=limits) == _exact_feature_verdict(
        tuple(features), bound
    )


def test_finite_features_whose_sum_overflows_are_judged_one_by_one() -> None:
    # Their sum is infinite, so the quick check cannot clear them; each is within the bound.
    features = (1.7e308, 1.7e308, -1.0)
    assert validate(ev("x", "u", "i", 1.0, features), 3, Limits(max_feature_abs=math.inf)) is None
    assert validate(ev("x", "u", "i", 1.0, features), 3, Limits(max_feature_abs=1e308)) == (
        "bad_features",
        "a feature is beyond ±1e+308",
    )


class _Uniterable(tuple):  # type: ignore[type-arg]
    """Features whose values must not be looked at (a huge array is refused by its length)."""

    def __iter__(self):  # type: ignore[no-untyped-def]
        raise AssertionError("iterated")


@pytest.mark.parametrize("n_features", [2, None])
def test_a_huge_feature_array_is_refused_by_its_length_alone(n_features: int | None) -> None:
    huge = _Uniterable([0.0] * 100_000)
    problem = validate(ev("x", "u", "i", 1.0, huge), n_features=n_features)
    detail = "expected 2 features, got 100000" if n_features else "100000 features, more than 4096"
    assert problem == ("feature_length", detail)


def test_a_huge_first_event_does_not_fix_the_feature_length() -> None:
    s = Sequencer(partitions=[0], n_features=None)
    s.offer(0, ev("huge", "u", "i", 1.0, (0.0,) * 100_000), 0)
    s.offer(0, ev("ok", "u", "i", 2.0, (0.5, 0.5)), 1)
    out = s.drain(idle={0})
    assert [r.reason for r in out.rejected] == ["feature_length"]
    assert [e.event.event_id for e in out.sequenced] == ["ok"] and s.n_features == 2


def test_a_rejected_event_changes_no_state() -> None:
    hostile = [
        ev("nul", "u\x00", "i", 3.0),
        ev("long", "u", "i" * 10_000, 3.0),
        ev("", "u", "i", 3.0),
        ev("huge-t", "u", "i", 1e300),
        ev("future", "u", "i", 2.0 + 2 * DAY),
        ev("nan-f", "u", "i", 3.0, (math.nan,)),
        ev("big-f", "u", "i", 3.0, (1e7,)),
        ev("count", "u", "i", 3.0, (0.0, 0.0)),
    ]
    s = Sequencer(partitions=[0], n_features=1, clock=lambda: 0.0)
    s.offer(0, ev("a", "u", "i", 2.0, (0.0,)), 0)
    s.drain(idle={0})

    def snapshot() -> tuple[Any, ...]:
        users, items, seen = dict(s.last_user), dict(s.last_item), set(s.seen)
        return (s.next_seq, users, items, seen, s.watermark, s.n_features)

    before = snapshot()
    for k, bad in enumerate(hostile, start=1):
        s.offer(0, bad, k)
    out = s.drain(idle={0})
    assert len(out.rejected) == len(hostile) and not out.sequenced
    assert snapshot() == before
    s.offer(0, ev("b", "u", "i", 4.0, (1.0,)), len(hostile) + 1)
    (b,) = s.drain(idle={0}).sequenced
    assert (b.seq, b.prev_user_seq, b.prev_item_seq, b.prev_user_time) == (1, 0, 0, 2.0)


# --- the bounded duplicate check ---------------------------------------------------------------


def sequence(s: Sequencer, events: list[Interaction]) -> DrainResult:
    for k, e in enumerate(events):
        s.offer(0, e, k)
    return s.drain(idle={0})


def test_the_window_holds_only_the_latest_ids() -> None:
    s = Sequencer(partitions=[0], n_features=0, dedup_window=3)
    sequence(s, [ev(f"e{k}", f"u{k}", f"i{k}", float(k)) for k in range(10)])
    assert list(s.seen) == ["e7", "e8", "e9"]


def test_an_old_resend_of_an_entitys_latest_event_is_still_a_duplicate() -> None:
    s = Sequencer(partitions=[0], n_features=0, dedup_window=2)
    sequence(s, [ev("a", "u", "i", 1.0)] + [ev(f"e{k}", f"v{k}", f"j{k}", 2.0) for k in range(5)])
    assert "a" not in s.seen  # out of the window, but still u's (and i's) latest event
    out = sequence(s, [ev("a", "u", "i", 1.0)])
    assert [r.reason for r in out.rejected] == ["duplicate"] and s.next_seq == 6


def test_an_old_resend_behind_a_later_event_is_time_backwards() -> None:
    s = Sequencer(partitions=[0], n_features=0, dedup_window=1)
    sequence(s, [ev("a", "u", "i", 1.0), ev("b", "u", "j", 2.0), ev("c", "v", "i", 2.0)])
    out = sequence(s, [ev("a", "u", "i", 1.0)])
    assert [r.reason for r in out.rejected] == ["time_backwards"] and s.next_seq == 3


def test_an_old_resend_tied_in_time_on_both_sides_is_sequenced_again() -> None:
    # The documented cost of a bounded window: its user's and its item's latest events since
    # have its very timestamp, so neither check can tell it from a new event.
    s = Sequencer(partitions=[0], n_features=0, dedup_window=1)
    sequence(s, [ev("a", "u", "i", 1.0), ev("b", "u", "j", 1.0), ev("c", "v", "i", 1.0)])
    out = sequence(s, [ev("a", "u", "i", 1.0)])
    assert not out.rejected and [e.seq for e in out.sequenced] == [3]


def test_a_distinct_event_like_the_latest_one_is_not_a_duplicate() -> None:
    s = Sequencer(partitions=[0], n_features=0, dedup_window=1)
    sequence(s, [ev("a", "u", "i", 1.0), ev("x", "v", "j", 1.0)])
    out = sequence(s, [ev("a2", "u", "i", 1.0)])  # same user, item and time, another id
    assert not out.rejected and len(out.sequenced) == 1


def test_restore_keeps_the_latest_ids_whatever_the_order() -> None:
    source = Sequencer(partitions=[0], n_features=0)
    done = sequence(source, [ev(f"e{k}", f"u{k % 7}", f"i{k % 5}", float(k)) for k in range(50)])
    shuffled = sorted(done.sequenced, key=lambda e: (e.seq % 4, -e.seq))  # as partitions come
    again = Sequencer(partitions=[0], n_features=0, dedup_window=10)
    again.restore(shuffled)
    assert list(again.seen) == [f"e{k}" for k in range(40, 50)]
    assert (again.next_seq, again.last_user, again.last_item, again.watermark) == (
        source.next_seq,
        source.last_user,
        source.last_item,
        source.watermark,
    )

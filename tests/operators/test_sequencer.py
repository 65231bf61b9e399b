"""The sequencer: canonical merge order, links, validation, duplicates, late events, restore."""

from __future__ import annotations

import math

import pytest

from operators.sequencer import Interaction, Sequencer, validate


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


def test_duplicates_are_dropped_and_counted() -> None:
    s = Sequencer(partitions=[0], n_features=0)
    s.offer(0, ev("a", "u", "i", 1.0), 0)
    s.offer(0, ev("a", "u", "i", 1.0), 1)
    out = s.drain(idle={0})
    assert len(out.sequenced) == 1 and out.duplicates == 1 and not out.rejected


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
    assert out.duplicates == 1
    assert [(e.seq, e.prev_user_seq, e.prev_item_seq) for e in out.sequenced] == [(1, 0, 0)]


def test_decode_rejections_pass_in_line_and_offsets_commit_only_past_handled() -> None:
    from operators.sequencer import Rejected

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

"""Table rows written directly (streams.records.inbox_row_bytes) against the Codec's."""

from __future__ import annotations

import numpy as np

from operators.protocol.exchange import Inbox, Pending
from operators.protocol.sides import EntityState, EventData, pack_features
from schemas import Codec, wire
from schemas.codec import ENTITY_RECORD
from streams.records import WaitingBytes, inbox_from_record, inbox_row_bytes, inbox_to_record

ROWS = Codec(ENTITY_RECORD)
WRITER = wire.EntityRecordWriter(ROWS.header)


def _event(seq: int, zero: float) -> Pending:
    data = EventData(f"e{seq}", "u\u00e9", "i", 1.5e9 + seq, pack_features((zero, 0.25, -3.0)))
    return Pending(seq, seq - 1, "i", data, partner_prev_seq=-1)


def _box() -> Inbox[EntityState, EntityState]:
    state = EntityState(np.arange(4, dtype=np.float32), 1.4e9, ("a", "b"), (2, 1), 5, 1.75)
    box: Inbox[EntityState, EntityState] = Inbox(state=state, applied_seq=9, sent_seq=7)
    for seq in (11, 12):
        box.offer_event(_event(seq, 0.0))
    box.partners[11] = EntityState(np.ones(4, dtype=np.float32), 1.3e9)
    box.partners[12] = EntityState(None)
    box.derived = EntityState(np.zeros(4, dtype=np.float32), float("nan"))
    return box


def test_writes_what_the_codec_writes_and_reads_back_the_same_row() -> None:
    box = _box()
    expected = ROWS.encode(inbox_to_record(box, "v1"))
    assert inbox_row_bytes(WRITER, box, "v1") == expected
    back = inbox_from_record(ROWS.decode(expected), "user")
    assert ROWS.encode(inbox_to_record(back, "v1")) == expected


def test_an_equal_event_with_a_negative_zero_is_written_as_itself() -> None:
    box = _box()
    first = inbox_row_bytes(WRITER, box, "v1")
    box.waiting = {p.prev_seq: _event(p.seq, -0.0) for p in box.waiting.values()}
    # Packed, -0.0 and 0.0 are other bytes: no cache can take one event for the other.
    assert box.waiting[10] != _event(11, 0.0)
    written = inbox_row_bytes(WRITER, box, "v1")
    assert written != first
    assert written == ROWS.encode(inbox_to_record(box, "v1"))


def test_kept_waiting_encodings_write_the_same_rows_as_fresh_ones() -> None:
    """A row written again and again (events arriving, applied, evicted from the kept
    encodings) is each time what the Codec writes."""
    kept = WaitingBytes(most=4)
    box = _box()
    for seq in range(13, 23):
        box.offer_event(_event(seq, 0.5))
        if seq % 3 == 0:  # the oldest waiting event is applied: it leaves the row
            del box.waiting[min(box.waiting)]
        assert inbox_row_bytes(WRITER, box, "v1", kept) == ROWS.encode(inbox_to_record(box, "v1"))
        assert len(kept) <= 4


def test_a_queue_written_again_reuses_its_entries_and_follows_every_change() -> None:
    """``WaitingBytes.queue``: entries still waiting keep their bytes; a new, a replaced and
    an applied entry, a queue replaced by another dict and a queue emptied are each written
    as the Codec writes them."""
    kept = WaitingBytes(most_queues=2)
    box = _box()
    first = inbox_row_bytes(WRITER, box, "v1", kept)
    assert first == ROWS.encode(inbox_to_record(box, "v1"))
    encoded = kept.queue(box.waiting)
    assert all(a is b for a, b in zip(encoded, kept.queue(box.waiting), strict=True))
    for seq in range(13, 40):
        box.offer_event(_event(seq, 0.5))
        if seq % 4 == 0:
            del box.waiting[min(box.waiting)]
        assert inbox_row_bytes(WRITER, box, "v1", kept) == ROWS.encode(inbox_to_record(box, "v1"))
    # The same key, another event (another id): written as the new one.
    other = _event(max(box.waiting) + 1, 0.5)._replace(prev_seq=min(box.waiting))
    box.waiting[min(box.waiting)] = other._replace(payload=other.payload._replace(event_id="x"))
    assert inbox_row_bytes(WRITER, box, "v1", kept) == ROWS.encode(inbox_to_record(box, "v1"))
    # Applied entries are forgotten once they outnumber the queue.
    for prev in sorted(box.waiting)[:-1]:
        del box.waiting[prev]
    inbox_row_bytes(WRITER, box, "v1", kept)
    _, entries, encoded = kept._queues[id(box.waiting)]
    assert len(entries) == len(encoded) <= 2 * len(box.waiting) + 8
    # Other rows' queues: at most ``most_queues`` kept, an emptied one dropped at once.
    rows = [_box() for _ in range(3)]
    for row in rows:
        assert inbox_row_bytes(WRITER, row, "v1", kept) == ROWS.encode(inbox_to_record(row, "v1"))
    assert len(kept._queues) <= 2
    rows[-1].waiting.clear()
    assert inbox_row_bytes(WRITER, rows[-1], "v1", kept) == ROWS.encode(
        inbox_to_record(rows[-1], "v1")
    )
    assert id(rows[-1].waiting) not in kept._queues

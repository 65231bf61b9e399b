"""Table rows written directly (streams.records.inbox_row_bytes) against the Codec's."""

from __future__ import annotations

import numpy as np

from operators.protocol.exchange import Inbox, Pending
from operators.protocol.sides import EntityState, EventData
from schemas import Codec, wire
from schemas.codec import ENTITY_RECORD
from streams.records import WaitingBytes, inbox_from_record, inbox_row_bytes, inbox_to_record

ROWS = Codec(ENTITY_RECORD)
WRITER = wire.EntityRecordWriter(ROWS.header)


def _event(seq: int, zero: float) -> Pending:
    data = EventData(f"e{seq}", "u\u00e9", "i", 1.5e9 + seq, (zero, 0.25, -3.0))
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
    assert box.waiting[10] == _event(11, 0.0)  # equal, yet other bytes
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

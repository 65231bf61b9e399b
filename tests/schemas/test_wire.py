"""The router's direct Avro reader and writers against fastavro (through the Codec)."""

from __future__ import annotations

import copy
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas import (
    INTERACTION,
    SEQUENCED_INTERACTION,
    Codec,
    DecodeError,
    EncodeError,
    SchemaError,
    load_schema,
    wire,
)
from schemas.codec import ENTITY_RECORD, INBOX_MESSAGE, RECOMMENDATION

INTERACTIONS = Codec(INTERACTION)
SEQUENCED = Codec(SEQUENCED_INTERACTION)
INBOX = Codec(INBOX_MESSAGE)
HEADER = INTERACTIONS.header

# Values a float32 holds exactly, as every feature read from the wire is.
float32s = st.floats(width=32, allow_nan=False, allow_infinity=False)
longs = st.integers(-(2**63), 2**63 - 1)
events = st.fixed_dictionaries(
    {
        "event_id": st.text(max_size=80),
        "user_id": st.text(max_size=80),
        "item_id": st.text(max_size=80),
        "timestamp": st.floats(allow_nan=False),
        "features": st.lists(float32s, max_size=20),
        "state_label": st.none() | st.integers(-(2**31), 2**31 - 1),
    }
)


def _fields(record: dict[str, Any]) -> wire.Fields:
    return (
        record["event_id"],
        record["user_id"],
        record["item_id"],
        float(record["timestamp"]),
        tuple(float(x) for x in record["features"]),
        record["state_label"],
    )


def test_the_shipped_schemas_are_the_ones_it_was_written_for() -> None:
    assert wire.same_as_codecs(INTERACTIONS, SEQUENCED, INBOX)


def test_a_changed_schema_is_noticed() -> None:
    changed = copy.deepcopy(load_schema(SEQUENCED_INTERACTION))
    changed["fields"].insert(1, {"name": "shard", "type": "int", "default": 0})
    assert not wire.same_as_codecs(INTERACTIONS, Codec(changed), INBOX)


@settings(max_examples=300, deadline=None)
@given(events)
def test_reads_what_fastavro_writes(record: dict[str, Any]) -> None:
    data = INTERACTIONS.encode(record)
    fast = wire.read_interaction(data, len(HEADER))
    assert repr(fast) == repr(_fields(INTERACTIONS.decode(data)))


@settings(max_examples=300, deadline=None)
@given(events)
def test_passes_on_an_events_own_bytes_as_the_writers_would_write_them(
    record: dict[str, Any],
) -> None:
    """The core the router passes on is what it would have encoded from the fields."""
    data = INTERACTIONS.encode(record)
    read = wire.read_interaction_core(data, len(HEADER))
    assert read is not None
    fields, core = read
    assert core == wire.interaction_core(*fields[:5])


def test_an_event_written_otherwise_is_encoded_again() -> None:
    """Valid Avro in more bytes than the writers use: the same fields, and no core to pass on
    (the router encodes them, so its records stay byte for byte what fastavro writes)."""
    fields = ("e", "u", "i", 1.0, (1.0, 2.0))
    canonical = wire.interaction_core(*fields) + wire.optional_int(None)
    at = canonical.index(b"\x04")  # the features' block count (2)
    floats = struct.pack("<2f", 1.0, 2.0)
    two_blocks = canonical[:at] + b"\x02" + floats[:4] + b"\x02" + floats[4:] + b"\x00\x00"
    longer_count = canonical[:at] + b"\x84\x00" + canonical[at + 1 :]  # 2 in two varint bytes
    longer_id = b"\x82\x00" + canonical[1:]  # the event id's length, 1, in two bytes
    for body in (two_blocks, longer_count, longer_id):
        read = wire.read_interaction_core(body)
        assert read is not None
        assert read[0] == (*fields, None)
        assert read[1] is None
        assert _codec_fields(HEADER + body) == (*fields, None)
    assert wire.read_interaction_core(canonical) == ((*fields, None), canonical[:-1])


def _codec_fields(data: bytes) -> wire.Fields | None:
    try:
        return _fields(INTERACTIONS.decode(data))
    except (DecodeError, SchemaError):
        return None


@settings(max_examples=500, deadline=None)
@given(events, st.data())
def test_never_reads_a_damaged_message_otherwise_than_the_codec(
    record: dict[str, Any], data: st.DataObject
) -> None:
    """Whatever it returns for flipped, cut or extended bytes, the Codec returns too (where it
    returns None, the router asks the Codec)."""
    body = bytearray(INTERACTIONS.encode(record))
    how = data.draw(st.sampled_from(["flip", "cut", "extend", "splice"]))
    if how == "flip" and len(body) > len(HEADER):
        at = data.draw(st.integers(len(HEADER), len(body) - 1))
        body[at] = data.draw(st.integers(0, 255))
    elif how == "cut":
        del body[data.draw(st.integers(len(HEADER), len(body))) :]
    elif how == "extend":
        body += data.draw(st.binary(min_size=1, max_size=12))
    else:
        at = data.draw(st.integers(len(HEADER), len(body)))
        body[at:at] = data.draw(st.binary(min_size=1, max_size=12))
    fast = wire.read_interaction(bytes(body), len(HEADER))
    if fast is not None:
        # repr: NaN (a flipped bit may make one) equals itself there, and -0.0 is not 0.0.
        assert repr(fast) == repr(_codec_fields(bytes(body)))


def test_refuses_what_it_does_not_read_exactly() -> None:
    good = INTERACTIONS.encode(
        {
            "event_id": "e",
            "user_id": "u",
            "item_id": "i",
            "timestamp": 1.0,
            "features": [1.0, 2.0],
            "state_label": None,
        }
    )
    body = good[len(HEADER) :]
    at = body.index(b"\x04")  # the features' block count (2)
    # The same array as one block with its byte size (a negative count): valid Avro, which
    # only the Codec reads.
    sized = body[:at] + b"\x03\x10" + struct.pack("<2f", 1.0, 2.0) + body[at + 9 :]
    assert wire.read_interaction(sized) is None
    assert _codec_fields(HEADER + sized) == ("e", "u", "i", 1.0, (1.0, 2.0), None)
    assert wire.read_interaction(body + b"\x00") is None  # trailing bytes
    assert wire.read_interaction(body[:-1]) is None  # cut short
    assert wire.read_interaction(b"\x02\xff" + body[2:]) is None  # not UTF-8
    assert wire.read_interaction(b"\xff" * 11 + b"\x01" + body[2:]) is None  # a long past 64 bits


@settings(max_examples=300, deadline=None)
@given(
    events,
    longs,
    longs,
    longs,
    st.none() | st.floats(allow_nan=False),
    st.none() | st.floats(allow_nan=False),
    st.text(max_size=20),
    longs,
)
def test_writes_what_fastavro_writes(
    record: dict[str, Any],
    seq: int,
    prev_user: int,
    prev_item: int,
    user_time: float | None,
    item_time: float | None,
    version: str,
    since: int,
) -> None:
    core = wire.interaction_core(*_fields(record)[:5])
    stamp = wire.stamp_bytes(version, since)
    s, u, i = wire.long_bytes(seq), wire.long_bytes(prev_user), wire.long_bytes(prev_item)
    log = wire.SequencedWriter(SEQUENCED.header).record(
        s, u, i, user_time, item_time, core, record["state_label"], stamp
    )
    assert log == SEQUENCED.encode(
        {
            "seq": seq,
            "prev_user_seq": prev_user,
            "prev_item_seq": prev_item,
            "prev_user_time": user_time,
            "prev_item_time": item_time,
            "interaction": record,
            "model_version": version,
            "model_since": since,
        }
    )
    event = {k: v for k, v in record.items() if k != "state_label"}
    message = wire.InboxWriter(INBOX.header).event(s, u, i, core, stamp)
    assert message == INBOX.encode(
        {
            "event": {"seq": seq, "prev_seq": prev_user, "partner_prev_seq": prev_item, **event},
            "partner": None,
            "model_version": version,
            "model_since": since,
        }
    )


RECOMMENDATIONS = Codec(RECOMMENDATION)
partners = st.fixed_dictionaries(
    {
        "seq": longs,
        "embedding": st.none() | st.binary(max_size=64),
        "last_time": st.none() | st.floats(allow_nan=False),
    }
)
inbox_events = st.fixed_dictionaries(
    {
        "seq": longs,
        "prev_seq": longs,
        "partner_prev_seq": longs,
        "event_id": st.text(max_size=40),
        "user_id": st.text(max_size=40),
        "item_id": st.text(max_size=40),
        "timestamp": st.floats(allow_nan=False),
        "features": st.lists(float32s, max_size=20),
    }
)
inbox_messages = st.one_of(
    st.fixed_dictionaries(
        {
            "event": inbox_events,
            "partner": st.none(),
            "model_version": st.text(max_size=20),
            "model_since": longs,
        }
    ),
    st.fixed_dictionaries(
        {
            "event": st.none(),
            "partner": partners,
            "model_version": st.text(max_size=20),
            "model_since": longs,
        }
    ),
)


@settings(max_examples=300, deadline=None)
@given(inbox_messages)
def test_reads_inbox_messages_as_the_codec(message: dict[str, Any]) -> None:
    data = INBOX.encode(message)
    fast = wire.read_inbox_message(data, len(INBOX.header))
    assert fast is not None
    assert repr(fast) == repr(INBOX.decode(data))
    # The worker's form: the same, with the event's features as their packed floats.
    packed = wire.read_inbox_message(data, len(INBOX.header), packed_features=True)
    assert packed is not None and (packed["event"] is None) == (fast["event"] is None)
    if fast["event"] is not None:
        features = packed["event"].pop("features")
        assert isinstance(features, bytes)
        assert features == struct.pack(
            f"<{len(fast['event']['features'])}f", *message["event"]["features"]
        )
        fast["event"].pop("features")
    assert repr(packed) == repr(fast)


def test_packed_features_are_written_as_the_floats_they_pack() -> None:
    values = [0.5, -0.0, 3e38, -1.25]
    packed = struct.pack("<4f", *values)
    # Avro: a block of 4 (zig-zag 8), the floats, then the empty block.
    assert wire.float_array(packed) == wire.float_array(values) == b"\x08" + packed + b"\x00"
    assert wire.float_array(b"") == wire.float_array([]) == b"\x00"
    with pytest.raises(ValueError, match="4 bytes each"):
        wire.float_array(packed[:-1])


@settings(max_examples=300, deadline=None)
@given(inbox_messages)
def test_peeks_at_an_inbox_messages_event_seq(message: dict[str, Any]) -> None:
    """What the worker reads a backlog in the order of: the event's seq, without decoding."""
    data = INBOX.encode(message)
    seq = wire.inbox_event_seq(data, len(INBOX.header))
    assert seq == (None if message["event"] is None else message["event"]["seq"])


def test_peeks_at_nothing_in_what_is_not_an_inbox_message() -> None:
    assert wire.inbox_event_seq(b"") is None
    assert wire.inbox_event_seq(b"\x02") is None  # cut short
    assert wire.inbox_event_seq(b"\x04\x02") is None  # no such union branch
    assert wire.inbox_event_seq(b"\x02" + b"\xff" * 11) is None  # past 64 bits


def _codec_inbox(data: bytes) -> dict[str, Any] | None:
    try:
        return INBOX.decode(data)
    except (DecodeError, SchemaError):
        return None


@settings(max_examples=500, deadline=None)
@given(inbox_messages, st.data())
def test_never_reads_a_damaged_inbox_message_otherwise_than_the_codec(
    message: dict[str, Any], data: st.DataObject
) -> None:
    body = bytearray(INBOX.encode(message))
    start = len(INBOX.header)
    how = data.draw(st.sampled_from(["flip", "cut", "extend"]))
    if how == "flip":
        at = data.draw(st.integers(start, len(body) - 1))
        body[at] = data.draw(st.integers(0, 255))
    elif how == "cut":
        del body[data.draw(st.integers(start, len(body))) :]
    else:
        body += data.draw(st.binary(min_size=1, max_size=12))
    fast = wire.read_inbox_message(bytes(body), start)
    if fast is not None:
        assert repr(fast) == repr(_codec_inbox(bytes(body)))


def test_refuses_an_inbox_message_it_does_not_read_exactly() -> None:
    message = {
        "event": None,
        "partner": {"seq": 3, "embedding": b"\x01\x02", "last_time": 2.0},
        "model_version": "v",
        "model_since": 7,
    }
    body = INBOX.encode(message)[len(INBOX.header) :]
    assert wire.read_inbox_message(body) == message
    assert wire.read_inbox_message(body + b"\x00") is None  # trailing bytes
    assert wire.read_inbox_message(body[:-1]) is None  # cut short
    assert wire.read_inbox_message(b"\x04" + body[1:]) is None  # no such union branch


recommendations = st.fixed_dictionaries(
    {
        "user_id": st.text(max_size=40),
        "event_id": st.text(max_size=40),
        "item_id": st.text(max_size=40),
        "timestamp": st.floats(allow_nan=False),
        "model_version": st.text(max_size=20),
        "projected_user": st.just([]),
        "predicted_item": st.just([]),
        "projected_user_f32": st.none() | st.binary(max_size=64),
        "predicted_item_f32": st.none() | st.binary(max_size=64),
        "candidates": st.lists(
            st.fixed_dictionaries(
                {
                    "item_id": st.text(max_size=20),
                    "score": st.floats(allow_nan=False, min_value=-1e30, max_value=1e30),
                }
            ),
            max_size=30,
        ),
        "state_change_probability": st.none() | st.floats(0.0, 1.0),
    }
)


def test_the_recommendation_schema_is_the_one_it_was_written_for() -> None:
    assert wire.same_as_recommendation_codec(RECOMMENDATIONS)
    changed = copy.deepcopy(load_schema(RECOMMENDATION))
    changed["fields"].insert(1, {"name": "shard", "type": "int", "default": 0})
    assert not wire.same_as_recommendation_codec(Codec(changed))


@settings(max_examples=300, deadline=None)
@given(recommendations)
def test_writes_recommendations_as_fastavro(record: dict[str, Any]) -> None:
    written = wire.RecommendationWriter(RECOMMENDATIONS.header).record(
        record["user_id"],
        record["event_id"],
        record["item_id"],
        record["timestamp"],
        record["model_version"],
        record["projected_user_f32"],
        record["predicted_item_f32"],
        [c["item_id"] for c in record["candidates"]],
        [c["score"] for c in record["candidates"]],
        record["state_change_probability"],
    )
    assert written == RECOMMENDATIONS.encode(record)


ROWS = Codec(ENTITY_RECORD)
ROW_HEADER = ROWS.header
seqs = st.integers(-1, 2**40)
partner_states = st.fixed_dictionaries(
    {
        "seq": seqs,
        "embedding": st.none() | st.binary(max_size=64),
        "last_time": st.none() | st.floats(),
    }
)
inbox_events = st.fixed_dictionaries(
    {
        "seq": seqs,
        "prev_seq": seqs,
        "partner_prev_seq": seqs,
        "event_id": st.text(max_size=40),
        "user_id": st.text(max_size=40),
        "item_id": st.text(max_size=40),
        "timestamp": st.floats(allow_nan=False),
        "features": st.lists(float32s, max_size=8),
    }
)
rows = st.fixed_dictionaries(
    {
        "embedding": st.none() | st.binary(max_size=128),
        "last_time": st.none() | st.floats(),
        "history": st.lists(st.text(max_size=20), max_size=12),
        "history_counts": st.lists(longs, max_size=12),
        "count": longs,
        "trend": st.floats(),
        "applied_seq": longs,
        "sent_seq": longs,
        "waiting": st.lists(inbox_events, max_size=4),
        "partners": st.lists(partner_states, max_size=4),
        "derived": st.none() | partner_states,
        "model_version": st.text(max_size=20),
    }
)


def _partner(p: dict[str, Any]) -> bytes:
    return wire.partner_bytes(p["seq"], p["embedding"], p["last_time"])


def _written_row(row: dict[str, Any]) -> bytes:
    waiting = [
        wire.inbox_event_bytes(
            w["seq"],
            w["prev_seq"],
            w["partner_prev_seq"],
            wire.interaction_core(
                w["event_id"], w["user_id"], w["item_id"], w["timestamp"], w["features"]
            ),
        )
        for w in row["waiting"]
    ]
    return wire.EntityRecordWriter(ROW_HEADER).record(
        row["embedding"],
        row["last_time"],
        row["history"],
        row["history_counts"],
        row["count"],
        row["trend"],
        row["applied_seq"],
        row["sent_seq"],
        waiting,
        [_partner(p) for p in row["partners"]],
        None if row["derived"] is None else _partner(row["derived"]),
        row["model_version"],
    )


def test_the_entity_record_schema_is_the_one_it_was_written_for() -> None:
    assert wire.same_as_entity_record_codec(ROWS)
    changed = copy.deepcopy(load_schema(ENTITY_RECORD))
    changed["fields"].insert(1, {"name": "shard", "type": "int", "default": 0})
    assert not wire.same_as_entity_record_codec(Codec(changed))


@settings(max_examples=300, deadline=None)
@given(rows)
def test_writes_and_reads_rows_as_fastavro(row: dict[str, Any]) -> None:
    data = ROWS.encode(row)
    assert _written_row(row) == data
    # repr: NaN equals itself there, and -0.0 is not 0.0.
    assert repr(wire.read_entity_record(data, len(ROW_HEADER))) == repr(ROWS.decode(data))
    packed = wire.read_entity_record(data, len(ROW_HEADER), packed_features=True)
    assert packed is not None
    for event, original in zip(packed["waiting"], row["waiting"], strict=True):
        assert event.pop("features") == struct.pack(
            f"<{len(original['features'])}f", *original["features"]
        )
    plain = ROWS.decode(data)
    for event in plain["waiting"]:
        event.pop("features")
    assert repr(packed) == repr(plain)


def _codec_row(data: bytes) -> dict[str, Any] | None:
    try:
        return ROWS.decode(data)
    except (DecodeError, SchemaError):
        return None


@settings(max_examples=500, deadline=None)
@given(rows, st.data())
def test_never_reads_a_damaged_row_otherwise_than_the_codec(
    row: dict[str, Any], data: st.DataObject
) -> None:
    body = bytearray(ROWS.encode(row))
    how = data.draw(st.sampled_from(["flip", "cut", "extend", "splice"]))
    if how == "flip" and len(body) > len(ROW_HEADER):
        at = data.draw(st.integers(len(ROW_HEADER), len(body) - 1))
        body[at] = data.draw(st.integers(0, 255))
    elif how == "cut":
        del body[data.draw(st.integers(len(ROW_HEADER), len(body))) :]
    elif how == "extend":
        body += data.draw(st.binary(min_size=1, max_size=12))
    else:
        at = data.draw(st.integers(len(ROW_HEADER), len(body)))
        body[at:at] = data.draw(st.binary(min_size=1, max_size=12))
    fast = wire.read_entity_record(bytes(body), len(ROW_HEADER))
    if fast is not None:
        assert repr(fast) == repr(_codec_row(bytes(body)))


def test_refuses_a_long_beyond_64_bits_as_the_codec_does() -> None:
    """Rather than write a varint no reader takes (the worker then asks the Codec, which
    refuses it too, as an EncodeError)."""
    row = {
        "embedding": None,
        "last_time": None,
        "history": [],
        "history_counts": [2**63],
        "count": 0,
        "trend": 0.0,
        "applied_seq": 0,
        "sent_seq": 0,
        "waiting": [],
        "partners": [],
        "derived": None,
        "model_version": "",
    }
    with pytest.raises(EncodeError, match="EntityRecord"):
        ROWS.encode(row)
    with pytest.raises(OverflowError):
        _written_row(row)


sequenced_records = st.fixed_dictionaries(
    {
        "seq": longs,
        "prev_user_seq": longs,
        "prev_item_seq": longs,
        "prev_user_time": st.none() | st.floats(),
        "prev_item_time": st.none() | st.floats(),
        "interaction": events,
        "model_version": st.text(max_size=20),
        "model_since": longs,
    }
)


def _sequenced_ids(data: bytes) -> tuple[int, str, str] | None:
    try:
        record = SEQUENCED.decode(data)
    except (DecodeError, SchemaError):
        return None
    return record["seq"], record["interaction"]["user_id"], record["interaction"]["item_id"]


def test_the_sequenced_schema_is_the_one_the_log_reader_was_written_for() -> None:
    assert wire.same_as_sequenced_codec(SEQUENCED)
    changed = copy.deepcopy(load_schema(SEQUENCED_INTERACTION))
    changed["fields"].insert(1, {"name": "shard", "type": "int", "default": 0})
    assert not wire.same_as_sequenced_codec(Codec(changed))


@settings(max_examples=300, deadline=None)
@given(sequenced_records)
def test_reads_the_log_ids_fastavro_reads(record: dict[str, Any]) -> None:
    data = SEQUENCED.encode(record)
    assert wire.read_sequenced_ids(data, len(SEQUENCED.header)) == _sequenced_ids(data)


@settings(max_examples=500, deadline=None)
@given(sequenced_records, st.data())
def test_never_reads_a_damaged_log_record_otherwise_than_the_codec(
    record: dict[str, Any], data: st.DataObject
) -> None:
    header = SEQUENCED.header
    body = bytearray(SEQUENCED.encode(record))
    how = data.draw(st.sampled_from(["flip", "cut", "extend", "splice"]))
    if how == "flip" and len(body) > len(header):
        at = data.draw(st.integers(len(header), len(body) - 1))
        body[at] = data.draw(st.integers(0, 255))
    elif how == "cut":
        del body[data.draw(st.integers(len(header), len(body))) :]
    elif how == "extend":
        body += data.draw(st.binary(min_size=1, max_size=12))
    else:
        at = data.draw(st.integers(len(header), len(body)))
        body[at:at] = data.draw(st.binary(min_size=1, max_size=12))
    fast = wire.read_sequenced_ids(bytes(body), len(header))
    if fast is not None:
        assert fast == _sequenced_ids(bytes(body))

"""The router's direct Avro reader and writers against fastavro (through the Codec)."""

from __future__ import annotations

import copy
import struct
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from schemas import (
    INTERACTION,
    SEQUENCED_INTERACTION,
    Codec,
    DecodeError,
    SchemaError,
    load_schema,
    wire,
)
from schemas.codec import INBOX_MESSAGE

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

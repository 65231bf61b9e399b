"""The hot records in Avro binary, read and written directly, without fastavro: the router's
and the worker's (inbox messages in, recommendations out).

Why: fastavro spends 13-30 µs on each small record (a schema check per call, generic
dispatch per field, and a union's branch found by validating the record against it), and the
router reads one record and writes three per event: about 100 µs of an event's budget,
which at 20,000 events/s is 50 µs in all. The records are fixed and few, so they are written
out here field by field (Avro 1.11 specification, "Binary Encoding": zig-zag varint longs,
little-endian IEEE floats and doubles, length-prefixed UTF-8 strings, a union as its branch
index then the value, an array as counted blocks ending with an empty one).

fastavro stays the reference and the fallback:

- ``read_interaction`` takes only what it reads exactly as fastavro does (the body of an
  Interaction written with this package's schema, arrays in non-negative blocks, varints of
  at most 64 bits, nothing after the record) and returns None for anything else; the caller
  then decodes with ``schemas.codec.Codec``, which accepts the other writer schemas and
  names what is wrong with a bad message. tests/schemas/test_wire.py checks, against
  fastavro, that whatever it returns is what the Codec returns.
- ``SequencedWriter`` and ``InboxWriter`` write byte for byte what fastavro writes for
  ``SEQUENCED_INTERACTION`` and ``INBOX_MESSAGE`` (tested, and checked again by
  ``same_as_codecs`` before the router uses them: a schema changed without this module
  makes the router fall back to the Codec instead of writing the old layout).
- The worker reads each inbox message (``read_inbox_message``, the same contract as
  ``read_interaction``: a dict equal to the Codec's, or None) and writes a recommendation
  per user event (``RecommendationWriter``, checked by ``same_as_recommendation_codec``).
- The worker's co-occurrence feed reads the log's (seq, user, item) from each sequenced
  record (``read_sequenced_ids``, the same contract).
- Table rows (``ENTITY_RECORD``) go the same way: the worker writes every row a batch
  changed (``EntityRecordWriter``, checked by ``same_as_entity_record_codec``) and reads
  rows back from RocksDB (``read_entity_record``, a dict equal to the Codec's, or None).

>>> body = interaction_core("e1", "u", "i", 2.5, ()) + optional_int(None)
>>> read_interaction(body)
('e1', 'u', 'i', 2.5, (), None)
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from schemas.codec import Codec

_DOUBLE = struct.Struct("<d")
_FLOAT = struct.Struct("<f")
_ONE_BYTE = [bytes((b,)) for b in range(128)]
_NULL = b"\x00"  # a union's branch 0 (null), and an empty array's closing block
_BRANCH_1 = b"\x02"  # a union's branch 1: zig-zag of 1
_UINT64 = 1 << 64

Fields = tuple[str, str, str, float, tuple[float, ...], int | None]


def long_bytes(n: int) -> bytes:
    """An Avro long (or int): zig-zag, then a little-endian base-128 varint.

    >>> [long_bytes(n).hex() for n in (0, -1, 1, 63, 64, -65, 300, 2**20, -(2**63))]
    ['00', '01', '02', '7e', '8001', '8101', 'd804', '80808001', 'ffffffffffffffffff01']
    """
    z = (n << 1) ^ (n >> 63)
    # Sequence numbers take 1-4 bytes for the first 134 million events: unrolled.
    if z < 0x80:
        return _ONE_BYTE[z]
    if z < 0x4000:
        return bytes((z & 0x7F | 0x80, z >> 7))
    if z < 0x200000:
        return bytes((z & 0x7F | 0x80, (z >> 7) & 0x7F | 0x80, z >> 14))
    if z < 0x10000000:
        return bytes((z & 0x7F | 0x80, (z >> 7) & 0x7F | 0x80, (z >> 14) & 0x7F | 0x80, z >> 21))
    if z >= _UINT64:  # beyond a long: fastavro refuses it, and so does this
        raise OverflowError(f"{n} does not fit an Avro long")
    out = bytearray()
    while z >= 0x80:
        out.append((z & 0x7F) | 0x80)
        z >>= 7
    out.append(z)
    return bytes(out)


def string_bytes(s: str) -> bytes:
    data = s.encode()
    return long_bytes(len(data)) + data


def optional_double(x: float | None) -> bytes:
    """``["null", "double"]``."""
    return _NULL if x is None else _BRANCH_1 + _DOUBLE.pack(x)


def optional_int(x: int | None) -> bytes:
    """``["null", "int"]``."""
    return _NULL if x is None else _BRANCH_1 + long_bytes(x)


def float_array(values: Sequence[float] | bytes) -> bytes:
    """``{"type": "array", "items": "float"}`` as fastavro writes it: one block, then 0.
    ``values`` may be packed already (little-endian floats, as ``_packed_core_at`` reads
    them): they are then written as they are."""
    if isinstance(values, bytes):
        if len(values) % 4:
            raise ValueError(f"packed floats take 4 bytes each, not {len(values)} in all")
        n, body = len(values) // 4, values
    else:
        n = len(values)
        body = struct.pack(f"<{n}f", *values)
    if n == 0:
        return _NULL
    return long_bytes(n) + body + _NULL


def interaction_core(
    event_id: str, user_id: str, item_id: str, timestamp: float, features: Sequence[float] | bytes
) -> bytes:
    """The fields an Interaction and an InboxEvent share, in the order both declare them
    (``event_id, user_id, item_id, timestamp, features``): written once per event, it is a
    part of each of the router's three records."""
    return b"".join(
        (
            string_bytes(event_id),
            string_bytes(user_id),
            string_bytes(item_id),
            _DOUBLE.pack(timestamp),
            float_array(features),
        )
    )


def stamp_bytes(model_version: str, model_since: int) -> bytes:
    """The two fields both records end with (the epoch): written once per batch."""
    return string_bytes(model_version) + long_bytes(model_since)


class SequencedWriter:
    """``SEQUENCED_INTERACTION`` records behind a framing ``header`` (the codec's)."""

    def __init__(self, header: bytes) -> None:
        self.header = header

    def record(
        self,
        seq: bytes,
        prev_user_seq: bytes,
        prev_item_seq: bytes,
        prev_user_time: float | None,
        prev_item_time: float | None,
        core: bytes,
        state_label: int | None,
        stamp: bytes,
    ) -> bytes:
        """``seq`` and the two links as ``long_bytes`` wrote them (an event's three records
        share them); ``core``: ``interaction_core``; ``stamp``: ``stamp_bytes``."""
        return b"".join(
            (
                self.header,
                seq,
                prev_user_seq,
                prev_item_seq,
                optional_double(prev_user_time),
                optional_double(prev_item_time),
                core,
                optional_int(state_label),
                stamp,
            )
        )


class InboxWriter:
    """``INBOX_MESSAGE`` records carrying an event (``partner`` null) behind ``header``."""

    def __init__(self, header: bytes) -> None:
        self.header = header + _BRANCH_1  # the ``event`` union's record branch

    def event(
        self, seq: bytes, prev_seq: bytes, partner_prev_seq: bytes, core: bytes, stamp: bytes
    ) -> bytes:
        """The longs as ``long_bytes`` wrote them, as in ``SequencedWriter.record``."""
        return b"".join((self.header, seq, prev_seq, partner_prev_seq, core, _NULL, stamp))


def _long_at(data: bytes, i: int) -> tuple[int, int]:
    """The long at ``data[i:]`` and the index after it; ValueError past 64 bits (where
    readers differ: fastavro's arithmetic is C's)."""
    byte = data[i]
    if byte < 0x80:
        return (byte >> 1) ^ -(byte & 1), i + 1
    n, shift = byte & 0x7F, 7
    i += 1
    while True:
        byte = data[i]
        i += 1
        n |= (byte & 0x7F) << shift
        if byte < 0x80:
            break
        shift += 7
        if shift > 63:
            raise ValueError("varint longer than 10 bytes")
    if n >= _UINT64:
        raise ValueError("varint beyond 64 bits")
    return (n >> 1) ^ -(n & 1), i


class _Refused(Exception):
    """What the direct readers leave to the Codec."""


def _string_at(data: bytes, i: int) -> tuple[str, int]:
    n = data[i]
    if n < 0x80:  # a length under 64 (always, for valid ids under 64 bytes)
        n, i = (n >> 1) ^ -(n & 1), i + 1
    else:
        n, i = _long_at(data, i)
    end = i + n
    if n < 0 or end > len(data):
        raise _Refused
    return data[i:end].decode(), end


def _core_at(data: bytes, i: int) -> tuple[str, str, str, float, tuple[float, ...], int]:
    """``interaction_core``'s fields at ``data[i:]`` and the index after them."""
    event_id, user_id, item_id, timestamp, packed, i = _packed_core_at(data, i)
    return event_id, user_id, item_id, timestamp, _floats(packed), i


def _packed_core_at(data: bytes, i: int) -> tuple[str, str, str, float, bytes, int]:
    """``_core_at`` with the features as they are on the wire: packed little-endian floats
    (``operators.protocol.sides.EventData.features``), the array's blocks joined."""
    event_id, i = _string_at(data, i)
    user_id, i = _string_at(data, i)
    item_id, i = _string_at(data, i)
    (timestamp,) = _DOUBLE.unpack_from(data, i)
    i += 8
    features = b""
    count, i = _long_at(data, i)
    while count != 0:
        if count < 0 or i + 4 * count > len(data):
            raise _Refused  # a block with its byte size, or a truncated one: the Codec's
        features += data[i : i + 4 * count]
        i += 4 * count
        count, i = _long_at(data, i)
    return event_id, user_id, item_id, timestamp, features, i


def _floats(packed: bytes) -> tuple[float, ...]:
    """Packed little-endian floats as a tuple (``struct`` caches the compiled format)."""
    return struct.unpack(f"<{len(packed) // 4}f", packed)


def read_interaction(data: bytes, start: int = 0) -> Fields | None:
    """The Interaction written (with this package's schema) in ``data[start:]``, as
    ``(event_id, user_id, item_id, timestamp, features, state_label)``; None for anything
    it does not take (module doc), which the Codec then decodes or refuses."""
    read = read_interaction_core(data, start)
    return None if read is None else read[0]


def _core_size(event_id: str, user_id: str, item_id: str, n_features: int) -> int:
    """The length of what ``interaction_core`` writes for these fields."""
    size = 8 + (len(long_bytes(n_features)) + 4 * n_features + 1 if n_features else 1)
    for text in (event_id, user_id, item_id):
        n = len(text) if text.isascii() else len(text.encode())
        size += n + (1 if n < 64 else len(long_bytes(n)))
    return size


def read_interaction_core(data: bytes, start: int = 0) -> tuple[Fields, bytes | None] | None:
    """``read_interaction``, and the bytes of the record's ``interaction_core`` part as they
    are in ``data`` when they are byte for byte what ``interaction_core`` writes for its
    fields, else None (the same values written otherwise: an array in several blocks, a
    varint longer than it needs). The router then passes an event's own bytes on to its
    three records instead of encoding the fields again: 1.1 µs of an event's ~20 µs without
    features, 2.9 µs with 172, where checking the length costs 0.3 and 0.5. An encoding
    differs from the shortest only by taking more bytes, so comparing the lengths tells
    which. (A NaN keeps its own bits here, where decoding and encoding again may quiet it;
    the router refuses events with one.)"""
    size = len(data)
    try:
        event_id, user_id, item_id, timestamp, packed, i = _packed_core_at(data, start)
        core_end = i
        branch, i = _long_at(data, i)
        label: int | None = None
        if branch == 1:
            label, i = _long_at(data, i)
        elif branch != 0:
            return None
    except (IndexError, ValueError, struct.error, _Refused):  # UnicodeDecodeError: ValueError
        return None
    if i != size:
        return None
    fields = event_id, user_id, item_id, timestamp, _floats(packed), label
    n = len(packed) // 4
    core = data[start:core_end] if core_end - start == _core_size(*fields[:3], n) else None
    return fields, core


def read_sequenced_ids(data: bytes, start: int = 0) -> tuple[int, str, str] | None:
    """``(seq, user_id, item_id)`` of the SequencedInteraction written (with this package's
    schema) in ``data[start:]``, the whole record checked as ``read_interaction`` checks one;
    None for anything it does not take, which the Codec then decodes or refuses."""
    try:
        seq, i = _long_at(data, start)
        _prev_user_seq, i = _long_at(data, i)
        _prev_item_seq, i = _long_at(data, i)
        for _ in range(2):  # prev_user_time, prev_item_time: ["null", "double"]
            branch, i = _long_at(data, i)
            if branch == 1:
                _DOUBLE.unpack_from(data, i)  # 8 bytes must be there
                i += 8
            elif branch != 0:
                return None
        _event_id, user_id, item_id, _timestamp, _features, i = _core_at(data, i)
        branch, i = _long_at(data, i)  # state_label: ["null", "int"]
        if branch == 1:
            label, i = _long_at(data, i)
            if not -(2**31) <= label < 2**31:
                return None  # an int out of range: what fastavro makes of it is its own
        elif branch != 0:
            return None
        _model_version, i = _string_at(data, i)
        _model_since, i = _long_at(data, i)
    except (IndexError, ValueError, struct.error, _Refused):  # UnicodeDecodeError: ValueError
        return None
    if i != len(data):
        return None
    return seq, user_id, item_id


def read_inbox_message(
    data: bytes, start: int = 0, packed_features: bool = False
) -> dict[str, Any] | None:
    """The InboxMessage written (with this package's schema) in ``data[start:]``, as the
    Codec decodes it; None for anything it does not take, as ``read_interaction``. With
    ``packed_features`` the event's features are its packed bytes instead of a list (all the
    worker needs: ``operators.protocol.sides.EventData``)."""
    size = len(data)
    try:
        branch, i = _long_at(data, start)
        event: dict[str, Any] | None = None
        if branch == 1:
            event, i = _inbox_event_at(data, i, packed_features)
        elif branch != 0:
            return None
        branch, i = _long_at(data, i)
        partner: dict[str, Any] | None = None
        if branch == 1:
            partner, i = _partner_at(data, i)
        elif branch != 0:
            return None
        model_version, i = _string_at(data, i)
        model_since, i = _long_at(data, i)
    except (IndexError, ValueError, struct.error, _Refused):  # UnicodeDecodeError: ValueError
        return None
    if i != size:
        return None
    return {
        "event": event,
        "partner": partner,
        "model_version": model_version,
        "model_since": model_since,
    }


def bytes_field(data: bytes) -> bytes:
    """``"bytes"``: its length, then the bytes."""
    return long_bytes(len(data)) + data


def optional_float(x: float | None) -> bytes:
    """``["null", "float"]`` (OverflowError beyond float32's range, where fastavro writes inf:
    the caller then asks the Codec)."""
    return _NULL if x is None else _BRANCH_1 + _FLOAT.pack(x)


#: Candidates are drawn from one catalogue over and over: their encoded ids are kept.
_item_bytes = lru_cache(maxsize=1 << 16)(string_bytes)


class RecommendationWriter:
    """``RECOMMENDATION`` records (the packed-vector version) behind ``header``."""

    def __init__(self, header: bytes) -> None:
        self.header = header

    def record(
        self,
        user_id: str,
        event_id: str,
        item_id: str,
        timestamp: float,
        model_version: str,
        projected: bytes | None,
        predicted: bytes | None,
        ids: Sequence[str],
        scores: Sequence[float],
        state_change_probability: float | None,
    ) -> bytes:
        """One record; the float32 vectors as packed bytes, the candidates as their items
        ``ids`` and ``scores`` (as long as each other)."""
        parts = [
            self.header,
            string_bytes(user_id),
            string_bytes(event_id),
            string_bytes(item_id),
            _DOUBLE.pack(timestamp),
            string_bytes(model_version),
            _NULL,  # projected_user: empty since the packed vectors
            _NULL,  # predicted_item
            _NULL if projected is None else _BRANCH_1 + bytes_field(projected),
            _NULL if predicted is None else _BRANCH_1 + bytes_field(predicted),
        ]
        if ids:
            parts.append(long_bytes(len(ids)))
            parts += [
                _item_bytes(item) + _FLOAT.pack(score)
                for item, score in zip(ids, scores, strict=True)
            ]
        parts.append(_NULL)
        parts.append(optional_float(state_change_probability))
        return b"".join(parts)


def same_as_recommendation_codec(codec: Codec) -> bool:
    """Whether ``RecommendationWriter`` writes what ``codec`` does (its schema is the one it
    was written for), checked on a sample record."""
    record = {
        "user_id": "u-\u00e9",
        "event_id": "e",
        "item_id": "i",
        "timestamp": 1.5e9,
        "model_version": "v1",
        "projected_user": [],
        "predicted_item": [],
        "projected_user_f32": b"\x00\x00\x80?",
        "predicted_item_f32": None,
        "candidates": [{"item_id": "a", "score": -0.25}, {"item_id": "b", "score": -1.5}],
        "state_change_probability": 0.5,
    }
    written = RecommendationWriter(codec.header).record(
        "u-\u00e9", "e", "i", 1.5e9, "v1", b"\x00\x00\x80?", None, ["a", "b"], [-0.25, -1.5], 0.5
    )
    return written == codec.encode(record)


def same_as_sequenced_codec(codec: Codec) -> bool:
    """Whether ``read_sequenced_ids`` reads what ``codec`` writes, on a sample record."""
    record = {
        "seq": 70_001,
        "prev_user_seq": -1,
        "prev_item_seq": 3,
        "prev_user_time": None,
        "prev_item_time": 1.4e9,
        "interaction": {
            "event_id": "e",
            "user_id": "u-\u00e9",
            "item_id": "i",
            "timestamp": 1.5e9,
            "features": [0.5],
            "state_label": 1,
        },
        "model_version": "v1",
        "model_since": 70_000,
    }
    data = codec.encode(record)
    return read_sequenced_ids(data, len(codec.header)) == (70_001, "u-\u00e9", "i")


def same_as_codecs(interaction: Codec, sequenced: Codec, inbox: Codec) -> bool:
    """Whether this module reads and writes what the three codecs do (their schemas are the
    ones it was written for), checked on a sample record of each."""
    event = {
        "event_id": "e-\u00e9",
        "user_id": "u",
        "item_id": "i",
        "timestamp": 1.5e9,
        "features": [0.5, -2.0],
        "state_label": 1,
    }
    fields = ("e-\u00e9", "u", "i", 1.5e9, (0.5, -2.0), 1)
    data = interaction.encode(event)
    header = interaction.header
    if not data.startswith(header) or read_interaction(data, len(header)) != fields:
        return False
    core = interaction_core(*fields[:5])
    stamp = stamp_bytes("v1", 70_000)
    log = {
        "seq": 70_001,
        "prev_user_seq": -1,
        "prev_item_seq": 3,
        "prev_user_time": None,
        "prev_item_time": 1.4e9,
        "interaction": event,
        "model_version": "v1",
        "model_since": 70_000,
    }
    seq, first, prev = long_bytes(70_001), long_bytes(-1), long_bytes(3)
    written = SequencedWriter(sequenced.header).record(
        seq, first, prev, None, 1.4e9, core, 1, stamp
    )
    if written != sequenced.encode(log):
        return False
    message = {
        "event": {
            "seq": 70_001,
            "prev_seq": 3,
            "partner_prev_seq": -1,
            **{k: v for k, v in event.items() if k != "state_label"},
        },
        "partner": None,
        "model_version": "v1",
        "model_since": 70_000,
    }
    return InboxWriter(inbox.header).event(seq, prev, first, core, stamp) == inbox.encode(message)


def inbox_event_bytes(seq: int, prev_seq: int, partner_prev_seq: int, core: bytes) -> bytes:
    """An ``InboxEvent`` record (a row's waiting event); ``core``: ``interaction_core``."""
    return long_bytes(seq) + long_bytes(prev_seq) + long_bytes(partner_prev_seq) + core


def partner_bytes(seq: int, embedding: bytes | None, last_time: float | None) -> bytes:
    """A ``PartnerPreState`` record."""
    return b"".join(
        (
            long_bytes(seq),
            _NULL if embedding is None else _BRANCH_1 + bytes_field(embedding),
            optional_double(last_time),
        )
    )


class EntityRecordWriter:
    """``ENTITY_RECORD`` rows behind ``header``; the nested records as ``inbox_event_bytes``
    and ``partner_bytes`` wrote them. Raises (OverflowError, struct.error, TypeError,
    UnicodeEncodeError) where fastavro raises or writes something else: the caller then asks
    the Codec."""

    def __init__(self, header: bytes) -> None:
        self.header = header

    def record(
        self,
        embedding: bytes | None,
        last_time: float | None,
        history: Sequence[str],
        history_counts: Sequence[int],
        count: int,
        trend: float,
        applied_seq: int,
        sent_seq: int,
        waiting: Sequence[bytes],
        partners: Sequence[bytes],
        derived: bytes | None,
        model_version: str,
        history_times: Sequence[float] = (),
        habits: Sequence[float] = (),
    ) -> bytes:
        parts = [
            self.header,
            _NULL if embedding is None else _BRANCH_1 + bytes_field(embedding),
            optional_double(last_time),
        ]
        if history:
            parts.append(long_bytes(len(history)))
            parts += map(_item_bytes, history)  # item ids, as a recommendation's
        parts.append(_NULL)
        if history_counts:
            parts.append(long_bytes(len(history_counts)))
            parts += map(long_bytes, history_counts)
        parts.append(_NULL)
        parts += (long_bytes(count), _DOUBLE.pack(trend), long_bytes(applied_seq))
        parts.append(long_bytes(sent_seq))
        for block in (waiting, partners):
            if block:
                parts.append(long_bytes(len(block)))
                parts += block
            parts.append(_NULL)
        parts.append(_NULL if derived is None else _BRANCH_1 + derived)
        parts.append(string_bytes(model_version))
        for doubles in (history_times, habits):
            if doubles:
                parts.append(long_bytes(len(doubles)))
                parts += map(_DOUBLE.pack, doubles)
            parts.append(_NULL)
        return b"".join(parts)


def _optional_bytes_at(data: bytes, i: int) -> tuple[bytes | None, int]:
    """A ["null", "bytes"] union."""
    branch, i = _long_at(data, i)
    if branch == 0:
        return None, i
    if branch != 1:
        raise _Refused
    n, i = _long_at(data, i)
    if n < 0 or i + n > len(data):
        raise _Refused
    return bytes(data[i : i + n]), i + n


def _optional_double_at(data: bytes, i: int) -> tuple[float | None, int]:
    """A ["null", "double"] union."""
    branch, i = _long_at(data, i)
    if branch == 0:
        return None, i
    if branch != 1:
        raise _Refused
    (value,) = _DOUBLE.unpack_from(data, i)
    return value, i + 8


def inbox_event_seq(data: bytes, start: int = 0) -> int | None:
    """The seq of the event an InboxMessage in ``data[start:]`` carries, read without decoding
    the rest; None for a pre-state (no event) or for what is not an InboxMessage."""
    try:
        branch, i = _long_at(data, start)
        if branch != 1:
            return None
        seq, _i = _long_at(data, i)
    except (IndexError, ValueError, _Refused):
        return None
    return seq


def _partner_at(data: bytes, i: int) -> tuple[dict[str, Any], int]:
    seq, i = _long_at(data, i)
    embedding, i = _optional_bytes_at(data, i)
    last_time, i = _optional_double_at(data, i)
    return {"seq": seq, "embedding": embedding, "last_time": last_time}, i


def _inbox_event_at(data: bytes, i: int, packed: bool = False) -> tuple[dict[str, Any], int]:
    """An InboxEvent record, as the Codec decodes it (``packed``: see read_inbox_message)."""
    seq, i = _long_at(data, i)
    prev_seq, i = _long_at(data, i)
    partner_prev_seq, i = _long_at(data, i)
    event_id, user_id, item_id, timestamp, features, i = _packed_core_at(data, i)
    return {
        "seq": seq,
        "prev_seq": prev_seq,
        "partner_prev_seq": partner_prev_seq,
        "event_id": event_id,
        "user_id": user_id,
        "item_id": item_id,
        "timestamp": timestamp,
        "features": features if packed else list(_floats(features)),
    }, i


def _count_at(data: bytes, i: int) -> tuple[int, int]:
    """An array block's count; a negative one (a block with its byte size) is the Codec's."""
    count, i = _long_at(data, i)
    if count < 0:
        raise _Refused
    return count, i


def read_entity_record(
    data: bytes, start: int = 0, packed_features: bool = False
) -> dict[str, Any] | None:
    """The EntityRecord written (with this package's schema) in ``data[start:]``, as the
    Codec decodes it; None for anything it does not take, as ``read_interaction``.
    ``packed_features``: the waiting events' features as ``read_inbox_message`` gives them."""
    size = len(data)
    try:
        embedding, i = _optional_bytes_at(data, start)
        last_time, i = _optional_double_at(data, i)
        history: list[str] = []
        count, i = _count_at(data, i)
        while count:
            for _ in range(count):
                item, i = _string_at(data, i)
                history.append(item)
            count, i = _count_at(data, i)
        history_counts: list[int] = []
        count, i = _count_at(data, i)
        while count:
            for _ in range(count):
                n, i = _long_at(data, i)
                history_counts.append(n)
            count, i = _count_at(data, i)
        events, i = _long_at(data, i)
        (trend,) = _DOUBLE.unpack_from(data, i)
        applied_seq, i = _long_at(data, i + 8)
        sent_seq, i = _long_at(data, i)
        waiting: list[dict[str, Any]] = []
        count, i = _count_at(data, i)
        while count:
            for _ in range(count):
                event, i = _inbox_event_at(data, i, packed_features)
                waiting.append(event)
            count, i = _count_at(data, i)
        partners: list[dict[str, Any]] = []
        count, i = _count_at(data, i)
        while count:
            for _ in range(count):
                partner, i = _partner_at(data, i)
                partners.append(partner)
            count, i = _count_at(data, i)
        derived: dict[str, Any] | None = None
        branch, i = _long_at(data, i)
        if branch == 1:
            derived, i = _partner_at(data, i)
        elif branch != 0:
            return None
        model_version, i = _string_at(data, i)
        history_times, i = _doubles_at(data, i)
        habits, i = _doubles_at(data, i)
    except (IndexError, ValueError, struct.error, _Refused):  # UnicodeDecodeError: ValueError
        return None
    if i != size:
        return None
    return {
        "embedding": embedding,
        "last_time": last_time,
        "history": history,
        "history_counts": history_counts,
        "count": events,
        "trend": trend,
        "applied_seq": applied_seq,
        "sent_seq": sent_seq,
        "waiting": waiting,
        "partners": partners,
        "derived": derived,
        "model_version": model_version,
        "history_times": history_times,
        "habits": habits,
    }


def _doubles_at(data: bytes, i: int) -> tuple[list[float], int]:
    """An array of doubles."""
    out: list[float] = []
    count, i = _count_at(data, i)
    while count:
        out += struct.unpack_from(f"<{count}d", data, i)
        i += 8 * count
        count, i = _count_at(data, i)
    return out, i


def same_as_entity_record_codec(codec: Codec) -> bool:
    """Whether ``EntityRecordWriter`` and ``read_entity_record`` write and read what
    ``codec`` does (its schema is the one they were written for), on a sample row."""
    event = {
        "seq": 70_001,
        "prev_seq": 3,
        "partner_prev_seq": -1,
        "event_id": "e-\u00e9",
        "user_id": "u",
        "item_id": "i",
        "timestamp": 1.5e9,
        "features": [0.5, -2.0],
    }
    partner = {"seq": 70_001, "embedding": b"\x00\x00\x80?", "last_time": None}
    derived = {"seq": 69_000, "embedding": None, "last_time": 1.4e9}
    record = {
        "embedding": b"\x00\x00\x80?",
        "last_time": 1.4e9,
        "history": ["a", "b\u00e9"],
        "history_counts": [3, 1],
        "count": 7,
        "trend": 2.5,
        "applied_seq": 69_000,
        "sent_seq": -1,
        "waiting": [event],
        "partners": [partner],
        "derived": derived,
        "model_version": "v1",
        "history_times": [1.3e9, float("-inf")],
        "habits": [2.0, 1.0, 1.0, 0.5],
    }
    core = interaction_core("e-\u00e9", "u", "i", 1.5e9, (0.5, -2.0))
    written = EntityRecordWriter(codec.header).record(
        b"\x00\x00\x80?",
        1.4e9,
        ("a", "b\u00e9"),
        (3, 1),
        7,
        2.5,
        69_000,
        -1,
        [inbox_event_bytes(70_001, 3, -1, core)],
        [partner_bytes(70_001, b"\x00\x00\x80?", None)],
        partner_bytes(69_000, None, 1.4e9),
        "v1",
        (1.3e9, float("-inf")),
        (2.0, 1.0, 1.0, 0.5),
    )
    data = codec.encode(record)
    return written == data and read_entity_record(data, len(codec.header)) == record

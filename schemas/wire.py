"""The router's records in Avro binary, read and written directly: its hot path, without fastavro.

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

>>> body = interaction_core("e1", "u", "i", 2.5, ()) + optional_int(None)
>>> read_interaction(body)
('e1', 'u', 'i', 2.5, (), None)
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from schemas.codec import Codec

_DOUBLE = struct.Struct("<d")
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


def float_array(values: Sequence[float]) -> bytes:
    """``{"type": "array", "items": "float"}`` as fastavro writes it: one block, then 0."""
    n = len(values)
    if n == 0:
        return _NULL
    return long_bytes(n) + struct.pack(f"<{n}f", *values) + _NULL


def interaction_core(
    event_id: str, user_id: str, item_id: str, timestamp: float, features: Sequence[float]
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


def read_interaction(data: bytes, start: int = 0) -> Fields | None:
    """The Interaction written (with this package's schema) in ``data[start:]``, as
    ``(event_id, user_id, item_id, timestamp, features, state_label)``; None for anything
    it does not take (module doc), which the Codec then decodes or refuses."""
    size = len(data)
    try:
        ids = []
        i = start
        for _ in range(3):  # event_id, user_id, item_id
            n = data[i]
            if n < 0x80:  # a length under 64 (always, for valid ids under 64 bytes)
                n, i = (n >> 1) ^ -(n & 1), i + 1
            else:
                n, i = _long_at(data, i)
            end = i + n
            if n < 0 or end > size:
                return None
            ids.append(data[i:end].decode())
            i = end
        event_id, user_id, item_id = ids
        (timestamp,) = _DOUBLE.unpack_from(data, i)
        i += 8
        features: tuple[float, ...] = ()
        count, i = _long_at(data, i)
        while count != 0:
            if count < 0 or i + 4 * count > size:
                return None  # a block with its byte size, or a truncated one: the Codec's
            features += struct.unpack_from(f"<{count}f", data, i)
            i += 4 * count
            count, i = _long_at(data, i)
        branch, i = _long_at(data, i)
        label: int | None = None
        if branch == 1:
            label, i = _long_at(data, i)
        elif branch != 0:
            return None
    except (IndexError, ValueError, struct.error):  # UnicodeDecodeError is a ValueError
        return None
    if i != size:
        return None
    return event_id, user_id, item_id, timestamp, features, label


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

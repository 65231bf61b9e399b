"""Hostile messages for `interactions`, each tagged with the DLQ reason the router must give it.

A seeded, deterministic fuzzing stream (tests/streams/test_fuzz.py, benchmarks/fuzz.py): the
valid rows of a JODIE file in file order, with hostile messages slipped in between them —
random bytes, truncated and bit-flipped Avro, wrong framing, non-finite and absurd timestamps
and features, feature arrays of the wrong length or of 100,000 entries, empty, over-long and
control-character ids, invalid UTF-8, bad labels, re-sent events and events that go back in
time. The pipeline must put every hostile message in `interactions.dlq` with its reason and
treat the valid rows as if the hostile ones had never been sent.

Each expected reason holds whatever order the router's consumer reads the partitions in:

- a message that passes decoding and ``validate`` (a re-send, an event that goes back in
  time, a feature array of the wrong length) is keyed like a valid row sent before it, so it
  reaches the router behind that row on the same partition (which also keeps it below the
  watermark) and is dated after the stream's first event, whose length fixes the stream's;
- a far-future timestamp is past any watermark of the stream *and* past the wall clock plus
  a day, which bounds the first event of an empty log;
- a mutated (truncated or bit-flipped) message that still decodes is drawn again, since what
  the router must say about it would depend on the record it happens to be.
"""

from __future__ import annotations

import bisect
import copy
import functools
import hashlib
import math
import random
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from operators.dataset import Row
from operators.protocol.sequencer import RejectReason
from schemas import INTERACTION, SEQUENCED_INTERACTION, Codec, DecodeError
from schemas.codec import load_schema
from streams.produce import event_id, to_record

HUGE_ID = 1_000_000  # characters: a message just past librdkafka's default limit of 1,000,000
# bytes, still within the broker's default of 1,048,588 (clients such as Java's send it)
HUGE_FEATURES = 100_000  # floats: 400 kB on the wire
# The producer's message.max.bytes that sending the stream needs (the huge-id messages).
MESSAGE_MAX_BYTES = 1_048_000


@dataclass(frozen=True)
class Message:
    """One message of the stream: what was done to it and what the router must say."""

    kind: str  # "valid", or the hostile kind
    reason: RejectReason | None  # None: a valid row, to be sequenced
    key: bytes | None
    value: bytes | None


@dataclass(frozen=True)
class HostileStream:
    messages: list[Message]  # in the order they are sent
    valid_ids: list[str]  # the valid rows' event ids, in file order
    redrawn: int = 0  # mutations that still decoded and were drawn again

    @property
    def hostile(self) -> list[Message]:
        return [m for m in self.messages if m.reason is not None]

    def by_kind(self) -> Counter[str]:
        return Counter(m.kind for m in self.hostile)

    def by_reason(self) -> Counter[str]:
        return Counter(str(m.reason) for m in self.hostile)


def fingerprint(key: bytes | None, value: bytes | None) -> bytes:
    """A short digest of a message (a missing key or value counts as empty, as in the DLQ)."""
    h = hashlib.blake2b(digest_size=16)
    for part in (key or b"", value or b""):
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.digest()


@dataclass
class _Context:
    """What a kind's maker may use: the rows, the codec, the RNG and the position ``k``
    (the message is sent just before valid row k, so rows [0, k) are already sent)."""

    rows: Sequence[Row]
    tag: str
    codec: Codec
    rng: random.Random
    serial: int = 0
    redrawn: int = 0
    # Rows dated after the first row: a message dated like one sorts after the first event.
    later: list[int] = field(default_factory=list)

    def fresh_id(self) -> str:
        self.serial += 1
        return f"{self.tag}:fuzz-{self.serial:08d}"

    def sent_row(self, k: int) -> int:
        """A row already sent (k > 0), dated after the first row when one is."""
        later = self.later[: bisect.bisect_left(self.later, k)]
        return self.rng.choice(later) if later else self.rng.randrange(k)

    def record(self, k: int, **fields: Any) -> tuple[bytes, dict[str, Any]]:
        """A well-formed event of a sent row's user and item, under a fresh id, its key."""
        row = self.rows[self.sent_row(k) if k > 0 else 0]
        base = {**to_record(row, self.tag), "event_id": self.fresh_id(), **fields}
        return row.user_id.encode(), base


Made = tuple[bytes | None, bytes | None]
Maker = Callable[[_Context, int], Made]


def _encoded(ctx: _Context, k: int, **fields: Any) -> tuple[bytes, bytes]:
    key, record = ctx.record(k, **fields)
    return key, ctx.codec.encode(record)


def _undecodable(ctx: _Context, k: int, mutate: Callable[[bytes], bytes]) -> Made:
    """A mutation of a well-formed message that the codec cannot decode (drawn until one is)."""
    while True:
        key, value = _encoded(ctx, k)
        mutated = mutate(value)
        try:
            ctx.codec.decode(mutated)
        except DecodeError:
            return key, mutated
        # SchemaError is left to propagate: a body mutation never touches the framing.
        ctx.redrawn += 1


def _random_bytes(ctx: _Context, k: int) -> Made:
    rng = ctx.rng
    if rng.random() < 0.02:
        return None, None  # a message with neither key nor value (a tombstone)
    value = rng.randbytes(rng.choice([0, 1, 2, 9, 10, 11, rng.randrange(200)]))
    if value[:2] == b"\xc3\x01":  # not even the single-object marker: always malformed
        value = b"\x00" + value
    return (rng.randbytes(rng.randrange(16)) if rng.random() < 0.5 else None), value


def _truncated(ctx: _Context, k: int) -> Made:
    return _undecodable(ctx, k, lambda v: v[: ctx.rng.randrange(len(v))])


def _bit_flipped(ctx: _Context, k: int) -> Made:
    def flip(value: bytes) -> bytes:
        out = bytearray(value)
        for _ in range(ctx.rng.randint(1, 4)):
            at = ctx.rng.randrange(10, len(out))  # the body: the framing has kinds of its own
            out[at] ^= 1 << ctx.rng.randrange(8)
        return bytes(out)

    return _undecodable(ctx, k, flip)


def _confluent_framing(ctx: _Context, k: int) -> Made:
    key, value = _encoded(ctx, k)
    return key, b"\x00" + ctx.rng.randbytes(4) + value[10:]


def _trailing_bytes(ctx: _Context, k: int) -> Made:
    key, value = _encoded(ctx, k)
    return key, value + ctx.rng.randbytes(ctx.rng.randint(1, 32))


def _header_only(ctx: _Context, k: int) -> Made:
    key, value = _encoded(ctx, k)
    return key, value[:10]


def _invalid_utf8_id(ctx: _Context, k: int) -> Made:
    # Avro strings are UTF-8: a placeholder of the same length is swapped for bytes that are not.
    field_name = ctx.rng.choice(["event_id", "user_id", "item_id"])
    placeholder = f"utf8-{ctx.serial:08d}-{ctx.rng.randrange(1 << 30):09d}"
    key, value = _encoded(ctx, k, **{field_name: placeholder})
    bad = ctx.rng.choice([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80"])
    raw = (bad * len(placeholder))[: len(placeholder)]
    return key, value.replace(placeholder.encode(), raw)


def _huge_invalid_utf8_id(ctx: _Context, k: int) -> Made:
    # Half a megabyte the decoder cannot read: its error quotes every byte of it.
    placeholder = f"{ctx.fresh_id()}-" + "p" * 500_000
    key, value = _encoded(ctx, k, event_id=placeholder)
    return key, value.replace(placeholder.encode(), b"\xff" * len(placeholder))


def _unknown_fingerprint(ctx: _Context, k: int) -> Made:
    key, value = _encoded(ctx, k)
    return key, value[:2] + ctx.rng.randbytes(8) + value[10:]


@functools.cache
def _newer_codec() -> Codec:
    newer = copy.deepcopy(load_schema(INTERACTION))
    newer["fields"].append({"name": "channel", "type": ["null", "string"], "default": None})
    return Codec(newer)


@functools.cache
def _log_codec() -> Codec:
    return Codec(SEQUENCED_INTERACTION)


def _newer_schema(ctx: _Context, k: int) -> Made:
    key, record = ctx.record(k)
    return key, _newer_codec().encode({**record, "channel": "web"})


def _other_schema(ctx: _Context, k: int) -> Made:
    """A message of another topic's schema (a log record) sent to `interactions` by mistake."""
    key, record = ctx.record(k)
    body = {
        "seq": k,
        "prev_user_seq": -1,
        "prev_item_seq": -1,
        "prev_user_time": None,
        "prev_item_time": None,
        "interaction": record,
    }
    return key, _log_codec().encode(body)


def _empty_id(ctx: _Context, k: int) -> Made:
    field_name = ctx.rng.choice(["event_id", "user_id", "item_id"])
    key, value = _encoded(ctx, k, **{field_name: ""})
    return (b"" if field_name == "user_id" else key), value


_CONTROL = "\x00\x01\x07\x08\t\n\r\x1b\x7f\x80\x85\x9f"


def _control_char_id(ctx: _Context, k: int) -> Made:
    field_name = ctx.rng.choice(["event_id", "user_id", "item_id"])
    key, record = ctx.record(k)
    clean = str(record[field_name])
    at = ctx.rng.randrange(len(clean) + 1)
    dirty = clean[:at] + ctx.rng.choice(_CONTROL) + clean[at:]
    record[field_name] = dirty
    return (dirty.encode() if field_name == "user_id" else key), ctx.codec.encode(record)


def _long_id(ctx: _Context, k: int, lengths: Sequence[int] = (257, 1000, 4097, 10_000)) -> Made:
    field_name = ctx.rng.choice(["event_id", "user_id", "item_id"])
    n = ctx.rng.choice(lengths)
    # Valid characters only, so the length is the one thing wrong.
    return _encoded(ctx, k, **{field_name: ("x" if n > 10_000 else "é") * n})


def _huge_id(ctx: _Context, k: int) -> Made:
    return _long_id(ctx, k, lengths=(HUGE_ID,))


def _nonfinite_timestamp(ctx: _Context, k: int) -> Made:
    return _encoded(ctx, k, timestamp=ctx.rng.choice([math.nan, math.inf, -math.inf]))


def _extreme_timestamp(ctx: _Context, k: int) -> Made:
    big = ctx.rng.choice([1e300, 1.7976931348623157e308, 1e16, 1.000001e15])
    return _encoded(ctx, k, timestamp=ctx.rng.choice([1.0, -1.0]) * big)


def _future_timestamp(ctx: _Context, k: int) -> Made:
    # 1e10 s is about 2286 in Unix time: past the wall clock plus a day for two centuries.
    return _encoded(ctx, k, timestamp=10 ** ctx.rng.uniform(10, 14))


def _features(ctx: _Context, n: int, special: Iterable[float] = ()) -> list[float]:
    out = [ctx.rng.uniform(-1.0, 1.0) for _ in range(n)]
    for x in special:
        out[ctx.rng.randrange(n)] = x
    return out


def _nonfinite_features(ctx: _Context, k: int) -> Made:
    n = ctx.rng.randint(1, 8)
    bad = [ctx.rng.choice([math.nan, math.inf, -math.inf])]
    return _encoded(ctx, k, features=_features(ctx, n, bad))


def _huge_features(ctx: _Context, k: int) -> Made:
    # Features are float32 on the wire: 3e38 is near its largest finite value.
    n = ctx.rng.randint(1, 8)
    bad = [ctx.rng.choice([1.0, -1.0]) * ctx.rng.choice([2e6, 1e7, 1e30, 3e38])]
    return _encoded(ctx, k, features=_features(ctx, n, bad))


def _wrong_length(ctx: _Context, k: int) -> Made:
    # Finite and small: only the count differs from the stream's (0 for Wikipedia).
    return _encoded(ctx, k, features=_features(ctx, ctx.rng.randint(1, 64)))


def _long_features(ctx: _Context, k: int) -> Made:
    return _encoded(ctx, k, features=[0.5] * ctx.rng.choice([4097, 8192, 20_000]))


def _features_100k(ctx: _Context, k: int) -> Made:
    return _encoded(ctx, k, features=[ctx.rng.choice([0.0, math.nan])] * HUGE_FEATURES)


def _bad_label(ctx: _Context, k: int) -> Made:
    return _encoded(ctx, k, state_label=ctx.rng.choice([2, -1, 7, 2**31 - 1, -(2**31)]))


def _duplicate(ctx: _Context, k: int) -> Made:
    """A byte-identical re-send of a valid row already sent, keyed as it was."""
    row = ctx.rows[ctx.rng.randrange(k)]
    return row.user_id.encode(), ctx.codec.encode(to_record(row, ctx.tag))


def _back_in_time(ctx: _Context, k: int, side: str) -> Made:
    """An event of a sent row's user (or item), dated before that row, sent behind it."""
    j = ctx.sent_row(k)
    row = ctx.rows[j]
    earlier = row.timestamp - ctx.rng.choice([1.0, ctx.rng.uniform(1.0, 1e6), 1e14])
    record = {**to_record(row, ctx.tag), "event_id": ctx.fresh_id(), "timestamp": earlier}
    if side == "item":  # a user never seen, so the item is what went back in time
        record["user_id"] = f"fuzz-user-{ctx.serial:08d}"
    return row.user_id.encode(), ctx.codec.encode(record)


@dataclass(frozen=True)
class Kind:
    name: str
    reason: RejectReason
    make: Maker
    weight: int = 20
    needs_history: bool = False  # only after a valid row was sent


KINDS: tuple[Kind, ...] = (
    Kind("random_bytes", "malformed", _random_bytes),
    Kind("truncated_avro", "malformed", _truncated),
    Kind("bit_flipped_avro", "malformed", _bit_flipped),
    Kind("confluent_framing", "malformed", _confluent_framing),
    Kind("trailing_bytes", "malformed", _trailing_bytes),
    Kind("header_only", "malformed", _header_only),
    Kind("invalid_utf8_id", "malformed", _invalid_utf8_id),
    Kind("huge_invalid_utf8_id", "malformed", _huge_invalid_utf8_id, weight=1),
    Kind("unknown_fingerprint", "unknown_schema", _unknown_fingerprint),
    Kind("newer_schema", "unknown_schema", _newer_schema),
    Kind("other_schema", "unknown_schema", _other_schema),
    Kind("empty_id", "missing_id", _empty_id),
    Kind("control_char_id", "bad_id", _control_char_id),
    Kind("long_id", "bad_id", _long_id),
    Kind("huge_id", "bad_id", _huge_id, weight=1),
    Kind("nonfinite_timestamp", "bad_timestamp", _nonfinite_timestamp),
    Kind("extreme_timestamp", "bad_timestamp", _extreme_timestamp),
    Kind("future_timestamp", "future_timestamp", _future_timestamp),
    Kind("nonfinite_features", "bad_features", _nonfinite_features),
    Kind("huge_features", "bad_features", _huge_features),
    Kind("wrong_length", "feature_length", _wrong_length, needs_history=True),
    Kind("long_features", "feature_length", _long_features, weight=5),
    Kind("features_100k", "feature_length", _features_100k, weight=1),
    Kind("bad_label", "bad_label", _bad_label),
    Kind("duplicate", "duplicate", _duplicate, needs_history=True),
    Kind(
        "user_back_in_time",
        "time_backwards",
        lambda c, k: _back_in_time(c, k, "user"),
        needs_history=True,
    ),
    Kind(
        "item_back_in_time",
        "time_backwards",
        lambda c, k: _back_in_time(c, k, "item"),
        needs_history=True,
    ),
)


def counts(n: int, kinds: Sequence[Kind] = KINDS) -> dict[str, int]:
    """``n`` messages shared among the kinds by weight (largest remainder), each kind at least
    once when ``n`` allows."""
    total = sum(k.weight for k in kinds)
    exact = {k.name: n * k.weight / total for k in kinds}
    out = {name: max(1, int(x)) if n >= len(kinds) else int(x) for name, x in exact.items()}
    by_remainder = sorted(exact, key=lambda name: exact[name] - int(exact[name]), reverse=True)
    i = 0
    while sum(out.values()) < n:
        out[by_remainder[i % len(by_remainder)]] += 1
        i += 1
    while sum(out.values()) > n:  # only when the floor of one raised a kind below one
        name = max(out, key=lambda m: out[m])
        out[name] -= 1
    return out


def hostile_stream(
    rows: Sequence[Row], tag: str, codec: Codec, n_hostile: int, seed: int = 0
) -> HostileStream:
    """``rows`` (valid, in file order, each sent keyed by its user) with ``n_hostile`` hostile
    messages at random places among them. ``tag``: the rows' source tag (their event ids);
    ``codec``: the `interactions` codec (single-object framing: the framing kinds assume it).

    >>> from operators.dataset import bundled_wikipedia, iter_rows
    >>> from itertools import islice
    >>> rows = list(islice(iter_rows(bundled_wikipedia()), 100))
    >>> s = hostile_stream(rows, "t", Codec(INTERACTION), n_hostile=60, seed=1)
    >>> len(s.messages), len(s.hostile), sorted(s.by_reason())[:3]
    (160, 60, ['bad_features', 'bad_id', 'bad_label'])
    """
    if len(rows) < 2:
        raise ValueError("the stream needs at least two valid rows")
    rng = random.Random(seed)
    first = rows[0].timestamp
    ctx = _Context(rows, tag, codec, rng)
    ctx.later = [j for j, r in enumerate(rows) if r.timestamp > first]
    if not ctx.later:
        raise ValueError("every row has the first row's timestamp")
    # Kinds that must follow a row dated after the first one go after the first such row.
    earliest = ctx.later[0] + 1
    shares = counts(n_hostile)
    plan = [k for k in KINDS for _ in range(shares[k.name])]
    rng.shuffle(plan)
    placed = sorted(
        (rng.randint(earliest if kind.needs_history else 0, len(rows)), i, kind)
        for i, kind in enumerate(plan)
    )
    messages: list[Message] = []
    nxt = 0
    for k, _i, kind in placed:
        while nxt < k:
            row = rows[nxt]
            messages.append(
                Message("valid", None, row.user_id.encode(), codec.encode(to_record(row, tag)))
            )
            nxt += 1
        key, value = kind.make(ctx, k)
        messages.append(Message(kind.name, kind.reason, key, value))
    for row in rows[nxt:]:
        messages.append(
            Message("valid", None, row.user_id.encode(), codec.encode(to_record(row, tag)))
        )
    valid_ids = [event_id(tag, r.line) for r in rows]
    return HostileStream(messages, valid_ids, ctx.redrawn)


@dataclass(frozen=True)
class Outcome:
    """What a fuzzing run saw, for ``report``."""

    dlq_by_reason: Counter[str]
    dlq_unexpected: int  # DLQ messages that are not one of the hostile messages, or not theirs
    sequenced: int
    recommendations: int
    distinct_recommended: int
    router_errors: int
    worker_exits: int
    max_state_diff: float
    seconds: float


def report(stream: HostileStream, outcome: Outcome) -> str:
    """The per-kind and per-reason table of a fuzzing run."""
    kinds = {k.name: k.reason for k in KINDS}
    lines = [f"{'hostile kind':<22} {'sent':>7}  must get", "-" * 48]
    for name, n in sorted(stream.by_kind().items()):
        lines.append(f"{name:<22} {n:>7}  {kinds[name]}")
    lines.append(f"{'(all hostile)':<22} {len(stream.hostile):>7}  ({stream.redrawn} redrawn)")
    lines += ["", f"{'DLQ reason':<22} {'expected':>8} {'in DLQ':>8}", "-" * 40]
    expected = stream.by_reason()
    for reason in sorted(set(expected) | set(outcome.dlq_by_reason)):
        lines.append(
            f"{reason:<22} {expected.get(reason, 0):>8} {outcome.dlq_by_reason.get(reason, 0):>8}"
        )
    lines.append(f"{'(not as expected)':<22} {0:>8} {outcome.dlq_unexpected:>8}")
    lines += [
        "",
        f"valid events {len(stream.valid_ids)}, sequenced {outcome.sequenced}, "
        f"recommendations {outcome.recommendations} "
        f"({outcome.distinct_recommended} distinct events)",
        f"crashes: router {outcome.router_errors}, workers {outcome.worker_exits}; "
        f"max |state - replay of the valid events| {outcome.max_state_diff:.2e}; "
        f"{outcome.seconds:.1f} s",
    ]
    return "\n".join(lines)

"""Read back what is in a topic: per-partition message counts and decoded samples."""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from confluent_kafka import Consumer, KafkaError, Message, TopicPartition

from jodie_errors import JodieError
from schemas.codec import (
    ENTITY_RECORD,
    EVALUATION,
    INBOX_MESSAGE,
    INTERACTION,
    MODEL_ANNOUNCEMENT,
    RECOMMENDATION,
    SEQUENCED_INTERACTION,
    Codec,
)
from streams.app.epochs import label, split_row_key
from streams.codecs import make_codec
from streams.exceptions import ReadError, TopicMissingError
from streams.runtime.clients import committed_reader
from streams.runtime.kafka import take, watermarks
from streams.settings import Settings


@dataclass(frozen=True)
class PartitionCount:
    partition: int
    low: int
    high: int

    @property
    def messages(self) -> int:
        """Offsets in the log; with transactions this includes commit markers."""
        return self.high - self.low


def partition_counts(
    consumer: Consumer, topic: str, timeout_s: float = 10.0
) -> list[PartitionCount]:
    metadata = consumer.list_topics(topic, timeout=timeout_s).topics[topic]
    if metadata.error is not None:
        if metadata.error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
            raise TopicMissingError(
                f"topic {topic} does not exist; create the pipeline's topics with "
                "`jodie topics apply`, or set JODIE_TOPIC_PREFIX to the pipeline's"
            )
        raise ReadError(f"topic {topic}: {metadata.error}")
    counts = []
    for p in sorted(metadata.partitions):
        low, high = watermarks(consumer, TopicPartition(topic, p), timeout_s)
        counts.append(PartitionCount(p, low, high))
    return counts


class Bounded:
    """Reads every partition of ``topic`` from its start to the end it had when reading began.

    read_committed, so aborted transactions are never seen, and an end-of-partition event
    comes at the last stable offset: a transaction still open when reading began is not
    waited for. Later writes (a live topic) are not chased. ``pending`` holds the
    partitions not yet at that end; a caller may drop one from it to stop reading that
    partition early.
    """

    def __init__(self, consumer: Consumer, topic: str) -> None:
        self.consumer = consumer
        self.topic = topic
        self.counts = partition_counts(consumer, topic)
        self.ends = {c.partition: c.high for c in self.counts}
        self.pending = {c.partition for c in self.counts if c.high > c.low}
        consumer.assign([TopicPartition(topic, c.partition, c.low) for c in self.counts])

    def take(self, most: int, timeout_s: float) -> list[Message] | None:
        """The next messages within the bound, in partition order; None when nothing came
        for ``timeout_s``. End-of-partition events are consumed here."""
        messages = take(self.consumer, most, timeout_s)
        if not messages:
            return None
        kept = []
        for msg in messages:
            err = msg.error()
            p = msg.partition() or 0
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    self.pending.discard(p)
                    continue
                raise ReadError(f"reading {self.topic}: {err}")
            offset = msg.offset() or 0
            if offset >= self.ends[p] - 1:
                self.pending.discard(p)
                if offset >= self.ends[p]:
                    continue
            kept.append(msg)
        return kept


def read_all(
    settings: Settings,
    topic: str,
    limit: int | None = None,
    idle_timeout_s: float = 5.0,
    complete: bool = False,
) -> Iterator[tuple[bytes | None, bytes, int, int]]:
    """Yield (key, value, partition, offset) from the start of every partition to its end.

    Stops when every partition reached the end it had when reading began (read_committed,
    so aborted transactions are never seen), after ``limit`` messages, or after
    ``idle_timeout_s`` without any message — never waits forever. ``complete``: stopping
    for the idle timeout before the end (a broker slow to answer) is a ``ReadError``, for
    readers that rebuild state from the whole topic.
    """
    for msg in _messages(settings, topic, limit, idle_timeout_s, complete):
        value = msg.value()
        if value is not None:
            yield msg.key(), value, msg.partition() or 0, msg.offset() or 0


def read_with_headers(
    settings: Settings, topic: str, idle_timeout_s: float = 5.0
) -> Iterator[tuple[bytes | None, bytes, dict[str, bytes]]]:
    """Yield (key, value, headers) of every message, as ``read_all`` reads them (for the DLQ,
    whose headers say why each message is there). A missing value reads as empty."""
    for m in read_messages(settings, topic, idle_timeout_s=idle_timeout_s):
        yield m.key, m.value or b"", m.headers


@dataclass(frozen=True)
class Peeked:
    """One message as read back: where it is, its key, value (None: a tombstone), headers."""

    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: dict[str, bytes]


def read_messages(
    settings: Settings, topic: str, limit: int | None = None, idle_timeout_s: float = 5.0
) -> Iterator[Peeked]:
    """Every message of ``topic``, tombstones and headers included, as ``read_all`` bounds
    the reading."""
    for msg in _messages(settings, topic, limit, idle_timeout_s):
        raw = msg.headers() or []
        pairs = raw.items() if isinstance(raw, dict) else raw
        headers = {
            name: (value.encode() if isinstance(value, str) else value or b"")
            for name, value in pairs
        }
        yield Peeked(msg.partition() or 0, msg.offset() or 0, msg.key(), msg.value(), headers)


def _messages(
    settings: Settings,
    topic: str,
    limit: int | None,
    idle_timeout_s: float,
    complete: bool = False,
) -> Iterator[Message]:
    consumer = committed_reader(settings, group_id=f"jodie-inspect-{uuid.uuid4().hex[:8]}")
    try:
        bounded = Bounded(consumer, topic)
        seen = 0
        while bounded.pending and (limit is None or seen < limit):
            messages = bounded.take(1 if limit is not None else 1000, idle_timeout_s)
            if messages is None:
                if complete:
                    raise ReadError(
                        f"reading {topic}: partitions {sorted(bounded.pending)} not at their "
                        f"end after {idle_timeout_s} s without a message"
                    )
                break
            for msg in messages:
                seen += 1
                yield msg
    finally:
        consumer.close()


def decode_all(
    settings: Settings, topic: str, codec: Codec, limit: int | None = None
) -> Iterator[dict[str, Any]]:
    for _key, value, _p, _o in read_all(settings, topic, limit=limit):
        yield codec.decode(value)


#: Decodes one message of a topic (key, value, headers) into a JSON-safe record.
Decode = Callable[[bytes | None, bytes | None, dict[str, bytes]], dict[str, Any]]

#: The Avro topics, by their name without the prefix: the schema, and whether their writer
#: frames messages per the settings (clients, router, registry: a registry's framing when
#: JODIE_SCHEMA_REGISTRY_URL is set) or always single-object (the workers).
_AVRO_TOPICS: dict[str, tuple[str, bool]] = {
    "interactions": (INTERACTION, True),
    "interactions.log": (SEQUENCED_INTERACTION, True),
    "models": (MODEL_ANNOUNCEMENT, True),
    "recommendations": (RECOMMENDATION, False),
    "evaluations": (EVALUATION, False),
    "user-inbox": (INBOX_MESSAGE, False),
    "item-inbox": (INBOX_MESSAGE, False),
}
_TABLES = ("jodie-user-state-changelog", "jodie-item-state-changelog")


def topic_decoder(settings: Settings, name: str) -> Decode:
    """How the messages of the pipeline's topic ``name`` (as deploy/topics.toml declares it,
    without the prefix) read back, each as its writer wrote it:

    - the Avro topics: the record (``bytes`` embeddings as float lists);
    - ``item-vectors``: the item's float32 vector and the headers its owner set;
    - ``interactions.dlq``: the reason, detail and source headers, and the rejected event
      when its bytes are an Interaction (else their size and first bytes);
    - ``interactions.positions``: the `interactions` partition and the router's next offset.

    A tombstone (a deleted table row) reads as ``{"deleted": true}``.
    """
    topic = settings.topic(name)
    if name in _AVRO_TOPICS:
        schema, per_settings = _AVRO_TOPICS[name]
        codec = make_codec(settings, schema, topic) if per_settings else Codec(schema)

        def avro(_key: bytes | None, value: bytes | None, _h: dict[str, bytes]) -> dict[str, Any]:
            return {"deleted": True} if value is None else jsonable(codec.decode(value))

        return avro
    if name in _TABLES:
        return _row
    if name == "item-vectors":
        return _vector
    if name == "interactions.dlq":
        return dead_letter_decoder(settings)
    if name == "interactions.positions":
        return _position
    raise ValueError(f"{name} is not a topic of the pipeline (deploy/topics.toml)")


def _position(key: bytes | None, value: bytes | None, _h: dict[str, bytes]) -> dict[str, Any]:
    """A router position: both are ASCII integers (streams.router.read_positions)."""
    if value is None:
        return {"deleted": True}
    return {"partition": int(key or b"-1"), "next_offset": int(value)}


def dead_letter_decoder(settings: Settings) -> Decode:
    """A DLQ message: its headers, and the event it holds when that is an Interaction (the
    router's copies and the workers' quarantined events are framed as clients frame them)."""
    codec = make_codec(settings, INTERACTION, settings.topic("interactions"))

    def decode(
        _key: bytes | None, value: bytes | None, headers: dict[str, bytes]
    ) -> dict[str, Any]:
        record: dict[str, Any] = {
            name: headers[name].decode(errors="replace") for name in sorted(headers)
        }
        data = value or b""
        try:
            record["event"] = jsonable(codec.decode(data))
        except JodieError as exc:
            record["event"] = None
            record["not_an_event"] = f"{len(data)} bytes, {data[:16].hex()}...: {exc}"
        return record

    return decode


_ROW_CODEC = Codec(ENTITY_RECORD)


def _row(key: bytes | None, value: bytes | None, _h: dict[str, bytes]) -> dict[str, Any]:
    """A table row: the entity and epoch its key names, then its record."""
    entity, epoch = split_row_key(key or b"")
    row = {"entity": entity.decode(errors="replace"), "epoch": label(epoch)}
    return {**row, **({"deleted": True} if value is None else jsonable(_ROW_CODEC.decode(value)))}


def _vector(_key: bytes | None, value: bytes | None, headers: dict[str, bytes]) -> dict[str, Any]:
    if value is None:
        return {"deleted": True}
    return {
        "vector": _floats(value),
        **{name: headers[name].decode(errors="replace") for name in sorted(headers)},
    }


def jsonable(value: Any) -> Any:
    """A decoded Avro value made JSON-safe: its ``bytes`` (float32 embeddings in these
    schemas) as float lists, rounded to float32's precision; a non-finite float (a rejected
    event's timestamp) as the string Avro's JSON encoding uses, "NaN" or "Infinity"."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, bytes):
        return _floats(value)
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [jsonable(v) for v in value]
    return value


def _floats(data: bytes) -> list[float] | str:
    if len(data) % 4:
        return data.hex()  # not a float32 array after all: shown as it is
    return [float(f"{x:.7g}") for x in np.frombuffer(data, dtype="<f4").tolist()]

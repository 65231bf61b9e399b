"""Produce a JODIE CSV to the `interactions` topic as Avro events (idempotent, paced, resumable,
optionally looping so a demo deployment's stream never ends)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Producer

from operators.dataset import Row, file_fingerprint, iter_rows
from operators.exceptions import BadRowError
from schemas.codec import Codec
from streams.settings import Settings

# The source tag is a digest of the file's text, so the same file always yields the same
# event ids (re-runs can be deduplicated downstream) and two different files never collide.
_SOURCE_TAG_HEX = 16


@dataclass
class ProduceSummary:
    events: int = 0
    bad_rows: list[BadRowError] = field(default_factory=list)
    seconds: float = 0.0
    source_tag: str = ""
    laps: int = 0  # passes over the rows begun (1 without looping)

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else 0.0


def source_tag(path: str | Path) -> str:
    return file_fingerprint(path)[:_SOURCE_TAG_HEX]


def event_id(tag: str, line: int) -> str:
    """Deterministic id of the event on ``line`` of the source file.

    The line is zero-padded so ids sort like lines: the canonical order breaks timestamp ties
    by event id, which then keeps the file's order.
    """
    return f"{tag}:{line:010d}"


def lap_tag(tag: str, lap: int) -> str:
    """The source tag of the ``lap``-th pass over a file (0: the first, the file's own tag).

    A looping producer re-sends the file as new events: fresh ids keep the router from taking
    them for re-sends (it would reject them as duplicates).
    """
    return tag if lap == 0 else f"{tag}.{lap}"


def to_record(row: Row, tag: str, shift: float = 0.0) -> dict[str, Any]:
    """The Avro record of ``row``; ``shift`` seconds are added to its timestamp."""
    return {
        "event_id": event_id(tag, row.line),
        "user_id": row.user_id,
        "item_id": row.item_id,
        "timestamp": row.timestamp + shift,
        "features": list(row.features),
        "state_label": row.state_label,
    }


class Sender:
    """Sends (key, value) pairs to one topic through one producer, in order, and keeps the
    first delivery failure for ``flush`` to raise: an idempotent producer already retried it,
    so it is real (e.g. the topic does not exist)."""

    def __init__(self, producer: Producer, topic: str) -> None:
        self.producer = producer
        self.topic = topic
        self.errors: list[KafkaError] = []

    def _delivered(self, err: KafkaError | None, _msg: Any) -> None:
        if err is not None:
            self.errors.append(err)

    def send(self, key: bytes | None, value: bytes | None) -> None:
        while True:
            try:
                self.producer.produce(self.topic, value=value, key=key, on_delivery=self._delivered)
                break
            except BufferError:
                # Local queue full: let librdkafka drain it, then retry this message.
                self.producer.poll(0.05)
        self.producer.poll(0)

    def flush(self, timeout_s: float = -1) -> int:
        """Wait until every message sent is delivered (``timeout_s`` < 0: however long it
        takes); raise the first delivery failure. Returns how many are still on their way."""
        remaining = self.producer.flush(timeout_s)
        if self.errors:
            raise KafkaException(self.errors[0])
        return int(remaining)


class _Pacer:
    """Holds the send rate at ``rate`` events/s on average (no pacing when rate is None)."""

    def __init__(self, rate: float | None) -> None:
        self.rate = rate
        self.start = time.monotonic()

    def wait(self, sent: int) -> None:
        if not self.rate:
            return
        ahead = sent / self.rate - (time.monotonic() - self.start)
        if ahead > 0:
            time.sleep(ahead)


def produce_file(
    path: str | Path,
    producer: Producer,
    codec: Codec,
    topic: str,
    *,
    start: int = 0,
    limit: int | None = None,
    rate: float | None = None,
    strict: bool = False,
    flush_every: int = 10_000,
    progress_every: int = 1_000,
    on_progress: Callable[[int], None] | None = None,
    laps: int | None = 1,
) -> ProduceSummary:
    """Send rows ``start .. start+limit`` (0-based, counting valid rows) keyed by user id.

    ``laps`` passes over those rows (None: until the process is stopped). Pass n ≥ 1 sends
    them again as new events: ids from ``lap_tag(tag, n)`` and timestamps shifted by n times
    the rows' time span plus their mean gap, so every user's and item's events keep moving
    forward in time and the stream looks like one that goes on. Bad rows are reported once.

    Delivery failures raise after the flush: the idempotent producer already retried them,
    so a failure here is real (e.g. the topic does not exist).
    """
    summary = ProduceSummary(source_tag=source_tag(path))
    sender = Sender(producer, topic)
    stop = None if limit is None else start + limit
    pacer = _Pacer(rate)
    began = time.monotonic()
    shift, first, last, lap_events = 0.0, float("inf"), float("-inf"), 0
    try:
        while (laps is None or summary.laps < laps) and not sender.errors:
            lap = summary.laps
            summary.laps += 1
            bad = summary.bad_rows if lap == 0 else None
            rows: Iterator[Row] = iter_rows(path, errors=bad, strict=strict)
            tag = lap_tag(summary.source_tag, lap)
            for row in islice(rows, start, stop):
                if lap == 0:
                    first, last = min(first, row.timestamp), max(last, row.timestamp)
                    lap_events += 1
                sender.send(row.user_id.encode(), codec.encode(to_record(row, tag, shift)))
                summary.events += 1
                if summary.events % flush_every == 0:
                    producer.flush()
                if on_progress is not None and summary.events % progress_every == 0:
                    on_progress(summary.events)
                pacer.wait(summary.events)
                if sender.errors:
                    break
            if lap_events == 0:
                break  # nothing to repeat
            span = last - first
            shift += span + (span / (lap_events - 1) if lap_events > 1 else 1.0)
        sender.flush()
    finally:
        summary.seconds = time.monotonic() - began
        if on_progress is not None:
            on_progress(summary.events)
    return summary


def produce_rows(
    settings: Settings, start: int = 0, limit: int | None = None, path: str | Path | None = None
) -> ProduceSummary:
    """Rows ``start .. start+limit`` of a JODIE CSV (the bundled Wikipedia file by default) to
    the pipeline's `interactions` topic, with its codec and an idempotent producer."""
    from operators.dataset import bundled_wikipedia
    from schemas import INTERACTION
    from streams.codecs import make_codec
    from streams.runtime.clients import idempotent_producer

    topic = settings.topic("interactions")
    return produce_file(
        path or bundled_wikipedia(),
        idempotent_producer(settings),
        make_codec(settings, INTERACTION, topic),
        topic,
        start=start,
        limit=limit,
    )


def produce_messages(
    settings: Settings,
    messages: Iterable[tuple[bytes | None, bytes | None]],
    message_max_bytes: int | None = None,
) -> int:
    """Send ready-made (key, value) pairs to `interactions` in order, with one idempotent
    producer (so each partition keeps their order); raise on any delivery failure.
    ``message_max_bytes``: the producer's limit, when messages may be larger than its
    default (1,000,000 bytes)."""
    from streams.runtime.clients import idempotent_producer

    overrides = {} if message_max_bytes is None else {"message.max.bytes": message_max_bytes}
    sender = Sender(idempotent_producer(settings, **overrides), settings.topic("interactions"))
    sent = 0
    for key, value in messages:
        sender.send(key, value)
        sent += 1
    sender.flush()
    return sent

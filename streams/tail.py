"""A read_committed tail of the recommendations topic."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

from confluent_kafka import KafkaError

from schemas import RECOMMENDATION, Codec
from streams.kafka import committed_reader
from streams.settings import Settings


def tail_recommendations(
    settings: Settings,
    follow: bool = False,
    user: str | None = None,
    limit: int | None = None,
    idle_timeout_s: float = 3.0,
) -> Iterator[dict[str, Any]]:
    """Decoded recommendations from the start; without ``follow``, stop at the end."""
    topic = settings.topic("recommendations")
    codec = Codec(RECOMMENDATION)
    consumer = committed_reader(settings, group_id=f"jodie-tail-{uuid.uuid4().hex[:8]}")
    consumer.subscribe([topic])
    seen = 0
    at_end: set[int] = set()
    try:
        while limit is None or seen < limit:
            msg = consumer.poll(1.0 if follow else idle_timeout_s)
            if msg is None:
                if follow:
                    continue
                return
            err = msg.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    at_end.add(msg.partition() or 0)
                    if not follow and len(at_end) == len(consumer.assignment()):
                        return
                    continue
                raise RuntimeError(f"reading {topic}: {err}")
            at_end.discard(msg.partition() or 0)
            if user is not None and (msg.key() or b"").decode() != user:
                continue
            seen += 1
            yield codec.decode(msg.value() or b"")
    finally:
        consumer.close()

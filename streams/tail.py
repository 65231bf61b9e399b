"""A read_committed tail of the recommendations topic."""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
from confluent_kafka import KafkaError

from operators.evaluation.metrics import mrr, recall_at_k
from schemas import RECOMMENDATION, Codec
from streams.runtime.clients import committed_reader
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


def summarise(recs: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """What a consumer saw: counts, duplicates, versions and the live MRR / Recall@10."""
    ids: Counter[str] = Counter()
    versions: Counter[str] = Counter()
    ranks: list[int] = []
    for rec in recs:
        ids[rec["event_id"]] += 1
        versions[rec["model_version"]] += 1
        if rec.get("rank") is not None:
            ranks.append(int(rec["rank"]))
    r = np.asarray(ranks, dtype=np.int64)
    return {
        "recommendations": sum(ids.values()),
        "distinct_events": len(ids),
        "duplicates": sum(n - 1 for n in ids.values()),
        "model_versions": dict(versions),
        "ranked": int(r.size),
        "mrr": mrr(r),
        "recall_at_10": recall_at_k(r, 10),
    }

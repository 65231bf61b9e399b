"""A read_committed tail of the recommendations and evaluations topics."""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any, Literal

import numpy as np
from confluent_kafka import KafkaError

from operators.evaluation.metrics import mrr, recall_at_k
from operators.evaluation.served import ServedTally
from schemas import Codec
from streams.codecs import TOPIC_SCHEMAS
from streams.exceptions import ReadError, TopicMissingError
from streams.runtime.clients import committed_reader
from streams.settings import Settings


def tail(
    settings: Settings,
    name: Literal["recommendations", "evaluations"],
    follow: bool = False,
    user: str | None = None,
    limit: int | None = None,
    idle_timeout_s: float = 3.0,
) -> Iterator[dict[str, Any]]:
    """Decoded records of topic ``name`` from the start, ``user``'s only if given; without
    ``follow``, stop at the end."""
    topic = settings.topic(name)
    codec = Codec(TOPIC_SCHEMAS[name])
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
                if err.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
                    raise TopicMissingError(
                        f"topic {topic} does not exist; create the pipeline's topics with "
                        "`jodie topics apply`, or set JODIE_TOPIC_PREFIX to the pipeline's"
                    )
                raise ReadError(f"reading {topic}: {err}")
            at_end.discard(msg.partition() or 0)
            if user is not None and (msg.key() or b"").decode() != user:
                continue
            seen += 1
            yield codec.decode(msg.value() or b"")
    finally:
        consumer.close()


def summarise(
    recs: Iterable[dict[str, Any]], evaluations: Iterable[dict[str, Any]], k: int = 10
) -> dict[str, Any]:
    """What a consumer saw: counts, duplicates, versions, the live MRR / Recall@10 (from
    the evaluations, one per event: a repeated one counts once), and the served lists: where
    each event's item stood in the list its user got before it (``served``, next to the
    recent-then-popular heuristic's; recommendations are keyed by user, so each user's come
    in order)."""
    ids: Counter[str] = Counter()
    versions: Counter[str] = Counter()
    served = ServedTally(k, max_users=10_000_000)
    for rec in recs:
        ids[rec["event_id"]] += 1
        versions[rec["model_version"]] += 1
        if ids[rec["event_id"]] == 1 and rec.get("item_id"):
            served.event(rec["user_id"], rec["item_id"], [c["item_id"] for c in rec["candidates"]])
    ranks = {e["event_id"]: int(e["rank"]) for e in evaluations}
    r = np.fromiter(ranks.values(), dtype=np.int64, count=len(ranks))
    return {
        "recommendations": sum(ids.values()),
        "distinct_events": len(ids),
        "duplicates": sum(n - 1 for n in ids.values()),
        "model_versions": dict(versions),
        "ranked": int(r.size),
        "mrr": mrr(r),
        "recall_at_10": recall_at_k(r, 10),
        "served": served.summary(),
    }

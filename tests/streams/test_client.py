"""The client API on the real broker: interactions sent one at a time and in batches go
through the router and a worker, and come back as the recommendations the client reads."""

from __future__ import annotations

import threading
from collections import Counter
from itertools import islice
from pathlib import Path

import pytest

from operators.dataset import bundled_wikipedia, iter_rows
from schemas import RECOMMENDATION, Codec
from streams.client import Client, Interaction
from streams.router import Router
from streams.runtime.clients import transactional_producer
from streams.settings import Settings
from tests.streams.harness import HISTORY, make_checkpoint, start_worker, stop

pytestmark = pytest.mark.kafka

N = 120  # events sent after the checkpoint's history


def test_sent_interactions_come_back_as_recommendations(kafka: Settings, tmp_path: Path) -> None:
    checkpoint = make_checkpoint(tmp_path / "v1", version="client-v1")
    rows = list(islice(iter_rows(bundled_wikipedia()), HISTORY, HISTORY + N))
    worker = start_worker(kafka, checkpoint, 0, tmp_path)
    try:
        with Client(kafka) as client:
            # Opened before anything is sent: it reads what commits from now on.
            stream = client.recommendations(limit=N, idle_timeout_s=300)
            half = N // 2
            sent = [client.send(r.user_id, r.item_id, r.timestamp, r.features) for r in rows[:half]]
            # A re-send with the same id is deduplicated by the router.
            client.send(
                rows[0].user_id,
                rows[0].item_id,
                rows[0].timestamp,
                rows[0].features,
                event_id=sent[0],
            )
            batch = [
                Interaction(r.user_id, r.item_id, r.timestamp, r.features, f"batch-{r.line}")
                for r in rows[half:]
            ]
            assert client.send_many(batch, flush_every=25) == N - half
            sent += [e.event_id or "" for e in batch]
            stats = Router(kafka, grace_s=0.2).run(until_idle_s=1.0, max_seconds=120)
            assert stats.sequenced == N and stats.duplicates == 1
            got = list(stream)
            # One user's, from the start, read from that user's partition alone.
            user = Counter(r.user_id for r in rows).most_common(1)[0][0]
            mine = list(client.recommendations(user, follow=False, from_beginning=True))
    finally:
        stop(worker)
    assert len(got) == N, (tmp_path / "worker-0.log").read_text()[-3000:]
    assert sorted(r["event_id"] for r in got) == sorted(sent)
    assert {r["model_version"] for r in got} == {"client-v1"}
    assert all(len(r["candidates"]) == kafka.candidates for r in got)
    assert [r["event_id"] for r in mine] == [r["event_id"] for r in got if r["user_id"] == user]
    assert len(mine) == sum(r.user_id == user for r in rows) > 1


def _recommendation(user: str, event_id: str) -> bytes:
    return Codec(RECOMMENDATION).encode(
        {
            "user_id": user,
            "event_id": event_id,
            "item_id": "i",
            "timestamp": 1.0,
            "model_version": "v",
            "projected_user": [],
            "predicted_item": [],
            "candidates": [{"item_id": "j", "score": 0.5}],
            "state_change_probability": None,
        }
    )


def test_a_stream_from_now_reads_what_commits_after_it_was_made(kafka: Settings) -> None:
    """Positioned at the last stable offset when made: a transaction committed before is not
    read, one open then and committed later is, and so is everything after."""
    topic = kafka.topic("recommendations")
    producer = transactional_producer(kafka, f"{kafka.topic_prefix}client-test")
    producer.init_transactions(30)
    producer.begin_transaction()
    producer.produce(topic, key=b"u", value=_recommendation("u", "before"))
    producer.commit_transaction(30)
    producer.begin_transaction()
    producer.produce(topic, key=b"u", value=_recommendation("u", "open"))
    producer.flush(30)
    with Client(kafka) as client:
        stream = client.recommendations(limit=2, idle_timeout_s=60)
        producer.commit_transaction(30)
        producer.begin_transaction()
        producer.produce(topic, key=b"u", value=_recommendation("u", "after"))
        producer.commit_transaction(30)
        assert [r["event_id"] for r in stream] == ["open", "after"]
        everything = client.recommendations(follow=False, from_beginning=True)
        assert [r["event_id"] for r in everything] == ["before", "open", "after"]


@pytest.mark.timeout(120)  # a stream that ignored stop() would wait for ever
def test_a_following_stream_stops_when_asked_from_another_thread(kafka: Settings) -> None:
    with Client(kafka) as client:
        stream = client.recommendations()  # follows, no idle timeout: only stop() ends it
        asked = threading.Event()

        def ask() -> None:
            asked.wait(30)
            stream.stop()

        threading.Thread(target=ask, daemon=True).start()
        asked.set()
        assert list(stream) == []
        assert list(stream) == []  # ended and closed: stays empty

"""The dashboard's Kafka side on the real broker: lag from committed offsets, missing topics."""

from __future__ import annotations

import threading
import uuid

import pytest
from confluent_kafka import TopicPartition

from streams.dashboard.board import Board
from streams.dashboard.exceptions import DashboardError
from streams.dashboard.reader import Reader, group_lag, worker_page
from streams.runtime.clients import admin, committed_reader, idempotent_producer
from streams.settings import Settings

pytestmark = pytest.mark.kafka


def test_group_lag_counts_what_the_group_has_not_committed(kafka: Settings) -> None:
    topic = kafka.topic("user-inbox")  # a keyed topic: JODIE_PARTITIONS (4) partitions
    producer = idempotent_producer(kafka)
    for n in range(10):
        producer.produce(topic, key=b"k", value=str(n).encode(), partition=n % 2)
    assert producer.flush(30) == 0
    client = admin(kafka)
    group = f"lag-{uuid.uuid4().hex[:8]}"
    # A fresh group coordinator may take seconds to load on a busy machine.
    assert group_lag(client, group, [topic], timeout_s=30) == 10  # a group that committed nothing
    consumer = committed_reader(kafka, group)
    try:
        # 5 messages on each of partitions 0 and 1: the group is done with 3 of p0, 5 of p1.
        consumer.commit(offsets=[TopicPartition(topic, 0, 3), TopicPartition(topic, 1, 5)])
    finally:
        consumer.close()
    assert group_lag(client, group, [topic], timeout_s=30) == 2


def test_missing_topics_name_the_fix(broker: Settings) -> None:
    settings = Settings(topic_prefix=f"none{uuid.uuid4().hex[:6]}-")
    with pytest.raises(DashboardError, match=r"jodie topics apply.*JODIE_TOPIC_PREFIX"):
        Reader(settings, Board(), threading.Lock(), backfill=10)


def test_a_worker_that_does_not_answer_is_reported_not_raised() -> None:
    assert worker_page(9) == {"port": 9, "answered": False}

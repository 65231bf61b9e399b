"""The group directory finds which member owns a partition and where it answers, on the real
broker: members advertise their endpoints in their client ids."""

from __future__ import annotations

import time
import uuid

import pytest
from confluent_kafka import Consumer

from streams.runtime import clients
from streams.runtime.directory import Directory, advertise
from streams.settings import Settings

pytestmark = pytest.mark.kafka


def _member(settings: Settings, group: str, name: str, port: int, topic: str) -> Consumer:
    consumer = clients.consumer(
        settings,
        group,
        {
            "client.id": advertise(name, "127.0.0.1", port),
            "partition.assignment.strategy": "range",
            "session.timeout.ms": 6000,
        },
    )
    consumer.subscribe([topic])
    return consumer


def _settle(members: list[Consumer], topic: str, partitions: int, timeout_s: float) -> None:
    """Poll every member until their assignments cover the topic once (bounded)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for m in members:
            m.poll(0.2)
        owned = [tp.partition for m in members for tp in m.assignment() if tp.topic == topic]
        if sorted(owned) == list(range(partitions)) and all(m.assignment() for m in members):
            return
    raise AssertionError("the group did not settle")


def test_the_owner_of_each_partition_and_its_endpoint(kafka: Settings) -> None:
    topic, group = kafka.topic("user-inbox"), f"{kafka.topic_prefix}dir-{uuid.uuid4().hex[:6]}"
    first = _member(kafka, group, "member-a", 7001, topic)
    directory = Directory(kafka, group, ttl_s=60.0)
    try:
        _settle([first], topic, kafka.partitions, timeout_s=60)
        for p in range(kafka.partitions):
            owner = directory.owner(topic, p, fresh=True)
            assert owner is not None and (owner.name, owner.endpoint) == (
                "member-a",
                "127.0.0.1:7001",
            )
        second = _member(kafka, group, "member-b", 7002, topic)
        try:
            _settle([first, second], topic, kafka.partitions, timeout_s=60)
            # Cached for ttl_s: the description from before the rebalance until asked afresh.
            assert directory.owner(topic, 0).name == "member-a"  # type: ignore[union-attr]
            mine = {
                "member-a": {tp.partition for tp in first.assignment()},
                "member-b": {tp.partition for tp in second.assignment()},
            }
            for p in range(kafka.partitions):
                owner = directory.owner(topic, p, fresh=True)
                assert owner is not None and p in mine[owner.name]
                assert owner.endpoint == f"127.0.0.1:{7001 if owner.name == 'member-a' else 7002}"
            assert directory.owner("no-such-topic", 0) is None
        finally:
            second.close()
    finally:
        first.close()

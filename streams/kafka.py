"""confluent-kafka client factories configured from the settings."""

from __future__ import annotations

import logging
from typing import Any

from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient

from streams.settings import Settings

_log = logging.getLogger("jodie.kafka")


def admin(settings: Settings) -> AdminClient:
    config: dict[str, Any] = {"bootstrap.servers": settings.bootstrap_servers, "logger": _log}
    return AdminClient(config)


def idempotent_producer(settings: Settings, **overrides: Any) -> Producer:
    """A producer that never duplicates or reorders on retries (per partition, per session)."""
    config: dict[str, Any] = {
        "bootstrap.servers": settings.bootstrap_servers,
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 20,
        # Java's partitioner, as Faust (aiokafka) uses: a key lands on the same partition
        # whichever client writes it, which the co-partitioned tables rely on.
        "partitioner": "murmur2_random",
        "batch.size": 1 << 20,
        "compression.type": "lz4",
        "logger": _log,
    }
    config.update(overrides)
    return Producer(config)


def committed_reader(settings: Settings, group_id: str, **overrides: Any) -> Consumer:
    """A read_committed consumer: sees only messages of committed transactions."""
    config: dict[str, Any] = {
        "bootstrap.servers": settings.bootstrap_servers,
        "group.id": group_id,
        "isolation.level": "read_committed",
        "auto.offset.reset": "earliest",
        "enable.auto.commit": False,
        "enable.partition.eof": True,
        "logger": _log,
    }
    config.update(overrides)
    return Consumer(config)

"""The one place Kafka clients are built: connection and security from the settings, the rest
from the caller.

Every Producer, Consumer and AdminClient of the project comes from here, so a cluster that
needs TLS or SASL is reached by setting ``JODIE_SECURITY_PROTOCOL`` and friends once, not by
editing each client. Callers pass only what is specific to their client (group id,
transactional id, isolation level, ...).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient

_log = logging.getLogger("jodie.kafka")


class Secret(Protocol):
    """A value kept out of reprs and logs (pydantic's ``SecretStr`` is one)."""

    def get_secret_value(self) -> str: ...


class KafkaConnection(Protocol):
    """How to reach and authenticate to the cluster; ``streams.settings.Settings`` is one."""

    @property
    def bootstrap_servers(self) -> str: ...
    @property
    def security_protocol(self) -> str: ...
    @property
    def sasl_mechanism(self) -> str | None: ...
    @property
    def sasl_username(self) -> str | None: ...
    @property
    def sasl_password(self) -> Secret | None: ...
    @property
    def ssl_ca_location(self) -> Path | None: ...
    @property
    def ssl_certificate_location(self) -> Path | None: ...
    @property
    def ssl_key_location(self) -> Path | None: ...
    @property
    def ssl_key_password(self) -> Secret | None: ...


@dataclass(frozen=True)
class Connection:
    """A connection given by value (a broker probed by address, the runtime's own tests)."""

    bootstrap_servers: str
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: Secret | None = None
    ssl_ca_location: Path | None = None
    ssl_certificate_location: Path | None = None
    ssl_key_location: Path | None = None
    ssl_key_password: Secret | None = None


def client_config(
    conn: KafkaConnection, specific: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """librdkafka properties of a client: the connection's, then ``specific`` on top."""
    config: dict[str, Any] = {
        "bootstrap.servers": conn.bootstrap_servers,
        "security.protocol": conn.security_protocol,
        "logger": _log,
    }
    optional: dict[str, object] = {
        "sasl.mechanism": conn.sasl_mechanism,
        "sasl.username": conn.sasl_username,
        "sasl.password": conn.sasl_password,
        "ssl.ca.location": conn.ssl_ca_location,
        "ssl.certificate.location": conn.ssl_certificate_location,
        "ssl.key.location": conn.ssl_key_location,
        "ssl.key.password": conn.ssl_key_password,
    }
    for key, value in optional.items():
        if value is None:
            continue
        secret = getattr(value, "get_secret_value", None)
        config[key] = secret() if callable(secret) else str(value)
    config.update(specific or {})
    return config


def producer(conn: KafkaConnection, specific: Mapping[str, Any] | None = None) -> Producer:
    return Producer(client_config(conn, specific))


def consumer(
    conn: KafkaConnection, group_id: str, specific: Mapping[str, Any] | None = None
) -> Consumer:
    return Consumer(client_config(conn, {"group.id": group_id, **(specific or {})}))


def admin(conn: KafkaConnection, specific: Mapping[str, Any] | None = None) -> AdminClient:
    return AdminClient(client_config(conn, specific))


# Java's partitioner: a key lands on the same partition whichever client writes it, which
# co-partitioned tables rely on.
_JAVA_PARTITIONER = {"partitioner": "murmur2_random"}


def idempotent_producer(conn: KafkaConnection, **overrides: Any) -> Producer:
    """A producer that never duplicates or reorders on retries (per partition, per session)."""
    return producer(
        conn,
        {
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 20,
            **_JAVA_PARTITIONER,
            "batch.size": 1 << 20,
            "compression.type": "lz4",
            **overrides,
        },
    )


def transactional_producer(
    conn: KafkaConnection, transactional_id: str, **overrides: Any
) -> Producer:
    """A producer whose sends commit or abort together; a second one with the same id fences
    the first and aborts what it left open."""
    return producer(
        conn,
        {
            "transactional.id": transactional_id,
            **_JAVA_PARTITIONER,
            "compression.type": "lz4",
            **overrides,
        },
    )


def committed_reader(conn: KafkaConnection, group_id: str, **overrides: Any) -> Consumer:
    """A read_committed consumer: sees only messages of committed transactions."""
    return consumer(
        conn,
        group_id,
        {
            "isolation.level": "read_committed",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            **overrides,
        },
    )

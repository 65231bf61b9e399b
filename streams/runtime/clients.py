"""The one place Kafka clients are built: connection and security from the settings, the rest
from the caller.

Every Producer, Consumer and AdminClient of the project comes from here, so a cluster that
needs TLS or SASL is reached by setting ``JODIE_SECURITY_PROTOCOL`` and friends once, not by
editing each client. Callers pass only what is specific to their client (group id,
transactional id, isolation level, ...).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer
from confluent_kafka.admin import AdminClient

from streams.runtime.exceptions import AuthenticationError

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
    if conn.security_protocol != "PLAINTEXT":
        # librdkafka retries a refused login forever; a client that is refused later (a
        # password changed under it) stops at its next poll, flush or consume instead.
        config["error_cb"] = _raise_on_login_error(conn)
    config.update(specific or {})
    return config


def producer(conn: KafkaConnection, specific: Mapping[str, Any] | None = None) -> Producer:
    _check_login_once(conn)
    return Producer(client_config(conn, specific))


#: Kilobytes a consumer fetches ahead of what it handed over (librdkafka's
#: ``queued.max.messages.kbytes``). Its default, 64 MiB per consumer, fills whenever the
#: application runs behind, a lag held in memory for nothing (the broker keeps it anyway). A
#: worker's batch of 2,000 inbox messages takes a few hundred KiB: 8 MiB keeps polls fed.
PREFETCH_KB = 8 << 10

#: How long a consumer whose prefetch is full waits before it fetches again (librdkafka's
#: ``fetch.queue.backoff.ms``). At its default, a second, a consumer that drains its 8 MiB
#: faster than that starves until the second is over: the router, reading events with 172
#: features, spent a third of its time waiting in ``poll`` on a backlog whose next messages
#: were already at the broker.
FETCH_BACKOFF_MS = 100


def consumer_config(
    conn: KafkaConnection, group_id: str, specific: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """A consumer's properties: the connection's, a bounded prefetch refilled promptly, then
    ``specific``."""
    return client_config(
        conn,
        {
            "group.id": group_id,
            "queued.max.messages.kbytes": PREFETCH_KB,
            "fetch.queue.backoff.ms": FETCH_BACKOFF_MS,
            **(specific or {}),
        },
    )


def consumer(
    conn: KafkaConnection, group_id: str, specific: Mapping[str, Any] | None = None
) -> Consumer:
    _check_login_once(conn)
    return Consumer(consumer_config(conn, group_id, specific))


def admin(conn: KafkaConnection, specific: Mapping[str, Any] | None = None) -> AdminClient:
    _check_login_once(conn)
    return AdminClient(client_config(conn, specific))


# --- the login -----------------------------------------------------------------------------
# A wrong password or an untrusted certificate is never transient, but librdkafka retries it
# forever: a client would wait out each call's timeout and then report only "transport
# failure". So the first client of each login in a process checks it with a short metadata
# request, and refusals become one AuthenticationError naming what to fix.

_LOGIN_ERRORS = (KafkaError._AUTHENTICATION, KafkaError._SSL)
_logins_ok: set[tuple[str, ...]] = set()


def _login_key(conn: KafkaConnection) -> tuple[str, ...]:
    password = conn.sasl_password.get_secret_value() if conn.sasl_password else ""
    return (
        conn.bootstrap_servers,
        conn.security_protocol,
        str(conn.sasl_mechanism),
        str(conn.sasl_username),
        hashlib.sha256(password.encode()).hexdigest(),
        str(conn.ssl_ca_location),
        str(conn.ssl_certificate_location),
    )


def _refused(conn: KafkaConnection, error: KafkaError) -> AuthenticationError:
    # librdkafka: "<broker>: SASL authentication error: <reason> (after 334ms in state ...)".
    reason = error.str().split(" error: ", 1)[-1].split(" (after ", 1)[0]
    if error.code() == KafkaError._SSL:
        what, fix = "TLS with the brokers failed", "check JODIE_SSL_CA_LOCATION"
    else:
        what = f"the brokers refused the login of {conn.sasl_username!r}"
        fix = "check JODIE_SASL_USERNAME and JODIE_SASL_PASSWORD"
    return AuthenticationError(f"{what} at {conn.bootstrap_servers}: {reason}; {fix}")


def _raise_on_login_error(conn: KafkaConnection) -> Any:
    def on_error(error: KafkaError) -> None:
        if error.code() in _LOGIN_ERRORS:
            raise _refused(conn, error)

    return on_error


def check_login(conn: KafkaConnection, timeout_s: float = 10.0) -> bool:
    """Whether the brokers answer a metadata request within ``timeout_s`` (False as soon as
    none can be reached); raises ``AuthenticationError`` as soon as they refuse the login or
    the TLS handshake fails."""
    refusals: list[KafkaError] = []
    unreachable: list[KafkaError] = []

    def on_error(error: KafkaError) -> None:
        if error.code() in _LOGIN_ERRORS:
            refusals.append(error)
        elif error.code() == KafkaError._ALL_BROKERS_DOWN:
            unreachable.append(error)

    quiet = logging.getLogger("jodie.kafka.login")
    quiet.addHandler(logging.NullHandler())
    quiet.propagate = False  # the refusal is raised, not logged once per retry
    client = AdminClient(client_config(conn, {"error_cb": on_error, "logger": quiet}))
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client.list_topics(timeout=min(0.5, timeout_s))
            return True
        except KafkaException:
            pass
        client.poll(0)  # serves on_error
        if refusals:  # a refused login also reads as "brokers down": it decides first
            raise _refused(conn, refusals[0])
        if unreachable or time.monotonic() >= deadline:
            return False


def _check_login_once(conn: KafkaConnection) -> None:
    if conn.security_protocol == "PLAINTEXT":
        return
    key = _login_key(conn)
    if key in _logins_ok:
        return
    # Unreachable brokers (False) are left to the client's own timeouts, as on PLAINTEXT.
    if check_login(conn):
        _logins_ok.add(key)


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


#: librdkafka's wait before retrying a request the broker asked to retry, and its cap as the
#: waits double (defaults 100 ms and 1 s). A transaction that starts right after a commit
#: meets CONCURRENT_TRANSACTIONS while the coordinator still writes the last one's markers
#: (a few ms), and librdkafka waits the backoff before it asks again; the Java client retries
#: that error after 20 ms for the same reason. Measured with benchmarks/stream_throughput.py
#: --mode latency at 500 events/s, two runs each, alternated: p99 produce → recommendation
#: 677 and 696 ms with the defaults, 450 and 537 ms with these.
TXN_RETRY_BACKOFF_MS, TXN_RETRY_BACKOFF_MAX_MS = 10, 100


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
            "retry.backoff.ms": TXN_RETRY_BACKOFF_MS,
            "retry.backoff.max.ms": TXN_RETRY_BACKOFF_MAX_MS,
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

"""The client factory: every client gets the connection and security settings, callers only
what is specific to them."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from confluent_kafka import Consumer
from pydantic import SecretStr

from streams.runtime.clients import (
    FETCH_BACKOFF_MS,
    PREFETCH_KB,
    Connection,
    check_login,
    client_config,
    committed_reader,
    consumer_config,
)
from streams.settings import Settings

_SECURE = {
    "JODIE_BOOTSTRAP": "kafka-1:9093,kafka-2:9093",
    "JODIE_SECURITY_PROTOCOL": "SASL_SSL",
    "JODIE_SASL_MECHANISM": "SCRAM-SHA-512",
    "JODIE_SASL_USERNAME": "jodie",
    "JODIE_SASL_PASSWORD": "s3cret",
    "JODIE_SSL_CA_LOCATION": "/etc/kafka/ca.pem",
}


def test_plaintext_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (*_SECURE, "JODIE_SSL_KEY_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("JODIE_BROKER_PORT", "19999")
    config = client_config(Settings())
    assert config["bootstrap.servers"] == "127.0.0.1:19999"
    assert config["security.protocol"] == "PLAINTEXT"
    assert not [k for k in config if k.startswith(("sasl.", "ssl."))]


def test_security_settings_reach_every_client(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in _SECURE.items():
        monkeypatch.setenv(name, value)
    settings = Settings()
    assert "s3cret" not in repr(settings)  # the password stays out of logs
    config = client_config(settings, {"group.id": "g", "isolation.level": "read_committed"})
    assert config["bootstrap.servers"] == "kafka-1:9093,kafka-2:9093"
    assert config["security.protocol"] == "SASL_SSL"
    assert config["sasl.mechanism"] == "SCRAM-SHA-512"
    assert config["sasl.username"] == "jodie"
    assert config["sasl.password"] == "s3cret"
    assert config["ssl.ca.location"] == "/etc/kafka/ca.pem"
    assert config["group.id"] == "g" and config["isolation.level"] == "read_committed"
    # librdkafka accepts the keys (it connects lazily; only the CA file is read at once).
    committed_reader(settings.model_copy(update={"ssl_ca_location": None}), "g").close()


def test_mutual_tls_by_value() -> None:
    conn = Connection(
        "broker:9093",
        security_protocol="SSL",
        ssl_certificate_location=Path("/certs/client.pem"),
        ssl_key_location=Path("/certs/client.key"),
        ssl_key_password=SecretStr("pass"),
    )
    config = client_config(conn)
    assert config["security.protocol"] == "SSL"
    assert config["ssl.certificate.location"] == "/certs/client.pem"
    assert config["ssl.key.location"] == "/certs/client.key"
    assert config["ssl.key.password"] == "pass"
    assert "sasl.mechanism" not in config


def test_the_caller_specific_part_wins() -> None:
    config = client_config(Connection("b:1"), {"client.id": "w-0", "security.protocol": "SSL"})
    assert config["client.id"] == "w-0" and config["security.protocol"] == "SSL"


def test_consumers_fetch_a_bounded_amount_ahead() -> None:
    """librdkafka's default prefetch (64 MiB a consumer) fills whenever the application lags;
    every consumer of the project asks for less, unless its caller says otherwise."""
    config = consumer_config(Connection("b:1"), "g")
    assert config["queued.max.messages.kbytes"] == PREFETCH_KB < 64 << 10
    assert config["group.id"] == "g"
    own = consumer_config(Connection("b:1"), "g", {"queued.max.messages.kbytes": 1024})
    assert own["queued.max.messages.kbytes"] == 1024


def test_a_full_prefetch_is_refilled_well_within_a_second() -> None:
    """librdkafka waits ``fetch.queue.backoff.ms`` (1,000 by default) before fetching again
    for a consumer whose prefetch is full, and a consumer that drains 8 MiB faster than that
    then starves on a backlog the broker holds; every consumer of the project asks sooner."""
    config = consumer_config(Connection("b:1"), "g")
    assert config["fetch.queue.backoff.ms"] == FETCH_BACKOFF_MS <= 100
    Consumer(config).close()  # a property this librdkafka knows, in its range
    own = consumer_config(Connection("b:1"), "g", {"fetch.queue.backoff.ms": 5})
    assert own["fetch.queue.backoff.ms"] == 5


def test_an_unreachable_secured_cluster_is_not_a_refused_login() -> None:
    # Nothing listens on port 1: "not reachable" at once, left to the client's own timeouts.
    conn = Connection(
        "127.0.0.1:1",
        security_protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username="u",
        sasl_password=SecretStr("p"),
    )
    began = time.monotonic()
    assert check_login(conn, timeout_s=10) is False
    assert time.monotonic() - began < 5

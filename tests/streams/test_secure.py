"""The pipeline on the secure broker (TLS, SCRAM, ACLs), each role with its own principal:
exact results, a refused login that fails fast, and the denials the ACLs promise.

Run with ``-s`` to see the denials.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from confluent_kafka import KafkaError

from streams.peek import read_all
from streams.produce import produce_rows
from streams.router import Router
from streams.runtime import clients
from streams.runtime.exceptions import AuthenticationError
from streams.settings import Settings
from streams.tail import tail
from tests.conftest import SecureBroker
from tests.streams.harness import (
    HISTORY,
    assert_equal_to_reference,
    make_checkpoint,
    reference,
    start_worker,
    stop,
    wait_for,
)

pytestmark = pytest.mark.kafka

EVENTS = 300  # a few hundred: the secure broker shares CI's two cores with the plain one


def _send(settings: Settings, topic: str) -> KafkaError | None:
    """Produce one message to ``topic`` (logical name) as ``settings``' principal; the
    delivery error, if any."""
    errors: list[KafkaError | None] = []
    producer = clients.producer(settings, {"message.timeout.ms": 10_000})
    producer.produce(
        settings.topic(topic), key=b"k", value=b"v", on_delivery=lambda e, _m: errors.append(e)
    )
    producer.flush(15)
    assert errors, f"no delivery report for {topic}"
    return errors[0]


def test_the_pipeline_is_exact_with_a_principal_per_role(
    secure_broker: SecureBroker, secure_topics: str, tmp_path: Path
) -> None:
    checkpoint = make_checkpoint(tmp_path / "ckpt")
    client = secure_broker.settings("client", secure_topics)
    router = secure_broker.settings("router", secure_topics)
    trainer = secure_broker.settings("trainer", secure_topics)

    produce_rows(client, start=HISTORY, limit=EVENTS)
    stats = Router(router, grace_s=0.2).run(until_idle_s=1.0, max_seconds=120)
    assert stats.sequenced == EVENTS
    worker = start_worker(
        client, checkpoint, 0, tmp_path, env=secure_broker.env("worker", secure_topics)
    )
    try:
        recs = wait_for(client, EVENTS, timeout_s=180)
    finally:
        stop(worker)
    assert len(recs) == EVENTS, (tmp_path / "worker-0.log").read_text()[-3000:]
    assert Counter(r["event_id"] for r in recs).most_common(1)[0][1] == 1
    # The operator (trainer) reads the tables' changelogs; they equal the sequential replay.
    assert_equal_to_reference(
        trainer, checkpoint, reference(checkpoint, range(HISTORY, HISTORY + EVENTS))
    )


def test_a_wrong_password_fails_fast_with_a_clear_message(
    secure_broker: SecureBroker, secure_topics: str
) -> None:
    wrong = secure_broker.settings("client", secure_topics, sasl_password="not-the-password")
    began = time.monotonic()
    with pytest.raises(AuthenticationError) as refused:
        produce_rows(wrong, start=HISTORY, limit=1)
    took = time.monotonic() - began
    message = str(refused.value)
    assert took < 15, f"took {took:.1f} s"
    assert "refused the login of 'client'" in message and "JODIE_SASL_PASSWORD" in message
    assert "\n" not in message
    print(f"\nwrong password, in {took:.1f} s: {message}")

    # The command line says it in one line and exits 2, whichever command logs in first
    # (here one that would otherwise wait its 60 s for a broker that "is not ready").
    env = {**os.environ, **secure_broker.env("client", secure_topics)}
    env["JODIE_SASL_PASSWORD"] = "not-the-password"
    began = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "streams", "broker", "wait", "--timeout", "60"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    took = time.monotonic() - began
    assert proc.returncode == 2, proc.stderr
    assert took < 15, f"took {took:.1f} s"
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the brokers refused the login of 'client'")
    print(f"jodie broker wait, in {took:.1f} s: {last}")


def test_each_role_gets_what_it_needs_and_a_client_no_more(
    secure_broker: SecureBroker, secure_topics: str
) -> None:
    client = secure_broker.settings("client", secure_topics)
    worker = secure_broker.settings("worker", secure_topics)
    trainer = secure_broker.settings("trainer", secure_topics)

    # What a client may do: send events, read recommendations.
    assert _send(client, "interactions") is None
    assert list(tail(client, "recommendations", idle_timeout_s=0.5)) == []

    print()
    denied = KafkaError.TOPIC_AUTHORIZATION_FAILED
    for who, settings, topic in [
        ("client", client, "models"),
        ("client", client, "interactions.log"),
        ("client", client, "user-inbox"),
        ("worker", worker, "models"),
    ]:
        error = _send(settings, topic)
        assert error is not None and error.code() == denied, (who, topic, error)
        print(f"denied: {who} writing {settings.topic(topic)}: {error.name()} ({error.str()})")
    with pytest.raises(RuntimeError, match="TOPIC_AUTHORIZATION_FAILED") as read:
        list(read_all(client, client.topic("interactions.log"), idle_timeout_s=2.0))
    print(f"denied: client reading {client.topic('interactions.log')}: {read.value}")

    # Only the trainer (the operator) writes `models`.
    assert _send(trainer, "models") is None

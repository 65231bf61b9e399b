"""`topics apply` on the real broker: creates, is idempotent, reports drift."""

from __future__ import annotations

import uuid

import pytest
from confluent_kafka.admin import NewTopic

from streams.runtime.clients import admin
from streams.settings import Settings
from streams.topics import apply_topics, declared_topics, delete_topics

pytestmark = pytest.mark.kafka


def test_apply_is_idempotent(kafka: Settings) -> None:
    reports = apply_topics(admin(kafka), declared_topics(kafka), 1)
    assert {r.action for r in reports} == {"ok"}
    assert len(reports) == 12


def test_drift_is_reported(broker: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    prefix = f"drift{uuid.uuid4().hex[:8]}-"
    monkeypatch.setenv("JODIE_TOPIC_PREFIX", prefix)
    settings = Settings()
    client = admin(settings)
    specs = declared_topics(settings)
    try:
        # Created by hand with the wrong partition count and policy.
        wrong = NewTopic(
            f"{prefix}interactions.log",
            num_partitions=2,
            replication_factor=1,
            config={"cleanup.policy": "delete"},
        )
        client.create_topics([wrong])[f"{prefix}interactions.log"].result()
        reports = {r.name: r for r in apply_topics(client, specs, 1)}
        log = reports[f"{prefix}interactions.log"]
        assert log.action == "drift"
        assert (
            f"partitions 2 != {settings.input_partitions} "
            "(set JODIE_INPUT_PARTITIONS=2 to keep it)" in log.drift
        )
        assert "cleanup.policy delete != compact" in log.drift
        assert reports[f"{prefix}interactions"].action == "created"
    finally:
        delete_topics(client, [s.name for s in specs])

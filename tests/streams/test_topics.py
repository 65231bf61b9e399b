"""`topics apply` on the real broker: creates, is idempotent, reports drift."""

from __future__ import annotations

import time
import uuid
from concurrent.futures import Future

import pytest
from confluent_kafka import KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import NewTopic

from streams.exceptions import PipelineRunningError
from streams.runtime.clients import admin, committed_reader
from streams.settings import Settings
from streams.topics import (
    apply_topics,
    declared_topics,
    delete_groups,
    delete_topics,
    pipeline_groups,
)

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


def test_deleting_the_pipeline_deletes_its_groups_offsets(kafka: Settings) -> None:
    """A pipeline deleted and created again under the same names starts from its first
    event: `topics delete` removes the router's and the workers' groups with the topics, so no
    offset of the deleted topics is read again; a live group is refused with what to do."""
    topic = kafka.topic("interactions")
    router_group, workers_group = pipeline_groups(kafka)
    for group in (router_group, workers_group):
        consumer = committed_reader(kafka, group_id=group)
        consumer.commit(offsets=[TopicPartition(topic, 0, 31_495)], asynchronous=False)
        consumer.close()
    client = admin(kafka)
    assert sorted(delete_groups(client, [*pipeline_groups(kafka), "never-was"])) == sorted(
        pipeline_groups(kafka)
    )
    reader = committed_reader(kafka, group_id=router_group)
    try:
        [left] = reader.committed([TopicPartition(topic, 0)], timeout=10)
        assert left.offset < 0  # nothing committed any more

        reader.subscribe([topic])  # a member: the broker will not delete the group now
        deadline = time.monotonic() + 30
        while not reader.assignment() and time.monotonic() < deadline:
            reader.poll(0.2)
        with pytest.raises(PipelineRunningError, match="stop the router and the workers"):
            delete_groups(client, [router_group])
    finally:
        reader.close()


class _LoadingCoordinator:
    """An admin client whose broker has just started: the first ``loading`` deletions answer
    "coordinator load in progress", as a real one does for a few seconds."""

    def __init__(self, loading: int) -> None:
        self.loading = loading
        self.asked: list[str] = []

    def delete_consumer_groups(
        self, groups: list[str], request_timeout: float
    ) -> dict[str, Future[None]]:
        futures: dict[str, Future[None]] = {}
        for group in groups:
            self.asked.append(group)
            future: Future[None] = Future()
            if self.loading > 0:
                self.loading -= 1
                error = KafkaError(KafkaError.COORDINATOR_LOAD_IN_PROGRESS)
                future.set_exception(KafkaException(error))
            else:
                future.set_result(None)
            futures[group] = future
        return futures


def test_deleting_groups_waits_out_a_coordinator_still_loading() -> None:
    """`topics delete` right after `broker up` (the demo does it) once stopped with a
    traceback: the group coordinator was still loading."""
    client = _LoadingCoordinator(loading=3)
    deleted = delete_groups(client, ["a", "b"], timeout_s=10)  # type: ignore[arg-type]
    assert deleted == ["a", "b"]
    assert client.asked == ["a", "a", "a", "a", "b"]

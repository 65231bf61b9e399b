"""`topics apply` on the real broker: creates, is idempotent, reports drift."""

from __future__ import annotations

import time
import uuid
from concurrent.futures import Future

import pytest
from confluent_kafka import KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import ConfigResource, NewTopic

from streams.exceptions import PipelineRunningError
from streams.runtime.clients import admin, committed_reader
from streams.settings import Settings
from streams.topics import (
    FRAMING_BYTES,
    apply_topics,
    changelog_topic,
    declared_topics,
    delete_groups,
    delete_topics,
    largest_record,
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


def test_a_changelog_created_before_its_record_limit_gets_it_in_place(
    broker: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pipeline whose changelogs were created with the brokers' record limit (about 1 MB)
    has it raised to the spec's by `apply`, reported as "updated" and not as drift (which
    would stop `jodie topics apply`); applied again, it is "ok"."""
    prefix = f"limit{uuid.uuid4().hex[:8]}-"
    monkeypatch.setenv("JODIE_TOPIC_PREFIX", prefix)
    settings = Settings()
    client = admin(settings)
    specs = declared_topics(settings)
    changelog = changelog_topic(settings, "user-state")
    try:
        old = NewTopic(
            changelog,
            num_partitions=settings.partitions,
            replication_factor=1,
            config={"cleanup.policy": "compact", "retention.ms": "-1"},
        )
        client.create_topics([old])[changelog].result()
        reports = {r.name: r for r in apply_topics(client, specs, 1)}
        assert reports[changelog].action == "updated", reports[changelog]
        assert reports[changelog].drift == [f"max.message.bytes 1048588 -> {32 << 20}"]
        resource = ConfigResource(ConfigResource.Type.TOPIC, changelog)
        deadline = time.monotonic() + 20  # the broker applies the change a moment later
        while True:
            configs = client.describe_configs([resource])[resource].result()
            if configs["max.message.bytes"].value != "1048588" or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert configs["max.message.bytes"].value == str(32 << 20)
        assert configs["cleanup.policy"].value == "compact"  # the others left as they were
        again = {r.name: r for r in apply_topics(client, specs, 1)}
        assert {r.action for r in again.values()} == {"ok"}
    finally:
        delete_topics(client, [s.name for s in specs])


def test_the_largest_record_a_workers_producer_sends_to_its_changelogs() -> None:
    settings = Settings(topic_prefix="p-")
    changelogs = [changelog_topic(settings, f"{side}-state") for side in ("user", "item")]
    assert largest_record(settings, changelogs) == (32 << 20) - FRAMING_BYTES
    # A topic without a declared limit takes what the brokers' default allows: the
    # client keeps its own default, below it.
    assert largest_record(settings, [*changelogs, settings.topic("recommendations")]) is None
    assert largest_record(settings, []) is None


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

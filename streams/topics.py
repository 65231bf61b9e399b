"""Create the declared topics on the cluster, idempotently, and report drift from the spec."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import (
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    NewTopic,
)

from deploy.topics import TopicSpec, load_topic_specs
from streams.exceptions import BrokerUnavailableError, PipelineRunningError, TopicMissingError
from streams.runtime.kafka import retry_transient
from streams.runtime.transactions import error_of
from streams.settings import Settings, read_settings


@dataclass
class TopicReport:
    """What `apply` did or found for one topic."""

    name: str
    action: str  # created | ok | updated (a limit raised in place) | drift
    drift: list[str] = field(default_factory=list)


def declared_topics(settings: Settings) -> list[TopicSpec]:
    return load_topic_specs(
        settings.partitions,
        settings.topic_prefix,
        input_partitions=settings.input_partitions,
        whole_partitions=settings.whole_partitions,
    )


def apply_topics(
    client: AdminClient,
    specs: list[TopicSpec],
    replication: int,
    timeout_s: float = 30.0,
    min_insync: int = 1,
) -> list[TopicReport]:
    """Create missing topics with ``replication`` replicas (acks=all writes needing
    ``min_insync`` of them); compare existing ones (partitions, replicas, configs) with the spec.

    Drift is reported, never "fixed" silently: changing the partition count of a keyed topic
    moves keys to other partitions and breaks the co-partitioning the workers rely on. The one
    exception is a record limit (``max.message.bytes``) below the spec's, which is raised in
    place and reported as "updated": it only lets more through.
    """
    existing = client.list_topics(timeout=timeout_s).topics
    missing = [s for s in specs if s.name not in existing]
    reports: dict[str, TopicReport] = {}
    # Set on the topic, not left to the brokers' default, so the guarantee travels with it.
    durability = {"min.insync.replicas": str(min_insync)} if replication > 1 else {}
    if missing:
        futures = client.create_topics(
            [
                NewTopic(
                    s.name,
                    num_partitions=s.partitions,
                    replication_factor=replication,
                    config={**s.configs(), **durability},
                )
                for s in missing
            ],
            operation_timeout=timeout_s,
        )
        for name, future in futures.items():
            try:
                future.result()
                reports[name] = TopicReport(name, "created")
            except KafkaException as exc:
                # Another process created it in between: fall through to the drift check.
                if "TOPIC_ALREADY_EXISTS" not in str(exc):
                    raise
    _wait_for_leaders(client, [s.name for s in specs], timeout_s)
    present = [s for s in specs if s.name not in reports]
    if present:
        metadata = client.list_topics(timeout=timeout_s).topics
        by_name = _describe(client, [s.name for s in present], timeout_s)
        for spec in present:
            drift: list[str] = []
            actual_partitions = len(metadata[spec.name].partitions)
            if actual_partitions != spec.partitions:
                # The partition count cannot shrink, and growing it moves keys: a pipeline
                # keeps its count by setting it (the setting is named when there is one).
                by = f" (set {spec.partitions_setting}={actual_partitions} to keep it)"
                drift.append(
                    f"partitions {actual_partitions} != {spec.partitions}"
                    + (by if spec.partitions_setting else "")
                )
            replicas = {len(p.replicas) for p in metadata[spec.name].partitions.values()}
            if replicas != {replication}:
                drift.append(f"replicas {','.join(map(str, sorted(replicas)))} != {replication}")
            configs = by_name[spec.name]
            raised: dict[str, str] = {}
            changed: list[str] = []
            for key, want in spec.configs().items():
                have = configs[key].value if key in configs else None
                if have == want:
                    continue
                if key in _RAISED_IN_PLACE and have is not None and int(have) < int(want):
                    raised[key] = want
                    changed.append(f"{key} {have} -> {want}")
                else:
                    drift.append(f"{key} {have} != {want}")
            if raised:
                # A larger record limit only lets more through: set where a pipeline created
                # before the spec raised it (what it holds stays readable as it is).
                _alter(client, spec.name, raised, timeout_s)
            action = "drift" if drift else "updated" if changed else "ok"
            reports[spec.name] = TopicReport(spec.name, action, drift + changed)
    return [reports[s.name] for s in specs]


#: Topic configs ``apply_topics`` raises on an existing topic instead of reporting drift.
_RAISED_IN_PLACE = frozenset({"max.message.bytes"})


def _alter(client: AdminClient, name: str, configs: dict[str, str], timeout_s: float) -> None:
    """Set ``configs`` on topic ``name``, leaving its other configs as they are."""
    entries = [
        ConfigEntry(key, value, incremental_operation=AlterConfigOpType.SET)
        for key, value in configs.items()
    ]
    resource = ConfigResource(ConfigResource.Type.TOPIC, name, incremental_configs=entries)
    for future in client.incremental_alter_configs([resource], request_timeout=timeout_s).values():
        future.result()


def _wait_for_leaders(client: AdminClient, names: list[str], timeout_s: float) -> None:
    """Topic creation returns before every partition has a leader; wait (bounded) for that."""
    deadline = time.monotonic() + timeout_s
    while True:
        topics = client.list_topics(timeout=timeout_s).topics
        ready = all(
            n in topics
            and topics[n].partitions
            and all(p.leader >= 0 for p in topics[n].partitions.values())
            for n in names
        )
        if ready or time.monotonic() > deadline:
            return
        time.sleep(0.1)


def _describe(client: AdminClient, names: list[str], timeout_s: float) -> dict[str, Any]:
    """Topic configs by name, retrying while a new topic's metadata is still propagating."""
    deadline = time.monotonic() + timeout_s
    while True:
        resources = [ConfigResource(ConfigResource.Type.TOPIC, n) for n in names]
        described = client.describe_configs(resources, request_timeout=timeout_s)
        try:
            return {res.name: fut.result() for res, fut in described.items()}
        except KafkaException as exc:
            if "UNKNOWN_TOPIC_OR_PART" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def delete_topics(client: AdminClient, names: list[str], timeout_s: float = 30.0) -> None:
    """Delete topics (tests and `--purge` style resets); missing ones are ignored."""
    existing = client.list_topics(timeout=timeout_s).topics
    names = [n for n in names if n in existing]
    if not names:
        return
    for future in client.delete_topics(names, operation_timeout=timeout_s).values():
        future.result()
    # Deletion completes asynchronously; wait (bounded) so a re-create does not collide.
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not set(names) & set(client.list_topics(timeout=timeout_s).topics):
            return
        time.sleep(0.2)


def pipeline_groups(settings: Settings) -> list[str]:
    """The consumer groups whose committed offsets belong to the pipeline's topics: the
    router's (kept for lag monitors, and read at a start without positions) and the
    workers'."""
    return [router_group(settings), workers_group(settings)]


def router_group(settings: Settings) -> str:
    return f"{settings.topic_prefix}jodie-router"


def workers_group(settings: Settings) -> str:
    return f"{app_id(settings)}-workers"


def delete_groups(client: AdminClient, groups: list[str], timeout_s: float = 30.0) -> list[str]:
    """Delete consumer groups with their committed offsets; the ones deleted (a group that
    does not exist is skipped). A group with live members (running workers) is refused by
    the broker: the error says to stop the pipeline first. A broker just started answers
    "coordinator load in progress" for a few seconds: asked again until ``timeout_s``."""

    def delete(group: str) -> None:
        client.delete_consumer_groups([group], request_timeout=timeout_s)[group].result()

    deleted = []
    for group in groups:
        try:
            retry_transient(partial(delete, group), timeout_s)
        except KafkaException as exc:
            error = error_of(exc)
            code = None if error is None else error.code()
            if code == KafkaError.GROUP_ID_NOT_FOUND:
                continue
            if code == KafkaError.NON_EMPTY_GROUP:
                raise PipelineRunningError(
                    f"consumer group {group} still has members: stop the router and the "
                    "workers of this pipeline first"
                ) from exc
            raise
        deleted.append(group)
    return deleted


def require_topics(settings: Settings, names: Iterable[str], timeout_s: float = 10.0) -> None:
    """Raise at once, saying what to do, when no broker answers or one of the topics ``names``
    (without the prefix) does not exist; a client would otherwise wait for them and time out.

    A missing topic is most often a prefix left unset: the error names the prefixes under
    which a topic of that name does exist.
    """
    from streams.runtime.clients import admin, check_login

    if not check_login(settings, timeout_s):
        raise BrokerUnavailableError(
            f"no broker answers at {settings.bootstrap_servers}; start it with `jodie broker up` "
            "(with the same JODIE_BROKER_PORT) or set JODIE_BOOTSTRAP to a running cluster"
        )
    existing = set(admin(settings).list_topics(timeout=timeout_s).topics)
    for name in names:
        if settings.topic(name) not in existing:
            raise TopicMissingError(_missing(settings, name, existing))


def _missing(settings: Settings, name: str, existing: set[str]) -> str:
    where = f"topic {settings.topic(name)} does not exist at {settings.bootstrap_servers}"
    prefixes = sorted(t.removesuffix(name) for t in existing if t.endswith(name))
    if not prefixes:
        return f"{where}; create the pipeline's topics with `jodie topics apply`"
    shown = ", ".join(f"JODIE_TOPIC_PREFIX={p}" if p else "no prefix" for p in prefixes[:3])
    more = f" and {len(prefixes) - 3} more" if len(prefixes) > 3 else ""
    return f"{where}; it exists with {shown}{more}: export the prefix the pipeline runs with"


@contextmanager
def scratch_topics(stem: str) -> Iterator[Settings]:
    """Settings of a pipeline of its own: ``JODIE_TOPIC_PREFIX`` set to a fresh
    ``<stem><random>-`` (in the environment too, for the processes it starts), the declared
    topics created, and on exit deleted and the previous prefix restored. For tests and
    benchmarks sharing a broker. Raises ``BrokerUnavailableError`` at once, saying how to
    start one, when no broker answers."""
    from streams.runtime.clients import admin

    before = os.environ.get("JODIE_TOPIC_PREFIX")
    os.environ["JODIE_TOPIC_PREFIX"] = f"{stem}{uuid.uuid4().hex[:10]}-"
    try:
        settings = read_settings()
        require_topics(settings, ())
        client = admin(settings)
        specs = declared_topics(settings)
        apply_topics(client, specs, settings.replication, min_insync=settings.min_insync_replicas)
        try:
            yield settings
        finally:
            delete_topics(client, [s.name for s in specs])
    finally:
        if before is None:
            os.environ.pop("JODIE_TOPIC_PREFIX", None)
        else:
            os.environ["JODIE_TOPIC_PREFIX"] = before


def app_id(settings: Settings) -> str:
    """The workers' application id; it prefixes their group, transactional ids and changelogs."""
    return f"{settings.topic_prefix}jodie"


def changelog_topic(settings: Settings, table: str) -> str:
    """A table's changelog topic (declared in deploy/topics.toml)."""
    return f"{app_id(settings)}-{table}-changelog"


#: What a record leaves of its topic's ``max.message.bytes`` for the framing of the batch
#: that carries it (the batch header, 61 bytes, and the record's own lengths and key).
FRAMING_BYTES = 4096


def largest_record(settings: Settings, topics: Iterable[str]) -> int | None:
    """The largest record (key and value) that every one of ``topics`` (full names) takes,
    less its framing, where each declares a ``max_message_bytes``: a producer set to refuse
    larger ones itself (``message.max.bytes``) never sends the brokers a batch they refuse.
    None where one declares none (the brokers' default applies, and the client's default
    limit, 1,000,000 bytes, is below it)."""
    limits = {s.name: s.max_message_bytes for s in declared_topics(settings)}
    declared = [limits.get(t) for t in topics]
    if not declared or None in declared:
        return None
    return min(n for n in declared if n is not None) - FRAMING_BYTES

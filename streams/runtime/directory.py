"""Who in a consumer group owns a partition, and where that member answers HTTP.

Interactive queries (Kafka Streams' design) let any instance answer for any key: the one
asked finds the key's owner from the group's assignment and forwards the request there.
Kafka Streams carries each instance's ``application.server`` in its assignor's user data;
librdkafka's assignors take no user data, so here each member *advertises* its endpoint in
its consumer's ``client.id`` (``name@host:port``, ``advertise``). The group coordinator
describes every member with its client id and its assigned partitions (the admin client's
DescribeGroups): that one answer gives both the ownership and the endpoints, current as of
the last rebalance, with nothing else to keep in sync (no topic of endpoints to outlive its
members). It also shows in ``kafka-consumer-groups --describe``, which helps an operator.

The description is cached for ``ttl_s``; a member that is asked for a key it does not own
any more says so, and the asker looks again (``fresh=True``). During a rebalance no member
may own a partition: the caller answers "retry".
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from streams.runtime import clients
from streams.runtime.exceptions import StreamRuntimeError

_SEPARATOR = "@"


def advertise(name: str, host: str | None, port: int | None) -> str:
    """The client id of a member ``name`` answering HTTP at ``host:port`` (just ``name``
    when it serves no endpoint)."""
    if host is None or port is None:
        return name
    return f"{name}{_SEPARATOR}{host}:{port}"


def endpoint_of(client_id: str) -> tuple[str, str | None]:
    """Inverse of ``advertise``: (name, ``host:port`` or None).

    >>> endpoint_of("jodie-worker-1@127.0.0.1:6067")
    ('jodie-worker-1', '127.0.0.1:6067')
    >>> endpoint_of("jodie-worker-1")
    ('jodie-worker-1', None)
    """
    name, sep, address = client_id.rpartition(_SEPARATOR)
    if not sep or ":" not in address:
        return client_id, None
    return name, address


class DirectoryError(StreamRuntimeError):
    """The group's coordinator could not describe the group; check that the broker is up
    (and, on a secured cluster, that this login may describe the group)."""


@dataclass(frozen=True)
class Member:
    """One group member as the coordinator describes it."""

    name: str
    endpoint: str | None  # host:port of its HTTP endpoint, None if it advertises none
    partitions: frozenset[tuple[str, int]]


class Directory:
    """The members of consumer group ``group_id``, their partitions and endpoints."""

    def __init__(
        self,
        conn: clients.KafkaConnection,
        group_id: str,
        ttl_s: float = 2.0,
        timeout_s: float = 5.0,
    ) -> None:
        self.conn = conn
        self.group_id = group_id
        self.ttl_s = ttl_s
        self.timeout_s = timeout_s
        self._admin: AdminClient | None = None
        self._members: list[Member] = []
        self._at = -float("inf")
        self._lock = threading.Lock()  # one description at a time; readers share it

    def members(self, fresh: bool = False) -> list[Member]:
        """The group's members; described again when older than ``ttl_s`` or ``fresh``."""
        with self._lock:
            if fresh or time.monotonic() - self._at > self.ttl_s:
                self._members = self._describe()
                self._at = time.monotonic()
            return self._members

    def cached(self) -> list[Member] | None:
        """The members as last described, if that is younger than ``ttl_s``, without waiting
        (None: ask ``members``, which may wait for the coordinator)."""
        at = self._at  # read before the members, which are written before it
        return self._members if time.monotonic() - at <= self.ttl_s else None

    def owner(self, topic: str, partition: int, fresh: bool = False) -> Member | None:
        """The member assigned ``topic[partition]`` now (None: nobody, e.g. mid-rebalance)."""
        return owner_among(self.members(fresh), topic, partition)

    def _describe(self) -> list[Member]:
        if self._admin is None:
            self._admin = clients.admin(self.conn)
        futures = self._admin.describe_consumer_groups(
            [self.group_id], request_timeout=self.timeout_s
        )
        try:
            group = futures[self.group_id].result(timeout=self.timeout_s)
        except (KafkaException, TimeoutError) as exc:
            raise DirectoryError(f"cannot describe group {self.group_id}: {exc}") from exc
        members = []
        for m in group.members:
            name, endpoint = endpoint_of(m.client_id)
            assigned = m.assignment.topic_partitions if m.assignment is not None else []
            members.append(
                Member(name, endpoint, frozenset((tp.topic, tp.partition) for tp in assigned))
            )
        return members


def owner_among(members: list[Member], topic: str, partition: int) -> Member | None:
    """The member of ``members`` assigned ``topic[partition]`` (None: nobody)."""
    for member in members:
        if (topic, partition) in member.partitions:
            return member
    return None

"""What each role of the pipeline may do on a secured cluster, as Kafka ACLs.

Principals are SASL users named after their role (``User:router`` ...; `jodie broker up
--secure` creates them). Topics are granted by their full name (LITERAL: a PREFIXED
``interactions`` would also match ``interactions.log``); consumer groups and transactional
ids by the names the code uses, PREFIXED where it appends a random or numbered suffix. The
super user (``admin``) needs no ACL: it creates the topics and these bindings.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from confluent_kafka import KafkaException
from confluent_kafka.admin import (
    AclBinding,
    AclBindingFilter,
    AclOperation,
    AclPermissionType,
    AdminClient,
    ResourcePatternType,
    ResourceType,
)

from streams.exceptions import AclError
from streams.settings import Settings
from streams.topics import app_id, changelog_topic, router_group, workers_group

Role = Literal["router", "worker", "trainer", "client"]
ROLES: tuple[Role, ...] = ("router", "worker", "trainer", "client")
Resource = Literal["topic", "group", "transactional_id"]
Operation = Literal["read", "write"]

# Consumer groups by the prefix the code gives them (streams/*.py); each is readers' own
# bookkeeping, so a role gets the prefixes of the readers it runs.
_INSPECT = "jodie-inspect-"  # streams.peek: read a topic whole (log, registry, changelogs)
_WATCH = "jodie-watch-"  # streams.switch.ServingWatch: follow promotions on `models`
_CATCH_UP = "jodie-catchup-"  # streams.switch.catch_up: replay the log over a checkpoint


@dataclass(frozen=True)
class Grant:
    """One permission: ``role`` may ``operation`` the ``resource`` named (or prefixed) ``name``.
    READ and WRITE imply DESCRIBE, which is all metadata and offsets need."""

    role: Role
    resource: Resource
    name: str
    operation: Operation
    prefixed: bool = False

    def binding(self) -> AclBinding:
        return AclBinding(
            ResourceType.TOPIC
            if self.resource == "topic"
            else ResourceType.GROUP
            if self.resource == "group"
            else ResourceType.TRANSACTIONAL_ID,
            self.name,
            ResourcePatternType.PREFIXED if self.prefixed else ResourcePatternType.LITERAL,
            f"User:{self.role}",
            "*",
            AclOperation.READ if self.operation == "read" else AclOperation.WRITE,
            AclPermissionType.ALLOW,
        )

    def describe(self) -> str:
        star = "*" if self.prefixed else ""
        return f"{self.role}: {self.operation} {self.resource} {self.name}{star}"


def grants(settings: Settings) -> list[Grant]:
    """Every role's permissions on the pipeline of ``settings.topic_prefix``."""
    t, prefix, app = settings.topic, settings.topic_prefix, app_id(settings)
    changelogs = [changelog_topic(settings, f"{side}-state") for side in ("user", "item")]
    inboxes = [t("user-inbox"), t("item-inbox")]
    out: list[Grant] = []

    def topics(role: Role, operation: Operation, names: Iterable[str]) -> None:
        out.extend(Grant(role, "topic", n, operation) for n in names)

    def groups(role: Role, names: Iterable[str], prefixed: bool = True) -> None:
        out.extend(Grant(role, "group", n, "read", prefixed) for n in names)

    # Clients: send events, read recommendations, nothing else.
    topics("client", "write", [t("interactions")])
    topics("client", "read", [t("recommendations")])
    groups("client", ["jodie-tail-", f"{app}-client-"])  # `jodie recommendations`; their own

    # Router: interactions in; the log, the inboxes and the DLQ out, in transactions; it
    # re-reads the log and its positions on start and follows promotions on `models`.
    own = [t("interactions.log"), t("interactions.positions")]
    topics("router", "read", [t("interactions"), *own, t("models")])
    topics("router", "write", [*own, t("interactions.dlq"), *inboxes])
    groups("router", [router_group(settings)], prefixed=False)
    groups("router", ["jodie-router-probe-", _INSPECT, _WATCH])
    out.append(Grant("router", "transactional_id", f"{prefix}jodie-router", "write"))

    # Workers: the inboxes, their tables' changelogs, the shared feeds and the registry in;
    # the exchange, recommendations, evaluations, item vectors, changelogs and DLQ out.
    topics(
        "worker",
        "read",
        [*inboxes, *changelogs, t("item-vectors"), t("interactions.log"), t("models")],
    )
    topics(
        "worker",
        "write",
        [
            *inboxes,
            *changelogs,
            t("recommendations"),
            t("evaluations"),
            t("item-vectors"),
            t("interactions.dlq"),
        ],
    )
    groups("worker", [workers_group(settings)], prefixed=False)
    groups("worker", ["jodie-feeds-", "jodie-restore-", _INSPECT, _WATCH, _CATCH_UP])
    out.append(Grant("worker", "transactional_id", f"{app}-worker-", "write", prefixed=True))

    # Trainer, also the operator: the only writer of `models`; reads the log to train and
    # what an operator inspects (DLQ, outputs, the tables' changelogs for `state export`).
    topics("trainer", "write", [t("models")])
    topics(
        "trainer",
        "read",
        [
            t("models"),
            t("interactions.log"),
            t("interactions.dlq"),
            t("recommendations"),
            t("evaluations"),
            *changelogs,
        ],
    )
    groups("trainer", ["jodie-trainer-probe", "jodie-topics-show"], prefixed=False)
    groups("trainer", ["jodie-replay-", "jodie-tail-", _INSPECT, _WATCH, _CATCH_UP])
    return out


def apply_acls(client: AdminClient, settings: Settings, timeout_s: float = 30.0) -> list[Grant]:
    """Create every role's bindings (creating an existing one is a no-op); returns them."""
    wanted = grants(settings)
    futures = client.create_acls([g.binding() for g in wanted], request_timeout=timeout_s)
    for binding, future in futures.items():
        try:
            future.result()
        except KafkaException as exc:
            raise AclError(f"creating {binding}: {exc.args[0]}") from exc
    _wait_enforced(client, wanted, timeout_s)
    return wanted


def _wait_enforced(client: AdminClient, wanted: list[Grant], timeout_s: float) -> None:
    """Wait (bounded) until the broker answers with every binding: the controller commits
    them before the broker's authorizer has them, and a client starting in between is denied."""
    want = {g.binding() for g in wanted}
    anything: Any = None  # None matches any name, principal and host (the stubs say str)
    match_all = AclBindingFilter(
        ResourceType.ANY,
        anything,
        ResourcePatternType.ANY,
        anything,
        anything,
        AclOperation.ANY,
        AclPermissionType.ANY,
    )
    deadline = time.monotonic() + timeout_s
    while True:
        have = set(client.describe_acls(match_all, request_timeout=timeout_s).result())
        if want <= have:
            return
        if time.monotonic() > deadline:
            raise AclError(f"{len(want - have)} ACLs not in force after {timeout_s:.0f} s")
        time.sleep(0.05)

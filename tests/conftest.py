"""Shared fixtures: settings isolated per test, and the real local broker for integration tests."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pytest

from streams.settings import Settings

if TYPE_CHECKING:
    from deploy.kafka.security import Role, SecurityFiles


@pytest.fixture(scope="session")
def broker() -> Iterator[Settings]:
    """The real Apache Kafka broker at JODIE_BROKER_PORT.

    `.ci/run` (through deploy/test.sh) starts it before the tests and stops it afterwards.
    When a developer runs pytest alone, the fixture starts it and stops only what it started.
    """
    from deploy.kafka import broker as local

    settings = Settings()
    cfg = local.BrokerConfig.from_settings(settings)
    started = False
    if settings.bootstrap is None:
        _, started = local.up(cfg)
    yield settings
    if started:
        local.down(cfg)


@pytest.fixture
def kafka(broker: Settings) -> Iterator[Settings]:
    """Settings whose topics are unique to this test (a fresh prefix), with the topics created.

    The topics are deleted afterwards so repeated runs do not pile up partitions.
    """
    from streams.topics import scratch_topics

    with scratch_topics("t") as settings:
        yield settings


@dataclass(frozen=True)
class SecureBroker:
    """The secure test broker: how each role logs in to it."""

    port: int
    controller_port: int
    files: SecurityFiles

    def env(self, role: Role, prefix: str = "") -> dict[str, str]:
        """The JODIE_* variables of ``role`` (what its env file exports), topics ``prefix``."""
        from deploy.kafka.security import role_env

        return {
            **role_env(self.files, self.port, self.controller_port, role),
            "JODIE_TOPIC_PREFIX": prefix,
        }

    def settings(self, role: Role, prefix: str = "", **overrides: object) -> Settings:
        env = self.env(role, prefix)
        values = {k.removeprefix("JODIE_").lower(): v for k, v in env.items()}
        return Settings(**{**values, **overrides})  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def secure_broker() -> Iterator[SecureBroker]:
    """A second broker as `jodie broker up --secure` starts it (TLS, a SCRAM user per role,
    the StandardAuthorizer), on ports and in a home of its own (JODIE_BROKER_PORT + 200 and
    + 201, clear of the plain broker and of test_broker's + 100); always stopped and purged."""
    from deploy.kafka import broker as local
    from deploy.kafka.security import files_of

    settings = Settings()
    port = settings.broker_port + 200
    cfg = local.BrokerConfig(
        cache_dir=settings.cache_dir,
        kafka_version=settings.kafka_version,
        port=port,
        controller_port=port + 1,
        heap="384m",
        start_timeout_s=120,
        secure=True,
    )
    local.down(cfg, purge=True)  # a run killed before its teardown
    try:
        local.up(cfg)
        yield SecureBroker(port, port + 1, files_of(cfg.home))
    finally:
        local.down(cfg, purge=True)


@pytest.fixture
def secure_topics(secure_broker: SecureBroker) -> Iterator[str]:
    """A fresh topic prefix on the secure broker: its topics created and every role's ACLs
    granted by the admin; the topics deleted afterwards. Yields the prefix."""
    from streams.acls import apply_acls
    from streams.runtime.clients import admin
    from streams.topics import apply_topics, declared_topics, delete_topics

    prefix = f"s{uuid.uuid4().hex[:10]}-"
    settings = secure_broker.settings("admin", prefix)
    client = admin(settings)
    specs = declared_topics(settings)
    apply_topics(client, specs, settings.replication)
    apply_acls(client, settings)
    try:
        yield prefix
    finally:
        delete_topics(client, [s.name for s in specs])


def pytest_report_header(config: pytest.Config) -> str:
    return f"jodie broker port: {os.environ.get('JODIE_BROKER_PORT', '9092')}"

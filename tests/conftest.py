"""Shared fixtures: settings isolated per test, and the real local broker for integration tests."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from streams.settings import Settings


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


def pytest_report_header(config: pytest.Config) -> str:
    return f"jodie broker port: {os.environ.get('JODIE_BROKER_PORT', '9092')}"

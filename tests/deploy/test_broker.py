"""The local broker's lifecycle on a second, private port pair: up, idempotent up, status, down."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest

from deploy.exceptions import BrokerStartError, PortInUseError
from deploy.kafka import broker as local
from streams.settings import Settings

pytestmark = pytest.mark.kafka


def _config(
    settings: Settings, cache_dir: Path | None = None, port: int | None = None
) -> local.BrokerConfig:
    port = port or settings.broker_port + 100
    return local.BrokerConfig(
        cache_dir=cache_dir or settings.cache_dir,
        kafka_version=settings.kafka_version,
        port=port,
        controller_port=port + 1,
        heap="256m",
        start_timeout_s=120,
    )


def test_up_is_idempotent_and_down_leaves_nothing(broker: Settings, tmp_path: Path) -> None:
    cfg = _config(broker)
    local.down(cfg, purge=True)
    try:
        status, started = local.up(cfg)
        assert started and status.running and status.ready
        pid = status.pid
        assert pid is not None
        assert local.probe(cfg.bootstrap)

        again, started_again = local.up(cfg)
        assert not started_again and again.pid == pid

        # Someone else's process on the port (here: the same broker, seen from another
        # cache dir, so not "ours") is reported, never killed or doubled.
        stranger = _config(broker, cache_dir=tmp_path, port=cfg.port)
        with pytest.raises(PortInUseError):
            local.up(stranger)
        assert local.status(stranger).detail.startswith("not started by jodie")
    finally:
        assert local.down(cfg, purge=True)
    assert not local.status(cfg).running
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not cfg.home.exists()
    assert local.down(cfg) is False


def test_a_broker_that_dies_starting_says_why(
    broker: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A heap the machine cannot commit: the error quotes the JVM's own words (its logs are
    gone once purged), and its crash report lands beside the logs, not where it was run."""
    cfg = replace(_config(broker, port=broker.broker_port + 200), heap="999g")
    monkeypatch.chdir(tmp_path)
    local.down(cfg, purge=True)
    try:
        with pytest.raises(BrokerStartError, match="insufficient memory for the Java Runtime"):
            local.up(cfg)
        assert list(cfg.logs_dir.glob("hs_err_pid*.log"))
        assert not list(tmp_path.glob("hs_err_pid*.log"))
    finally:
        local.down(cfg, purge=True)


def test_jar_cache_is_keyed_and_complete(broker: Settings) -> None:
    lib = local.jars_dir(_config(broker))
    assert (lib / ".complete").exists()
    names = {p.name for p in lib.glob("*.jar")}
    assert f"kafka_2.13-{broker.kafka_version}.jar" in names
    assert any(n.startswith("log4j-slf4j") for n in names)  # the broker logs


def test_a_warning_logged_again_and_again_is_counted_once(tmp_path: Path) -> None:
    """A node retrying a connection to a dead one logs the same warning 20 times a second:
    counted on one line, it leaves the room of a failure's report to the other lines."""
    same = "WARN [TransactionCoordinator id=1] Connection to node 1 could not be established."
    lines = [f"[2026-12-03 16:17:{i:02d},000] {same}" for i in range(30)]
    lines.append("[2026-12-03 16:18:00,000] ERROR [KafkaServer id=1] the line that matters")
    (tmp_path / "server.log").write_text("\n".join(lines) + "\n")
    reason = local.exit_reason(tmp_path, lines=5)
    assert "the line that matters" in reason
    assert reason.count("could not be established") == 1 and "(×30)" in reason

"""The local cluster's layout without starting it: ports, quorum, replication, what clients use.

tests/streams/test_broker_failure.py starts a three-node cluster and kills one node of it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from deploy.kafka import broker, cluster
from streams.settings import Settings


def _base(tmp_path: Path) -> broker.BrokerConfig:
    return broker.BrokerConfig(
        cache_dir=tmp_path,
        kafka_version="4.4.0",
        port=19392,
        controller_port=19393,
        heap="384m",
        start_timeout_s=60,
    )


def test_three_nodes_have_their_own_ports_homes_and_one_quorum(tmp_path: Path) -> None:
    nodes = cluster.node_configs(_base(tmp_path), 3)
    assert [(n.port, n.controller_port) for n in nodes] == [
        (19392, 19393),
        (19402, 19403),
        (19412, 19413),
    ]
    assert len({n.home for n in nodes}) == 3
    assert all(n.home.parent == tmp_path / "cluster-19392" for n in nodes)
    assert cluster.bootstrap(nodes) == "127.0.0.1:19392,127.0.0.1:19402,127.0.0.1:19412"
    node = nodes[1]
    assert isinstance(node, cluster.NodeConfig)
    node.home.mkdir(parents=True)
    text = cluster._write_node_config(node).read_text()
    assert "node.id=1\n" in text
    assert "controller.quorum.voters=0@127.0.0.1:19393,1@127.0.0.1:19403,2@127.0.0.1:19413" in text
    for line in (
        "default.replication.factor=3",
        "min.insync.replicas=2",
        "offsets.topic.replication.factor=3",
        "transaction.state.log.replication.factor=3",
        "transaction.state.log.min.isr=2",
    ):
        assert f"\n{line}\n" in text


def test_one_node_is_the_plain_broker_and_down_finds_a_cluster(tmp_path: Path) -> None:
    base = _base(tmp_path)
    assert cluster.node_configs(base, 1) == [base]
    assert cluster.known_nodes(base) == [base]
    (tmp_path / "cluster-19392").mkdir()
    (tmp_path / "cluster-19392" / "nodes").write_text("3")
    assert [n.port for n in cluster.known_nodes(base)] == [19392, 19402, 19412]


@pytest.mark.parametrize(("nodes", "replication", "min_isr"), [(1, 1, 1), (3, 3, 2), (5, 3, 2)])
def test_clients_and_topics_follow_the_node_count(
    monkeypatch: pytest.MonkeyPatch, nodes: int, replication: int, min_isr: int
) -> None:
    monkeypatch.delenv("JODIE_BOOTSTRAP", raising=False)
    monkeypatch.delenv("JODIE_REPLICATION_FACTOR", raising=False)
    monkeypatch.setenv("JODIE_BROKER_PORT", "19392")
    monkeypatch.setenv("JODIE_BROKER_NODES", str(nodes))
    settings = Settings()
    assert settings.bootstrap_servers.split(",") == [
        f"127.0.0.1:{19392 + 10 * n}" for n in range(nodes)
    ]
    assert (settings.replication, settings.min_insync_replicas) == (replication, min_isr)
    monkeypatch.setenv("JODIE_REPLICATION_FACTOR", "2")
    assert Settings().replication == 2


def test_the_cluster_id_never_starts_with_a_dash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One random id in 64 encodes to a leading '-', which the storage tool reads as an option;
    the cluster draws again, as Kafka's own generator does, and keeps the id it wrote."""
    import uuid

    draws = iter([uuid.UUID(bytes=b"\xf8" + bytes(15)), uuid.UUID(bytes=b"\x01" * 16)])
    monkeypatch.setattr(cluster.uuid, "uuid4", lambda: next(draws))
    made = cluster._cluster_id(tmp_path)
    assert not made.startswith("-")
    assert made == "AQEBAQEBAQEBAQEBAQEBAQ"
    assert cluster._cluster_id(tmp_path) == made

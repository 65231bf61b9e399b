"""A local Apache Kafka of N nodes (KRaft): start, probe, stop each node; one node is broker.py's.

Each node is one JVM in combined mode, broker and controller, and the N controllers are the
metadata quorum (static voters). Three such nodes are the lightest cluster that survives
losing any one of them — the quorum keeps two voters, every partition two in-sync replicas —
where three brokers and a separate controller would cost a fourth JVM and leave the controller
a single point of failure. The nodes are combined-mode Kafka as the single-node broker is;
only their configuration (``cluster.properties``: replication, the shared cluster id, the
voters) and their homes (``<cache>/cluster-<port>/node-<n>``) differ, so the single node's
start, status and stop (deploy.kafka.broker) run each of them.
"""

from __future__ import annotations

import base64
import os
import shutil
import signal
import subprocess
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from string import Template
from typing import TYPE_CHECKING

from deploy.exceptions import BrokerStartError, PortInUseError
from deploy.kafka import broker
from streams.settings import NODE_PORT_STEP

if TYPE_CHECKING:
    from streams.runtime.clients import KafkaConnection

#: Lists the node count of a cluster's home, so `down` and `status` find its nodes.
_NODES_FILE = "nodes"


@dataclass(frozen=True, kw_only=True)
class NodeConfig(broker.BrokerConfig):
    """One node of an N-node local cluster (``port``/``controller_port``: this node's)."""

    node_id: int
    nodes: int
    cluster_home: Path
    voters: str  # the quorum: "0@127.0.0.1:9093,1@127.0.0.1:9103,..."

    @property
    def home(self) -> Path:
        return self.cluster_home / f"node-{self.node_id}"

    @property
    def replication(self) -> int:
        return min(3, self.nodes)

    @property
    def min_isr(self) -> int:
        return 2 if self.replication >= 3 else 1


def cluster_home(cfg: broker.BrokerConfig) -> Path:
    return cfg.cache_dir / f"cluster-{cfg.port}"


def node_configs(cfg: broker.BrokerConfig, nodes: int) -> list[broker.BrokerConfig]:
    """The nodes of a local Kafka of ``nodes`` nodes whose first node is ``cfg``'s ports (one
    node: ``cfg`` itself, the plain single-node broker)."""
    if nodes == 1:
        return [cfg]
    ports = [
        (cfg.port + NODE_PORT_STEP * n, cfg.controller_port + NODE_PORT_STEP * n)
        for n in range(nodes)
    ]
    voters = ",".join(f"{n}@127.0.0.1:{c}" for n, (_p, c) in enumerate(ports))
    home = cluster_home(cfg)
    return [
        NodeConfig(
            **{**cfg.__dict__, "port": port, "controller_port": controller},
            node_id=n,
            nodes=nodes,
            cluster_home=home,
            voters=voters,
        )
        for n, (port, controller) in enumerate(ports)
    ]


def known_nodes(cfg: broker.BrokerConfig) -> list[broker.BrokerConfig]:
    """Every local node on ``cfg``'s ports that has a home: the single broker, the nodes of a
    cluster started with `up --nodes N`, or both (for `down` and `status`)."""
    found: list[broker.BrokerConfig] = [cfg] if cfg.home.exists() else []
    marker = cluster_home(cfg) / _NODES_FILE
    if marker.exists():
        found += node_configs(cfg, int(marker.read_text()))
    return found or [cfg]


def bootstrap(nodes: list[broker.BrokerConfig]) -> str:
    return ",".join(n.bootstrap for n in nodes)


def _cluster_id(home: Path) -> str:
    """The id every node is formatted with, made once per cluster home (Kafka's form: the
    URL-safe base64 of a random UUID, unpadded).

    Like Kafka's own generator it never starts with '-': one UUID in 64 would, and the storage
    tool's parser then reads the id as an option."""
    path = home / "cluster.id"
    if not path.exists():
        home.mkdir(parents=True, exist_ok=True)
        made = "-"
        while made.startswith("-"):
            made = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        path.write_text(made)
    return path.read_text().strip()


def _write_node_config(node: NodeConfig) -> Path:
    template = Template(broker._resource("cluster.properties").read_text())
    text = template.substitute(
        node_id=node.node_id,
        voters=node.voters,
        port=node.port,
        controller_port=node.controller_port,
        data_dir=str(node.data_dir),
        replication=node.replication,
        min_isr=node.min_isr,
    )
    path = node.home / "server.properties"
    path.write_text(text)
    return path


def _launch(
    node: NodeConfig, java: str, classpath: str, cluster_id: str
) -> subprocess.Popen[bytes]:
    """Format the node's storage (once) with the cluster's id and start its JVM, as broker.up
    does for one node."""
    for d in (node.home, node.data_dir, node.logs_dir):
        d.mkdir(parents=True, exist_ok=True)
    config = _write_node_config(node)
    if not (node.data_dir / "meta.properties").exists():
        cmd = [java, "-cp", classpath, broker._STORAGE_TOOL, "format", "-c", str(config)]
        cmd.append(f"--cluster-id={cluster_id}")
        formatted = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if formatted.returncode != 0:
            raise BrokerStartError(
                f"formatting node {node.node_id} failed:\n{formatted.stdout}{formatted.stderr}"
            )
    cmd = [
        java,
        f"-Xmx{node.heap}",
        f"-Xms{node.heap}",
        "-XX:+UseG1GC",
        "-XX:MaxGCPauseMillis=20",
        f"-XX:ErrorFile={node.logs_dir / 'hs_err_pid%p.log'}",
        "-Djava.awt.headless=true",
        f"-Dlog4j2.configurationFile={broker._resource('log4j2.yaml')}",
        f"-Dkafka.logs.dir={node.logs_dir}",
        f"-Djodie.broker.home={node.home}",
        "-cp",
        classpath,
        broker._KAFKA_MAIN,
        str(config),
    ]
    with (node.logs_dir / "stdout.log").open("ab") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
    node.pid_file.write_text(str(proc.pid))
    broker._children[proc.pid] = proc
    return proc


def up(nodes: list[broker.BrokerConfig]) -> list[broker.BrokerStatus]:
    """Start every node that does not run (all at once: a node answers only once a quorum of
    controllers is up), then wait until each answers metadata requests and the cluster lists
    them all. Restarting one dead node of a running cluster is the same call."""
    if len(nodes) == 1 and not isinstance(nodes[0], NodeConfig):
        return [broker.up(nodes[0])[0]]
    cluster = [n for n in nodes if isinstance(n, NodeConfig)]
    down_now = [n for n in cluster if not broker.status(n).running]
    for n in down_now:
        if broker._port_open(n.port) or broker._port_open(n.controller_port):
            raise PortInUseError(
                f"port {n.port} or {n.controller_port} (node {n.node_id}) is in use by a "
                "program jodie did not start; stop it, or pick free ports with "
                "JODIE_BROKER_PORT / JODIE_CONTROLLER_PORT"
            )
    if down_now:
        java = broker._java()
        classpath = f"{broker.fetch_jars(cluster[0])}/*"
        home = cluster[0].cluster_home
        home.mkdir(parents=True, exist_ok=True)
        (home / _NODES_FILE).write_text(str(len(cluster)))
        # The id is read (or made) here, once, and not by each formatting thread: two threads
        # that both found no id file each wrote their own, and a node formatted with another
        # id than its peers' is refused by the quorum (INCONSISTENT_CLUSTER_ID) and exits.
        cluster_id = _cluster_id(home)
        with ThreadPoolExecutor(len(down_now)) as pool:  # formatting: one JVM each, in parallel
            list(pool.map(lambda n: _launch(n, java, classpath, cluster_id), down_now))
    _wait_cluster(cluster)
    return [broker.status(n) for n in cluster]


def _exited(node: NodeConfig) -> bool:
    """Whether the node's JVM has ended. A node this process started is asked through its
    process handle: its /proc command line can read empty or foreign while the JVM launcher
    is still starting (seen once in CI as a node "exited" that was in fact starting, and whose
    home the clean-up then deleted under it)."""
    try:
        pid = int(node.pid_file.read_text().strip())
    except (FileNotFoundError, ValueError):
        return True
    child = broker._children.get(pid)
    if child is not None:
        return child.poll() is not None
    return broker._read_pid(node) is None


def _wait_cluster(nodes: list[NodeConfig]) -> None:
    from streams.runtime.clients import Connection, admin

    timeout_s = nodes[0].start_timeout_s
    deadline = time.monotonic() + timeout_s
    client = admin(Connection(bootstrap(list(nodes))), {"log_level": 0})
    while time.monotonic() < deadline:
        for n in nodes:
            if _exited(n):
                raise BrokerStartError(
                    f"node {n.node_id} exited during start-up; see {n.logs_dir / 'server.log'}:"
                    f"\n{broker.exit_reason(n.logs_dir)}"
                )
        if all(broker.probe(n.bootstrap, timeout_s=1.0) for n in nodes):
            try:
                listed = client.list_topics(timeout=2.0).brokers
            except Exception:  # KafkaException while the quorum settles: not ready yet
                listed = {}
            if len(listed) == len(nodes):
                return
        time.sleep(0.25)
    raise BrokerStartError(
        f"the cluster did not list its {len(nodes)} nodes within {timeout_s:.0f} s; see "
        f"{nodes[0].cluster_home}/node-*/logs/server.log"
    )


def down(nodes: list[broker.BrokerConfig], purge: bool = False) -> bool:
    """Stop every node (SIGTERM to all at once, so none waits for a quorum the others already
    left; SIGKILL after the timeout); returns whether any was running."""
    with ThreadPoolExecutor(len(nodes)) as pool:
        stopped = list(pool.map(lambda n: broker.down(n, purge=purge), nodes))
    if purge:
        for n in nodes:
            if isinstance(n, NodeConfig):
                shutil.rmtree(n.cluster_home, ignore_errors=True)
    return any(stopped)


def kill(node: broker.BrokerConfig) -> int:
    """SIGKILL one node (tests and benchmarks of broker failures); returns its pid. At once:
    asking the node whether it is ready first (``broker.status``) took a metadata round trip,
    during which the pipeline went on committing, so that a caller noting the time of the
    kill before calling counted recommendations made before it as made after it."""
    pid = broker._read_pid(node)
    if pid is None:
        raise BrokerStartError(f"{node.bootstrap}: not running, nothing to kill")
    os.kill(pid, signal.SIGKILL)
    child = broker._children.pop(pid, None)
    if child is not None:
        child.wait(timeout=30)
    else:
        while broker._alive(pid):
            time.sleep(0.05)
    return pid


def coordinator(nodes: list[broker.BrokerConfig], conn: KafkaConnection, group: str) -> int:
    """Node id of ``group``'s coordinator (-1 when the group is not known yet)."""
    from streams.runtime.clients import admin

    client = admin(conn)  # held until the answer: a released client never completes it
    futures = client.describe_consumer_groups([group], request_timeout=10)
    try:
        return int(futures[group].result(timeout=15).coordinator.id)
    except Exception:  # KafkaException, TimeoutError: no such group yet, or still settling
        return -1


def pick_victim(
    nodes: list[broker.BrokerConfig], conn: KafkaConnection, group: str
) -> broker.BrokerConfig:
    """The node a failure test kills: the coordinator of the workers' consumer group. Every
    node leads about a third of every topic's partitions (the transaction log's included), so
    any one's death moves leaderships; this one's also moves the group the workers commit
    their offsets to inside their transactions — the hardest case for them. (Clients cannot
    see which node is the active KRaft controller; losing it costs a quorum election.)"""
    wanted = coordinator(nodes, conn, group)
    for n in nodes:
        if isinstance(n, NodeConfig) and n.node_id == wanted:
            return n
    return nodes[0]

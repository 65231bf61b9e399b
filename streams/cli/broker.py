"""`jodie broker`: the local Apache Kafka, one node or a cluster (up, down, status, wait)."""

from __future__ import annotations

import dataclasses
import json
import time
from typing import TYPE_CHECKING, Annotated

import typer

from jodie_errors import JodieError
from streams.cli.common import _fail, console, out
from streams.settings import get_settings

if TYPE_CHECKING:
    from deploy.kafka import broker
    from deploy.kafka import broker as broker_module
    from streams.settings import Settings

broker_app = typer.Typer(no_args_is_help=True, help="The local Apache Kafka (KRaft).")


@broker_app.command("up")
def broker_up(
    foreground: Annotated[
        bool, typer.Option(help="Run in this process (for Procfile/systemd).")
    ] = False,
    secure: Annotated[
        bool | None,
        typer.Option(
            "--secure/--plain",
            help="TLS, SCRAM users per role and ACLs (default: JODIE_BROKER_SECURE, off).",
        ),
    ] = None,
    nodes: Annotated[
        int | None,
        typer.Option(
            min=1,
            max=9,
            help="Nodes (default JODIE_BROKER_NODES): 3 is a cluster with replication 3 and "
            "min.insync.replicas 2; starts whichever of its nodes do not run.",
        ),
    ] = None,
) -> None:
    """Fetch Kafka (cached), format storage once, start in the background, wait until ready."""
    from deploy.kafka import broker

    settings = get_settings()
    cfg = broker.BrokerConfig.from_settings(settings)
    if secure is not None:
        cfg = dataclasses.replace(cfg, secure=secure)
    if cfg.secure and foreground:
        # The ACLs are created once the broker answers, which a foreground start never returns to.
        raise _fail(JodieError("--secure starts in the background; drop --foreground"))
    count = nodes or settings.broker_nodes
    if count > 1:
        if foreground:
            raise typer.BadParameter("--foreground runs one node; a cluster runs in the background")
        if cfg.secure:
            # Each node would need its own certificate and the ACLs once for the cluster.
            raise _fail(JodieError("--secure runs one node; drop --nodes"))
        _cluster_up(cfg, count)
        return
    began = time.monotonic()
    try:
        status, started = broker.up(cfg, foreground=foreground)
        verb = "started" if started else "already running"
        console.print(
            f"broker {verb}: pid {status.pid}, {status.bootstrap}, data in {status.home} "
            f"({time.monotonic() - began:.1f} s)"
        )
        if cfg.secure:
            _secure_up(cfg, settings)
    except JodieError as exc:
        raise _fail(exc) from exc


def _secure_up(cfg: broker.BrokerConfig, settings: Settings) -> None:
    """Grant every role its ACLs (for JODIE_TOPIC_PREFIX) and say how to connect as one."""
    from deploy.kafka import security
    from streams.acls import apply_acls
    from streams.runtime.clients import admin

    files = security.files_of(cfg.home)
    login = security.connection(files, cfg.port, "admin")
    grants = apply_acls(admin(login), settings)
    roles = ", ".join(security.ROLES)
    console.print(
        f"secure: SASL_SSL with {security.MECHANISM}, users {roles}; {len(grants)} ACLs for "
        f"topic prefix {settings.topic_prefix!r} (`jodie acls show` lists them)\n"
        f"connect as a role:  source {files.root}/<role>.env   (e.g. "
        f"{files.env_file('client')})\n"
        f"create the topics:  (source {files.env_file('admin')} && jodie topics apply)",
        soft_wrap=True,
        highlight=False,
    )


def _cluster_up(cfg: broker_module.BrokerConfig, count: int) -> None:
    from deploy.kafka import cluster

    began = time.monotonic()
    node_cfgs = cluster.node_configs(cfg, count)
    try:
        statuses = cluster.up(node_cfgs)
    except JodieError as exc:
        raise _fail(exc) from exc
    for n, status in enumerate(statuses):
        console.print(f"node {n}: pid {status.pid}, {status.bootstrap}, data in {status.home}")
    console.print(
        f"cluster of {count} nodes ready ({time.monotonic() - began:.1f} s); clients: "
        f"JODIE_BROKER_NODES={count} (bootstrap {cluster.bootstrap(node_cfgs)})"
    )


@broker_app.command("down")
def broker_down(
    purge: Annotated[
        bool, typer.Option(help="Also delete the broker's data (a clean start).")
    ] = False,
) -> None:
    """Stop the local broker (every node of a cluster) by its pid; nothing is left running."""
    from deploy.kafka import broker, cluster

    nodes = cluster.known_nodes(broker.BrokerConfig.from_settings(get_settings()))
    was_running = cluster.down(nodes, purge=purge)
    console.print(
        ("broker stopped" if was_running else "broker was not running")
        + (", data purged" if purge else "")
    )


@broker_app.command("status")
def broker_status() -> None:
    """Say whether the local broker (each node of a cluster) runs and answers metadata
    requests (exit 1 if any does not)."""
    from deploy.kafka import broker, cluster

    nodes = cluster.known_nodes(broker.BrokerConfig.from_settings(get_settings()))
    statuses = [broker.status(n) for n in nodes]
    shown = [
        {
            "running": status.running,
            "ready": status.ready,
            "pid": status.pid,
            "bootstrap": status.bootstrap,
            "home": str(status.home),
            "detail": status.detail,
        }
        for status in statuses
    ]
    ready = all(s.ready for s in statuses)
    if len(shown) == 1:
        out.print(json.dumps(shown[0]))
    else:
        out.print(json.dumps({"ready": ready, "nodes": shown}, indent=1))
    if not ready:
        raise typer.Exit(code=1)


@broker_app.command("wait")
def broker_wait(
    timeout: Annotated[float, typer.Option(help="Seconds to wait at most.")] = 120.0,
) -> None:
    """Wait until the brokers at JODIE_BOOTSTRAP answer metadata requests (exit 1 on timeout)."""
    from deploy.kafka.broker import probe

    deadline = time.monotonic() + timeout
    while not probe(get_settings(), timeout_s=1.0):
        if time.monotonic() > deadline:
            console.print("broker not ready")
            raise typer.Exit(code=1)
        time.sleep(0.5)

"""`jodie broker`: the local single-node Apache Kafka (up, down, status, wait)."""

from __future__ import annotations

import json
import time
from typing import Annotated

import typer

from jodie_errors import JodieError
from streams.cli.common import _fail, console, out
from streams.settings import get_settings

broker_app = typer.Typer(no_args_is_help=True, help="The local single-node Apache Kafka (KRaft).")


@broker_app.command("up")
def broker_up(
    foreground: Annotated[
        bool, typer.Option(help="Run in this process (for Procfile/systemd).")
    ] = False,
) -> None:
    """Fetch Kafka (cached), format storage once, start in the background, wait until ready."""
    from deploy.kafka import broker

    cfg = broker.BrokerConfig.from_settings(get_settings())
    began = time.monotonic()
    try:
        status, started = broker.up(cfg, foreground=foreground)
    except JodieError as exc:
        raise _fail(exc) from exc
    verb = "started" if started else "already running"
    console.print(
        f"broker {verb}: pid {status.pid}, {status.bootstrap}, data in {status.home} "
        f"({time.monotonic() - began:.1f} s)"
    )


@broker_app.command("down")
def broker_down(
    purge: Annotated[
        bool, typer.Option(help="Also delete the broker's data (a clean start).")
    ] = False,
) -> None:
    """Stop the local broker by its pid; nothing is left running."""
    from deploy.kafka import broker

    cfg = broker.BrokerConfig.from_settings(get_settings())
    was_running = broker.down(cfg, purge=purge)
    console.print(
        ("broker stopped" if was_running else "broker was not running")
        + (", data purged" if purge else "")
    )


@broker_app.command("status")
def broker_status() -> None:
    """Say whether the local broker runs and answers metadata requests (exit 1 if not)."""
    from deploy.kafka import broker

    status = broker.status(broker.BrokerConfig.from_settings(get_settings()))
    out.print(
        json.dumps(
            {
                "running": status.running,
                "ready": status.ready,
                "pid": status.pid,
                "bootstrap": status.bootstrap,
                "home": str(status.home),
                "detail": status.detail,
            }
        )
    )
    if not status.ready:
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

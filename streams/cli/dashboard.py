"""`jodie dashboard`: a live page of the pipeline, served locally."""

from __future__ import annotations

import signal
import threading
from typing import Annotated

import typer

from streams.cli.common import _fail, console
from streams.settings import get_settings


def dashboard(
    port: Annotated[
        int, typer.Option(min=0, max=65535, help="Port on 127.0.0.1 (0: any free one).")
    ] = 8066,
    workers: Annotated[
        int,
        typer.Option(
            min=0, help="Also show the metrics pages of workers 0..N-1 (JODIE_WEB_PORT + n)."
        ),
    ] = 0,
    backfill: Annotated[
        int, typer.Option(min=0, help="Messages of each topic read from before the start.")
    ] = 100_000,
    users: Annotated[
        int, typer.Option(min=1, help="Users whose view is kept (most recently active).")
    ] = 2000,
) -> None:
    """Serve a live dashboard of the pipeline: throughput, lag, live MRR / Recall@10 against the
    recency baseline, model versions, DLQ counts, and any user's recommendations."""
    from streams.dashboard.app import Dashboard
    from streams.dashboard.exceptions import DashboardError

    try:
        app = Dashboard.start(
            get_settings(), port=port, workers=workers, backfill=backfill, max_users=users
        )
    except DashboardError as exc:
        raise _fail(exc) from exc
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    console.print(f"dashboard on {app.url} (Ctrl-C stops it)", highlight=False, soft_wrap=True)
    stop.wait()
    app.close()

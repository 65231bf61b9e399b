"""`jodie produce`: a JODIE CSV onto the `interactions` topic."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from streams.cli.common import console, need_topics, out
from streams.settings import get_settings


def produce(
    path: Annotated[
        Path | None,
        typer.Argument(
            exists=True,
            dir_okay=False,
            help="JODIE CSV (plain or .gz); default: bundled Wikipedia.",
        ),
    ] = None,
    rate: Annotated[
        float | None,
        typer.Option(min=0.001, help="Events per second (default: as fast as possible)."),
    ] = None,
    limit: Annotated[int | None, typer.Option(min=0, help="Send at most this many events.")] = None,
    start: Annotated[
        int, typer.Option(min=0, help="Skip this many valid rows first (resume).")
    ] = 0,
    after: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            file_okay=False,
            help="Start after the events this checkpoint was trained on (sets --start).",
        ),
    ] = None,
    strict: Annotated[
        bool, typer.Option(help="Stop at the first bad row instead of reporting it.")
    ] = False,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write the summary here.")
    ] = None,
    loop: Annotated[
        bool,
        typer.Option(
            help="Send the rows again and again until stopped, each pass as new events (fresh "
            "ids, timestamps moved past the previous pass): a stream that never ends, for a "
            "demo deployment."
        ),
    ] = False,
) -> None:
    """Produce Avro Interactions to `interactions`, keyed by user id, with deterministic ids."""
    from operators.dataset import bundled_wikipedia
    from streams.client import Client

    settings = get_settings()
    source = path or bundled_wikipedia()
    if after is not None:
        from operators.model.checkpoint import read_meta

        offsets = read_meta(after).get("log_offsets", {})
        if "seq" in offsets:
            # Replayed from interactions.log: what follows it is already in the log, and its
            # row count says nothing about a file's rows.
            raise typer.BadParameter(
                f"{after} was trained from interactions.log (up to seq {offsets['seq']}); "
                "--after takes a checkpoint trained from a file",
                param_hint="--after",
            )
        start = int(offsets["events"])
    need_topics("interactions")
    client = Client(settings)
    columns = (
        TextColumn("[bold]producing"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[rate]}"),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("produce", total=None if loop else limit, rate="")
        began = time.monotonic()

        def on_progress(n: int) -> None:
            progress.update(
                task, completed=n, rate=f"{n / max(time.monotonic() - began, 1e-9):,.0f} ev/s"
            )

        # A JodieError (an undeliverable batch) is one line, as for every command.
        summary = client.send_file(
            source,
            start=start,
            limit=limit,
            rate=rate,
            strict=strict,
            on_progress=on_progress,
            laps=None if loop else 1,
        )
    for bad in summary.bad_rows[:20]:
        console.print(f"[yellow]bad row[/yellow] {source}:{bad.line}: {bad.reason_text}")
    if len(summary.bad_rows) > 20:
        console.print(f"[yellow]... and {len(summary.bad_rows) - 20} more bad rows[/yellow]")
    result = {
        "topic": client.topic,
        "events": summary.events,
        "seconds": round(summary.seconds, 3),
        "events_per_s": round(summary.events_per_s, 1),
        "bad_rows": len(summary.bad_rows),
        "source_tag": summary.source_tag,
        "laps": summary.laps,
    }
    out.print(json.dumps(result))
    if json_out is not None:
        json_out.write_text(json.dumps(result, indent=2))

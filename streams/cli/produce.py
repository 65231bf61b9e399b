"""`jodie produce`: a JODIE CSV onto the `interactions` topic."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from jodie_errors import JodieError
from streams.cli.common import _fail, console, out
from streams.settings import get_settings


def produce(
    path: Annotated[
        Path | None, typer.Argument(help="JODIE CSV (plain or .gz); default: bundled Wikipedia.")
    ] = None,
    rate: Annotated[
        float | None, typer.Option(help="Events per second (default: as fast as possible).")
    ] = None,
    limit: Annotated[int | None, typer.Option(help="Send at most this many events.")] = None,
    start: Annotated[int, typer.Option(help="Skip this many valid rows first (resume).")] = 0,
    after: Annotated[
        Path | None,
        typer.Option(help="Start after the events this checkpoint was trained on (sets --start)."),
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
    from streams.codecs import make_codec
    from streams.produce import produce_file
    from streams.runtime.clients import idempotent_producer

    settings = get_settings()
    source = path or bundled_wikipedia()
    if after is not None:
        from operators.model.checkpoint import read_meta

        try:
            offsets = read_meta(after).get("log_offsets", {})
        except JodieError as exc:
            raise _fail(exc) from exc
        if "seq" in offsets:
            # Replayed from interactions.log: what follows it is already in the log, and its
            # row count says nothing about a file's rows.
            raise _fail(
                JodieError(
                    f"{after} was trained from interactions.log (up to seq {offsets['seq']}); "
                    "--after takes a checkpoint trained from a file"
                )
            )
        start = int(offsets["events"])
    topic = settings.topic("interactions")
    codec = make_codec(settings, "interaction", topic)
    producer = idempotent_producer(settings)
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

        try:
            summary = produce_file(
                source,
                producer,
                codec,
                topic,
                start=start,
                limit=limit,
                rate=rate,
                strict=strict,
                flush_every=settings.produce_batch,
                on_progress=on_progress,
                laps=None if loop else 1,
            )
        except JodieError as exc:
            raise _fail(exc) from exc
    for bad in summary.bad_rows[:20]:
        console.print(f"[yellow]bad row[/yellow] {source}:{bad.line}: {bad.reason_text}")
    if len(summary.bad_rows) > 20:
        console.print(f"[yellow]... and {len(summary.bad_rows) - 20} more bad rows[/yellow]")
    result = {
        "topic": topic,
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

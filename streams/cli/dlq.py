"""`jodie dlq`: the events the pipeline rejected (interactions.dlq): show them, send them again."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Annotated

import typer

from streams.cli.common import console, need_topics, out
from streams.dlq import DlqReason
from streams.settings import get_settings

dlq_app = typer.Typer(
    no_args_is_help=True,
    help="Rejected events (interactions.dlq): show them with their reason, send them again.",
)

Reason = Annotated[DlqReason | None, typer.Option(help="Only the events rejected for this reason.")]
Limit = Annotated[int | None, typer.Option(min=1, help="At most this many, oldest first.")]


@dlq_app.command("show")
def dlq_show(
    reason: Reason = None,
    limit: Limit = None,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json", help="One JSON object a line (what `jodie dlq replay --from` reads)."
        ),
    ] = False,
) -> None:
    """Rejected events, oldest first: the reason and its detail, where the event came from,
    and the event itself."""
    from streams.dlq import dead_letters

    need_topics("interactions.dlq")
    reasons: Counter[str] = Counter()
    for letter in dead_letters(get_settings(), reason, limit):
        reasons[letter.reason] += 1
        if as_json:
            out.print(json.dumps(letter.as_json()))
            continue
        ev = letter.event
        what = (
            f"event {ev['event_id']} user {ev['user_id']} item {ev['item_id']} "
            f"time {ev['timestamp']}"
            if ev is not None
            else f"not an event ({len(letter.value)} bytes)"
        )
        out.print(f"{letter.reason}  {what}  from {letter.source}: {letter.detail}")
    counts = ", ".join(f"{r} {n}" for r, n in sorted(reasons.items())) or "none"
    console.print(f"rejected events shown: {sum(reasons.values())} ({counts})", highlight=False)


@dlq_app.command("replay")
def dlq_replay(
    reason: Reason = None,
    limit: Limit = None,
    from_file: Annotated[
        Path | None,
        typer.Option(
            "--from",
            exists=True,
            dir_okay=False,
            help="Send the events of this file instead: `jodie dlq show --json` lines, "
            "their `event` fixed by hand.",
        ),
    ] = None,
) -> None:
    """Send rejected events again to `interactions`, as their client sent them (the router
    judges them again: a duplicate is rejected again as one). Prints what was sent."""
    from streams.dlq import dead_letters, replay, replay_file

    if from_file is not None and (reason is not None or limit is not None):
        raise typer.BadParameter("--from sends the whole file; drop --reason and --limit")
    need_topics("interactions.dlq", "interactions")
    settings = get_settings()
    if from_file is not None:
        summary = replay_file(settings, from_file)
    else:
        summary = replay(settings, dead_letters(settings, reason, limit))
    out.print(
        json.dumps(
            {
                "topic": settings.topic("interactions"),
                "sent": summary.sent,
                "skipped": dict(summary.skipped),
            }
        )
    )

"""Interactive queries from the command line: what a user should see now."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Annotated

import typer

from streams.cli.common import _fail, out
from streams.query import MAX_K
from streams.settings import get_settings


def recommend(
    user: Annotated[str, typer.Argument(help="The user's id.")],
    k: Annotated[int, typer.Option("-k", min=1, max=MAX_K, help="How many items to list.")] = 10,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the workers' JSON answer.")
    ] = False,
    cold_start: Annotated[
        bool,
        typer.Option(
            "--cold-start",
            help="For a user without any event yet, list the items popular and trending now.",
        ),
    ] = False,
    at: Annotated[
        float | None,
        typer.Option(help="Project the user to this event time (s) instead of the stream time."),
    ] = None,
    workers: Annotated[
        int, typer.Option(min=1, help="Ask workers 0..N-1 (JODIE_WEB_PORT + N) until one answers.")
    ] = 4,
) -> None:
    """What USER should see now: the served ranker's top k, from the worker that owns USER."""
    from streams.exceptions import QueryError
    from streams.query import recommend as ask
    from streams.query import worker_urls

    urls = worker_urls(get_settings(), workers)
    try:
        answer = ask(user, k, urls=urls, cold_start=cold_start, at=at)
    except QueryError as exc:
        raise _fail(exc) from exc
    if as_json:
        out.print(json.dumps(asdict(answer)), soft_wrap=True, markup=False, highlight=False)
        return
    if answer.cold_start:
        state = "unknown user: items popular and trending now"
    else:
        seq = "from the checkpoint" if answer.log_seq is None else f"log seq {answer.log_seq}"
        pending = f", {answer.pending_events} pending" if answer.pending_events else ""
        state = f"state at {seq}{pending}"
    lines = [
        f"user {answer.user_id}  model {answer.model_version}  {state}  projected to "
        f"t={answer.projected_to}  answered by {answer.served_by}"
    ]
    for n, r in enumerate(answer.recommendations, 1):
        parts = " ".join(f"{name} {value:+.3f}" for name, value in r.terms.items())
        lines.append(f"{n:3d}. item {r.item_id}  score {r.score:+.3f}  = {parts}")
    lines.append(answer.score_meaning)
    for line in lines:
        out.print(line, soft_wrap=True, markup=False, highlight=False)

"""`jodie state`: the workers' state, read from Kafka."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from streams.cli.common import _registry_call, need_topics, out
from streams.settings import get_settings

state_app = typer.Typer(no_args_is_help=True, help="The workers' state, read from Kafka.")


@state_app.command("export")
def state_export(
    out_path: Annotated[Path, typer.Option("--out", help="The .npz file to write.")],
    checkpoint: Annotated[
        Path | None,
        typer.Option(
            exists=True, file_okay=False, help="The checkpoint the workers serve (or --model)."
        ),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(help="Workers run --model NAME: the states of its latest epoch."),
    ] = None,
) -> None:
    """Current embeddings from the tables' changelogs, in the `evaluate --export-states` layout."""
    from streams.state_export import export_states

    if (checkpoint is None) == (model is None):
        raise typer.BadParameter("give exactly one of --checkpoint and --model")
    need_topics("jodie-user-state-changelog", "jodie-item-state-changelog")
    counts = _registry_call(lambda: export_states(get_settings(), checkpoint, out_path, model))
    out.print(json.dumps({"out": str(out_path), **counts}))

"""What the command groups share: the two consoles, the error exit, the model-name option."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from jodie_errors import JodieError

console = Console(stderr=True)  # messages for whoever runs the command
out = Console()  # the results, on stdout for pipes and scripts


def _fail(exc: JodieError) -> typer.Exit:
    # Escaped: a message may quote what a user typed, brackets and all. Soft-wrapped: one
    # line in logs and pipes, however wide the message (a terminal wraps it).
    console.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True, highlight=False)
    return typer.Exit(code=2)


ModelName = Annotated[str, typer.Option("--name", help="Model name (the registry key).")]


def _registry_call(call: Callable[[], Any]) -> Any:
    try:
        return call()
    except JodieError as exc:
        raise _fail(exc) from exc

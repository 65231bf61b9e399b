"""What the command groups share: the two consoles, the one-line errors, the model-name option."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from jodie_errors import JodieError
from operators.model.exceptions import CheckpointError

# Soft-wrapped: a line is never cut at the console's width (80 columns when the output is not
# a terminal), so JSON and one-line messages stay whole in pipes and logs.
console = Console(stderr=True, soft_wrap=True)  # messages for whoever runs the command
# The results, on stdout for pipes and scripts: data, never read as rich markup.
out = Console(soft_wrap=True, markup=False)


def user_error(exc: BaseException) -> str | None:
    """The one line a user's mistake prints (what is wrong, and the fix), or None when
    ``exc`` is not one. The one place where errors become messages: commands raise typed
    errors, or let typer's parameter checks (types, ranges, choices, paths) refuse a value."""
    if isinstance(exc, JodieError):
        fix = next((f for kind, f in _FIXES.items() if isinstance(exc, kind)), None)
        return str(exc) if fix is None else f"{exc}; {fix}"
    # typer's (vendored) click usage errors: a bad value, a missing option, an unknown command.
    if isinstance(exc, typer.TyperException) and exc.exit_code == 2:
        ctx = getattr(exc, "ctx", None)
        see = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        # Its wording for a value outside a Literal's choices starts with this.
        return exc.format_message().replace("Value error, ", "") + see
    return None


# The fix, for errors whose message says only what is wrong (raised below the CLI, where the
# command that would fix it is not known).
_FIXES: dict[type[JodieError], str] = {
    CheckpointError: "give a directory `jodie train --out` wrote (or retrain, or copy it again)",
}


def _fail(exc: BaseException | str) -> typer.Exit:
    """Print ``exc`` as the one-line error (see ``user_error``); the exit to raise."""
    message = exc if isinstance(exc, str) else user_error(exc) or str(exc)
    # One line whatever the message holds (a detail quoted from a broker may span several);
    # escaped: it may quote what a user typed, brackets and all.
    line = " ".join(part.strip() for part in message.splitlines() if part.strip())
    console.print(f"[red]error:[/red] {escape(line)}", highlight=False)
    return typer.Exit(code=2)


def existing_file(text: str) -> Path:
    """An argparse ``type`` for a file a script reads: a missing one is a usage error (one line,
    exit 2), not a traceback from deep inside the reader."""
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text}: no such file")
    return path


def script_main(main: Callable[[], Any]) -> Any:
    """Run a script's ``main`` (the benchmarks) as the CLI runs a command: a user's mistake
    (no broker answering, a bad ``JODIE_*`` variable, a checkpoint that cannot be read) ends
    it with the one-line error and exit status 2 instead of a traceback."""
    try:
        return main()
    except JodieError as exc:
        raise SystemExit(_fail(exc).exit_code) from None


ModelName = Annotated[str, typer.Option("--name", help="Model name (the registry key).")]


def _registry_call(call: Callable[[], Any]) -> Any:
    try:
        return call()
    except JodieError as exc:
        raise _fail(exc) from exc


def need_topics(*names: str) -> None:
    """Fail at once, in one line, when no broker answers or one of these topics (names
    without the prefix) is missing, instead of a client waiting for it."""
    from streams.settings import get_settings
    from streams.topics import require_topics

    require_topics(get_settings(), names)

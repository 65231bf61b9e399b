"""The `jodie` command line: local broker, topics, producing, and (below) the model commands."""

# The docstring above is `jodie --help`'s text. One module per command group; each imports
# what its commands need inside them, so that `jodie --help` stays fast.

from __future__ import annotations

from typing import Any

import typer
import typer.core

from streams.cli import (
    acls,
    broker,
    dashboard,
    dlq,
    model,
    models,
    pipeline,
    produce,
    query,
    state,
    topics,
)
from streams.cli.common import _fail, user_error
from streams.exceptions import SettingsError
from streams.settings import get_settings


class _Group(typer.core.TyperGroup):
    def invoke(self, ctx: Any) -> Any:  # ctx: typer's (vendored) click Context
        # Every command runs in here (options parsed, subcommands resolved): a user's mistake,
        # wherever it is found, is one line and exit code 2, never a traceback.
        try:
            return super().invoke(ctx)
        except Exception as exc:
            # A group called without a command prints its help, as typer does.
            if type(exc).__name__ == "NoArgsIsHelpError":
                raise
            message = user_error(exc)
            if message is None:
                raise
            raise _fail(message) from exc


app = typer.Typer(
    cls=_Group,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help=__doc__,
)


@app.callback()
def _check_settings() -> None:
    # Every command reads the JODIE_* variables: a bad one is one line, not a traceback.
    try:
        get_settings()
    except SettingsError as exc:
        raise _fail(exc) from exc


# Registered in the order `jodie --help` lists them (commands first, then groups).
app.add_typer(broker.broker_app, name="broker")
app.add_typer(topics.topics_app, name="topics")
app.add_typer(acls.acls_app, name="acls")
app.command("produce")(produce.produce)
app.command("router")(pipeline.router)
app.add_typer(models.models_app, name="models")
app.command("trainer")(pipeline.trainer)
app.add_typer(state.state_app, name="state")
app.command("worker")(pipeline.worker)
app.command("recommendations")(pipeline.recommendations)
app.command("recommend")(query.recommend)
app.command("metrics")(pipeline.metrics)
app.add_typer(dlq.dlq_app, name="dlq")
app.command("dashboard")(dashboard.dashboard)
app.command("train")(model.train)
app.command("evaluate")(model.evaluate)
app.command("plot")(model.plot)

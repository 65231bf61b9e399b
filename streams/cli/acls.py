"""`jodie acls`: what each role may do on a secured cluster (show, apply)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import typer
from rich.table import Table

from streams.cli.common import _fail, out
from streams.settings import get_settings

if TYPE_CHECKING:
    from streams.acls import Grant

acls_app = typer.Typer(
    no_args_is_help=True, help="Each role's ACLs for the topics of JODIE_TOPIC_PREFIX."
)


def _table(grants: list[Grant]) -> Table:
    table = Table("principal", "may", "resource", "name")
    for g in grants:
        name = g.name + ("*" if g.prefixed else "")
        table.add_row(f"User:{g.role}", g.operation, g.resource, name)
    return table


@acls_app.command("show")
def acls_show() -> None:
    """List the ACLs `apply` creates (nothing is sent to the cluster)."""
    from streams.acls import grants

    out.print(_table(grants(get_settings())))


@acls_app.command("apply")
def acls_apply() -> None:
    """Create every role's ACLs (run as the cluster's super user; existing ones are kept)."""
    from jodie_errors import JodieError
    from streams.acls import apply_acls
    from streams.runtime.clients import admin

    settings = get_settings()
    try:
        out.print(_table(apply_acls(admin(settings), settings)))
    except JodieError as exc:
        raise _fail(exc) from exc

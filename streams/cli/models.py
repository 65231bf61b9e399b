"""`jodie models`: checkpoints announced on the `models` topic (the registry)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from streams.cli.common import ModelName, _registry_call, need_topics, out
from streams.settings import get_settings

models_app = typer.Typer(
    no_args_is_help=True,
    help="Checkpoints announced on the `models` topic: list, promote, roll back.",
)


def _registry(name: str) -> Any:
    need_topics("models")  # before the registry's (slow) imports: a mistake fails at once
    from streams.models import Registry

    return _registry_call(lambda: Registry(get_settings(), name))  # a bad name: one line


@models_app.command("announce")
def models_announce(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint directory to announce.")],
    version: Annotated[str | None, typer.Option(help="Version name (default v<N>).")] = None,
    promote: Annotated[bool, typer.Option(help="Also make it the serving version.")] = False,
    unless_serving: Annotated[
        bool,
        typer.Option(
            help="Do nothing when a version is already promoted (a first deployment's bootstrap)."
        ),
    ] = False,
    name: ModelName = "jodie",
) -> None:
    """Copy a verified checkpoint into JODIE_MODEL_STORE and announce it on `models` (signed
    when JODIE_MODEL_SIGNING_KEY is set)."""
    from streams.models import checked_name

    if version is not None:  # a bad name is refused before anything is looked up
        _registry_call(lambda: checked_name("version", version))
    registry = _registry(name)
    if unless_serving:
        serving = _registry_call(registry.serving)
        if serving is not None:
            out.print(json.dumps(serving))
            return
    record = _registry_call(lambda: registry.announce(checkpoint, version))
    if promote:
        record = _registry_call(lambda: registry.promote(record["version"]))
    out.print(json.dumps(record))


@models_app.command("list")
def models_list(name: ModelName = "jodie") -> None:
    """Every announced version, oldest first; the serving one is marked."""
    registry = _registry(name)
    serving = _registry_call(registry.serving)
    for r in _registry_call(registry.versions):
        mark = "*" if serving is not None and serving["version"] == r["version"] else " "
        mrr = r["metrics"].get("valid_mrr_frozen")
        # A checkpoint trained from a file is at no position of interactions.log.
        trained = "trained from a file" if r["log_seq"] < 0 else f"log seq {r['log_seq']}"
        out.print(
            f"{mark} {r['version']}  {trained}  "
            f"valid MRR {mrr if mrr is None else round(mrr, 4)}  {r['uri']}"
        )


@models_app.command("show")
def models_show(
    version: Annotated[str, typer.Argument(help="The version to show.")], name: ModelName = "jodie"
) -> None:
    """One version's announcement (JSON)."""
    registry = _registry(name)
    out.print(json.dumps(_registry_call(lambda: registry.show(version))))


@models_app.command("promote")
def models_promote(
    version: Annotated[str, typer.Argument(help="The version to serve.")], name: ModelName = "jodie"
) -> None:
    """Make a version the serving one (its location, signature and digest are checked first)."""
    registry = _registry(name)
    out.print(json.dumps(_registry_call(lambda: registry.promote(version))))


@models_app.command("rollback")
def models_rollback(name: ModelName = "jodie") -> None:
    """Serve again the version that served before the current one."""
    registry = _registry(name)
    out.print(json.dumps(_registry_call(registry.rollback)))

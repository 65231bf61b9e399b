"""`jodie topics`: the topics declared in deploy/topics.toml (apply, delete, show)."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from streams.cli.common import console, out
from streams.settings import get_settings

topics_app = typer.Typer(no_args_is_help=True, help="The topics declared in deploy/topics.toml.")


@topics_app.command("apply")
def topics_apply() -> None:
    """Create missing topics; report drift of existing ones (exit 1 on drift)."""
    from streams.runtime.clients import admin
    from streams.topics import apply_topics, declared_topics

    settings = get_settings()
    reports = apply_topics(
        admin(settings),
        declared_topics(settings),
        settings.replication,
        min_insync=settings.min_insync_replicas,
    )
    table = Table("topic", "status", "drift")
    for r in reports:
        table.add_row(r.name, r.action, "; ".join(r.drift))
    out.print(table)
    if any(r.action == "drift" for r in reports):
        raise typer.Exit(code=1)


@topics_app.command("delete")
def topics_delete(
    yes: Annotated[
        bool, typer.Option("--yes", help="Really delete (all data in them is lost).")
    ] = False,
) -> None:
    """Delete every declared topic (with the current JODIE_TOPIC_PREFIX)."""
    from streams.runtime.clients import admin
    from streams.topics import declared_topics, delete_topics

    if not yes:
        console.print("refusing without --yes")
        raise typer.Exit(code=1)
    settings = get_settings()
    names = [s.name for s in declared_topics(settings)]
    delete_topics(admin(settings), names)
    console.print(f"deleted {len(names)} topics")


@topics_app.command("show")
def topics_show(
    topic: Annotated[
        str, typer.Argument(help="Logical topic name, e.g. interactions.")
    ] = "interactions",
    sample: Annotated[int, typer.Option(help="Decode and print this many messages.")] = 3,
    count: Annotated[
        bool, typer.Option(help="Read the whole topic and count distinct event ids.")
    ] = False,
) -> None:
    """Message counts per partition and a few decoded messages of a topic."""
    from streams.codecs import TOPIC_SCHEMAS, make_codec
    from streams.peek import decode_all, partition_counts
    from streams.runtime.clients import committed_reader

    settings = get_settings()
    name = settings.topic(topic)
    consumer = committed_reader(settings, group_id="jodie-topics-show")
    try:
        counts = partition_counts(consumer, name)
    finally:
        consumer.close()
    total = sum(c.messages for c in counts)
    out.print(
        f"{name}: {total} offsets in {len(counts)} partitions "
        + ", ".join(f"p{c.partition}={c.messages}" for c in counts)
    )
    schema = TOPIC_SCHEMAS.get(topic)
    if schema is None:
        return
    codec = make_codec(settings, schema, name)
    for record in decode_all(settings, name, codec, limit=sample):
        out.print_json(json.dumps(record))
    if count:
        ids = [r.get("event_id") for r in decode_all(settings, name, codec)]
        out.print(json.dumps({"messages": len(ids), "distinct_event_ids": len(set(ids))}))

"""`jodie topics`: the topics declared in deploy/topics.toml (apply, delete, show)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from jodie_errors import JodieError
from streams.cli.common import console, need_topics, out
from streams.settings import get_settings

if TYPE_CHECKING:
    from streams.peek import Peeked

topics_app = typer.Typer(no_args_is_help=True, help="The topics declared in deploy/topics.toml.")


@topics_app.command("apply")
def topics_apply() -> None:
    """Create missing topics; raise a record limit below the declared one; report any other
    drift of existing ones (exit 1 on drift)."""
    from streams.runtime.clients import admin
    from streams.topics import apply_topics, declared_topics

    settings = get_settings()
    reports = apply_topics(
        admin(settings),
        declared_topics(settings),
        settings.replication,
        min_insync=settings.min_insync_replicas,
    )
    table = Table("topic", "status", "what differed")
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
    """Delete every declared topic (with the current JODIE_TOPIC_PREFIX), and the router's and
    the workers' consumer groups with their offsets in them: a pipeline created again under
    the same names starts from its first event, not from where the deleted one stopped."""
    from streams.runtime.clients import admin
    from streams.topics import declared_topics, delete_groups, delete_topics, pipeline_groups

    if not yes:
        console.print("refusing without --yes")
        raise typer.Exit(code=1)
    settings = get_settings()
    client = admin(settings)
    # Groups first: the broker refuses to delete one with members (running workers), so a
    # running pipeline stops this before any topic is gone. (The router assigns its partitions
    # itself and is no member: nothing refuses while it runs.)
    groups = delete_groups(client, pipeline_groups(settings))
    names = [s.name for s in declared_topics(settings)]
    delete_topics(client, names)
    console.print(f"deleted {len(names)} topics and {len(groups)} consumer groups")


@topics_app.command("show")
def topics_show(
    topic: Annotated[
        str,
        typer.Argument(
            help="A topic of deploy/topics.toml, without the prefix: interactions, "
            "interactions.log, interactions.dlq, interactions.positions, user-inbox, "
            "item-inbox, recommendations, evaluations, item-vectors, models, "
            "jodie-user-state-changelog, "
            "jodie-item-state-changelog."
        ),
    ] = "interactions",
    sample: Annotated[
        int, typer.Option(min=0, help="Decode and print this many messages, oldest first.")
    ] = 3,
    count: Annotated[
        bool, typer.Option(help="Read the whole topic and count distinct event ids.")
    ] = False,
) -> None:
    """Message counts per partition, then a few messages decoded as their writer wrote them:
    one JSON object a line (partition, offset, key, value)."""
    from streams.peek import partition_counts, read_messages, topic_decoder
    from streams.runtime.clients import committed_reader
    from streams.topics import declared_topics

    settings = get_settings()
    declared = [s.name.removeprefix(settings.topic_prefix) for s in declared_topics(settings)]
    if topic not in declared:
        raise typer.BadParameter(
            f"{topic!r} is not a topic of the pipeline; one of: {', '.join(declared)}",
            param_hint="TOPIC",
        )
    need_topics(topic)
    name = settings.topic(topic)
    consumer = committed_reader(settings, group_id="jodie-topics-show")
    try:
        counts = partition_counts(consumer, name)
    finally:
        consumer.close()
    total = sum(c.messages for c in counts)
    console.print(
        f"{name}: {total} offsets in {len(counts)} partition{'' if len(counts) == 1 else 's'} "
        + ", ".join(f"p{c.partition}={c.messages}" for c in counts),
        highlight=False,
    )
    decode = topic_decoder(settings, topic)

    def shown(m: Peeked) -> dict[str, Any]:
        key = None if m.key is None else m.key.decode(errors="replace")
        try:
            return {
                "partition": m.partition,
                "offset": m.offset,
                "key": key,
                "value": decode(m.key, m.value, m.headers),
            }
        except JodieError as exc:  # a client may write anything to `interactions`
            return {
                "partition": m.partition,
                "offset": m.offset,
                "key": key,
                "undecodable": str(exc),
            }

    if sample:
        for m in read_messages(settings, name, limit=sample):
            out.print(json.dumps(shown(m)))
    if count:
        values = [shown(m).get("value") for m in read_messages(settings, name)]
        ids = [i for i in map(_event_id, values) if i is not None]
        out.print(
            json.dumps(
                {
                    "messages": len(values),
                    "with_event_id": len(ids),
                    "distinct_event_ids": len(set(ids)),
                }
            )
        )


def _event_id(value: Any) -> str | None:
    """The event a decoded message is about, wherever its schema keeps the id."""
    if not isinstance(value, dict):
        return None
    for inner in (value, value.get("interaction"), value.get("event")):
        if isinstance(inner, dict) and isinstance(inner.get("event_id"), str):
            return str(inner["event_id"])
    return None

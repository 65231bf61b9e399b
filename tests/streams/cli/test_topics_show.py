"""`jodie topics show` decodes every topic of the pipeline as its writer wrote it."""

from __future__ import annotations

import json
from typing import Any

import pytest

from streams.settings import Settings
from streams.topics import declared_topics
from tests.streams.cli.conftest import RESENT, STREAMED, Jodie, Pipeline

pytestmark = pytest.mark.kafka


def _is_vector(value: Any) -> bool:
    return isinstance(value, list) and len(value) > 0 and all(isinstance(x, float) for x in value)


def _row(value: dict[str, Any]) -> bool:
    """A table row, keyed by entity and epoch; its embedding is null until its first event."""
    if value["epoch"] != "v1@0" or not value["entity"]:
        return False
    return value.get("deleted") or value["embedding"] is None or _is_vector(value["embedding"])


#: What a decoded message of each topic holds, by the topic's name without the prefix.
HOLDS = {
    "interactions": lambda v: {"event_id", "user_id", "item_id", "timestamp"} <= set(v),
    "interactions.log": lambda v: v["seq"] >= 0 and "event_id" in v["interaction"],
    "interactions.dlq": lambda v: v["reason"] in ("duplicate", "malformed") and v["detail"],
    "interactions.positions": lambda v: v["partition"] >= 0 and v["next_offset"] >= 0,
    "user-inbox": lambda v: v["event"] is not None or v["partner"] is not None,
    "item-inbox": lambda v: v["event"] is not None or v["partner"] is not None,
    "recommendations": lambda v: v["model_version"] == "v1" and v["candidates"],
    "evaluations": lambda v: v["rank"] >= 1 and v["n_items"] >= 0,
    "item-vectors": lambda v: _is_vector(v["vector"]) and int(v["jodie-seq"]) >= 0,
    "models": lambda v: v["version"] == "v1" and v["name"] == "jodie",
    "jodie-user-state-changelog": _row,
    "jodie-item-state-changelog": _row,
}


def test_every_declared_topic_is_covered() -> None:
    assert sorted(HOLDS) == sorted(s.name for s in declared_topics(Settings(topic_prefix="")))


@pytest.mark.parametrize("topic", sorted(HOLDS))
def test_show_decodes_the_topic(pipeline: Pipeline, jodie: Jodie, topic: str) -> None:
    result = jodie(["topics", "show", topic, "--sample", "3"], pipeline.env)
    assert result.exit_code == 0, result.output
    assert result.stderr.startswith(pipeline.settings.topic(topic) + ": ")
    shown = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(shown) >= 1 and all("undecodable" not in m for m in shown), shown
    for m in shown:
        assert HOLDS[topic](m["value"]), m


def test_count_tells_resent_events_apart(pipeline: Pipeline, jodie: Jodie) -> None:
    result = jodie(["topics", "show", "interactions", "--sample", "0", "--count"], pipeline.env)
    assert result.exit_code == 0, result.output
    # The malformed message has no event id; the re-sent ones have their first send's.
    assert json.loads(result.stdout) == {
        "messages": STREAMED + RESENT + 1,
        "with_event_id": STREAMED + RESENT,
        "distinct_event_ids": STREAMED,
    }


def test_an_undecodable_message_is_shown_as_such(pipeline: Pipeline, jodie: Jodie) -> None:
    sample = str(STREAMED + RESENT + 1)
    result = jodie(["topics", "show", "interactions", "--sample", sample], pipeline.env)
    assert result.exit_code == 0, result.output
    shown = [json.loads(line) for line in result.stdout.splitlines()]
    bad = [m for m in shown if "undecodable" in m]
    assert len(shown) == STREAMED + RESENT + 1 and len(bad) == 1
    assert bad[0]["key"] == "1087" and "single-object" in bad[0]["undecodable"]

"""The declarative topic spec."""

from __future__ import annotations

import pytest

from deploy.exceptions import TopicSpecError
from deploy.topics import load_topic_specs


def test_bundled_spec() -> None:
    specs = {
        s.name: s
        for s in load_topic_specs(
            default_partitions=6, prefix="p-", input_partitions=2, whole_partitions=3
        )
    }
    assert set(specs) == {
        "p-interactions",
        "p-interactions.dlq",
        "p-interactions.log",
        "p-interactions.positions",
        "p-user-inbox",
        "p-item-inbox",
        "p-jodie-user-state-changelog",
        "p-jodie-item-state-changelog",
        "p-recommendations",
        "p-evaluations",
        "p-item-vectors",
        "p-models",
    }
    # Keyed topics share the default partition count so they stay co-partitioned; the
    # router's input and log, read whole by one router, have the input count.
    keyed = ["user-inbox", "item-inbox", "recommendations", "jodie-user-state-changelog"]
    assert {specs[f"p-{name}"].partitions for name in keyed} == {6}
    assert specs["p-interactions"].partitions == specs["p-interactions.log"].partitions == 2
    assert load_topic_specs(6)[0].partitions == 1  # interactions: one by default
    # Written by the workers, read whole by every reader: the "whole" count, one by default.
    assert specs["p-item-vectors"].partitions == specs["p-evaluations"].partitions == 3
    assert {s.name: s.partitions for s in load_topic_specs(6)}["evaluations"] == 1
    assert specs["p-models"].partitions == 1
    # The setting to name when a pipeline's count differs (none where the file fixes it).
    assert specs["p-item-vectors"].partitions_setting == "JODIE_WHOLE_PARTITIONS"
    assert specs["p-interactions"].partitions_setting == "JODIE_INPUT_PARTITIONS"
    assert specs["p-user-inbox"].partitions_setting == "JODIE_PARTITIONS"
    assert specs["p-models"].partitions_setting == ""
    assert specs["p-interactions.log"].configs() == {
        "cleanup.policy": "compact",
        "retention.ms": "-1",
    }
    # The changelogs take rows far above the brokers' default record limit (about 1 MB):
    # a row carries the events waiting in it.
    for table in ("user-state", "item-state"):
        assert specs[f"p-jodie-{table}-changelog"].configs() == {
            "cleanup.policy": "compact",
            "retention.ms": "-1",
            "max.message.bytes": str(32 << 20),
        }
    assert specs["p-recommendations"].max_message_bytes is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[[topic]]\nname = "a"\ncleanup_policy = "shred"\n', "cleanup_policy"),
        ('[[topic]]\nname = "a"\n[[topic]]\nname = "a"\n', "unique name"),
        ('[[topic]]\nname = "a"\npartitions = 0\n', "partitions"),
        ('[[topic]]\nname = "a"\npartitions = "many"\n', "partitions"),
        ('[[topic]]\nname = "a"\npartitions = [4]\n', "partitions"),
        ("[[topic]\n", "does not parse"),
        ('[[topic]]\nname = "a"\nmax_message_bytes = 10\n', "max_message_bytes"),
        ('[[topic]]\nname = "a"\nmax_message_bytes = "32 MiB"\n', "max_message_bytes"),
    ],
)
def test_invalid_specs(text: str, message: str) -> None:
    with pytest.raises(TopicSpecError, match=message):
        load_topic_specs(4, text=text)

"""The declarative topic spec (deploy/topics.toml) as typed records."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from importlib import resources
from typing import Literal

from deploy.exceptions import TopicSpecError

CleanupPolicy = Literal["delete", "compact", "compact,delete"]
_POLICIES = ("delete", "compact", "compact,delete")


@dataclass(frozen=True)
class TopicSpec:
    """One topic as it must exist on the cluster."""

    name: str
    partitions: int
    cleanup_policy: CleanupPolicy
    retention_ms: int
    doc: str = ""
    # The setting that gives ``partitions`` ("" when topics.toml fixes the number).
    partitions_setting: str = ""
    # The largest record batch the topic takes (None: the brokers' default, about 1 MB).
    max_message_bytes: int | None = None

    def configs(self) -> dict[str, str]:
        """The topic-level configs this spec pins (compared for drift)."""
        pinned = {"cleanup.policy": self.cleanup_policy, "retention.ms": str(self.retention_ms)}
        if self.max_message_bytes is not None:
            pinned["max.message.bytes"] = str(self.max_message_bytes)
        return pinned


#: Which setting gives a topic's partitions, by what topics.toml says (absent: None).
_PARTITION_SETTINGS = {
    None: "JODIE_PARTITIONS",
    "input": "JODIE_INPUT_PARTITIONS",
    "whole": "JODIE_WHOLE_PARTITIONS",
}


def load_topic_specs(
    default_partitions: int,
    prefix: str = "",
    text: str | None = None,
    input_partitions: int = 1,
    whole_partitions: int = 1,
) -> list[TopicSpec]:
    """Read the spec; ``text`` replaces the bundled file (tests). A topic's ``partitions`` is
    a number, ``"input"`` (``input_partitions``), ``"whole"`` (``whole_partitions``) or
    absent (``default_partitions``)."""
    if text is None:
        text = resources.files("deploy").joinpath("topics.toml").read_text()
    try:
        entries = tomllib.loads(text).get("topic", [])
    except tomllib.TOMLDecodeError as exc:
        raise TopicSpecError(f"topics.toml does not parse: {exc}") from exc
    # What an absent or named count stands for (``_PARTITION_SETTINGS`` names the setting).
    counts = {None: default_partitions, "input": input_partitions, "whole": whole_partitions}
    specs: list[TopicSpec] = []
    seen: set[str] = set()
    for entry in entries:
        name = entry.get("name")
        if not name or name in seen:
            raise TopicSpecError(f"topic entry without a unique name: {entry}")
        seen.add(name)
        policy = entry.get("cleanup_policy", "delete")
        if policy not in _POLICIES:
            raise TopicSpecError(f"{name}: cleanup_policy must be one of {_POLICIES}")
        declared = entry.get("partitions")
        setting = ""
        if isinstance(declared, str | None):  # absent or named: a setting gives the count
            setting = _PARTITION_SETTINGS.get(declared, "")
            declared = counts.get(declared, declared)
        if not isinstance(declared, int) or isinstance(declared, bool):
            raise TopicSpecError(f'{name}: partitions must be a number, "input" or "whole"')
        partitions = declared
        if partitions < 1:
            raise TopicSpecError(f"{name}: partitions must be >= 1")
        largest = entry.get("max_message_bytes")
        if largest is not None and (
            not isinstance(largest, int) or isinstance(largest, bool) or largest < 1024
        ):
            raise TopicSpecError(f"{name}: max_message_bytes must be a number of bytes >= 1024")
        specs.append(
            TopicSpec(
                name=prefix + name,
                partitions=partitions,
                cleanup_policy=policy,
                retention_ms=int(entry.get("retention_ms", -1)),
                doc=entry.get("doc", ""),
                partitions_setting=setting,
                max_message_bytes=largest,
            )
        )
    return specs

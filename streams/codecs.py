"""Codecs for the topics, framed per the settings (single-object, or a Confluent registry)."""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

from confluent_kafka.schema_registry import Schema as RegistrySchema
from confluent_kafka.schema_registry import SchemaRegistryClient

from schemas.codec import (
    EVALUATION,
    INTERACTION,
    MODEL_ANNOUNCEMENT,
    RECOMMENDATION,
    SEQUENCED_INTERACTION,
    Codec,
    ConfluentFraming,
    Framing,
    Schema,
    SingleObjectFraming,
)
from streams.settings import Settings

#: The schema of each Avro topic of the pipeline, by its name without the prefix (the
#: inboxes and the tables' changelogs are internal and left out).
TOPIC_SCHEMAS = {
    "interactions": INTERACTION,
    "interactions.log": SEQUENCED_INTERACTION,
    "recommendations": RECOMMENDATION,
    "evaluations": EVALUATION,
    "models": MODEL_ANNOUNCEMENT,
}


class RegistryResolver:
    """Adapts confluent-kafka's SchemaRegistryClient to the codec's SchemaIdResolver."""

    def __init__(self, client: Any) -> None:
        self._client = client

    def register(self, subject: str, schema: Schema) -> int:
        return int(
            self._client.register_schema(subject, RegistrySchema(json.dumps(schema), "AVRO"))
        )

    def lookup(self, schema_id: int) -> Schema:
        found: Schema = json.loads(self._client.get_schema(schema_id).schema_str)
        return found


@lru_cache(maxsize=8)
def registry_client(url: str) -> Any:
    """One client per registry URL per process (a `mock://` registry lives in this client)."""
    return SchemaRegistryClient.new_client({"url": url})


def make_codec(settings: Settings, schema_name: str, topic: str) -> Codec:
    """The codec for ``schema_name`` on ``topic`` (subject ``<topic>-value`` in a registry)."""
    framing: Framing
    if settings.schema_registry_url:
        resolver = RegistryResolver(registry_client(settings.schema_registry_url))
        framing = ConfluentFraming(resolver, subject=f"{topic}-value")
    else:
        framing = SingleObjectFraming()
    return Codec(schema_name, framing)

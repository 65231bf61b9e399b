"""Avro schemas of the jodie-stream topics and the codec that frames them on the wire."""

from schemas.codec import (
    INTERACTION,
    MODEL_ANNOUNCEMENT,
    RECOMMENDATION,
    SEQUENCED_INTERACTION,
    Codec,
    ConfluentFraming,
    SchemaIdResolver,
    SingleObjectFraming,
    load_schema,
)
from schemas.exceptions import (
    DecodeError,
    EncodeError,
    SchemaError,
    UnknownSchemaError,
)
from schemas.vectors import recommendation_vectors

__all__ = [
    "INTERACTION",
    "MODEL_ANNOUNCEMENT",
    "RECOMMENDATION",
    "SEQUENCED_INTERACTION",
    "Codec",
    "ConfluentFraming",
    "DecodeError",
    "EncodeError",
    "SchemaError",
    "SchemaIdResolver",
    "SingleObjectFraming",
    "UnknownSchemaError",
    "load_schema",
    "recommendation_vectors",
]

"""Avro codec with writer-schema identity in every message (single-object or Confluent framing).

The ``avro`` package (Apache Avro's reference implementation) parses and validates schemas and
computes their Parsing Canonical Form and CRC-64-AVRO fingerprint; fastavro encodes and
decodes the records, which is the hot path.
"""

from __future__ import annotations

import io
import json
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Protocol

import avro.errors
import avro.schema
import fastavro

from schemas.exceptions import DecodeError, EncodeError, SchemaError, UnknownSchemaError

Schema = dict[str, Any]
Record = dict[str, Any]

INTERACTION = "interaction"
RECOMMENDATION = "recommendation"
MODEL_ANNOUNCEMENT = "model_announcement"
SEQUENCED_INTERACTION = "sequenced_interaction"
INBOX_MESSAGE = "inbox_message"
ENTITY_RECORD = "entity_record"
EVALUATION = "evaluation"

# Earlier shipped versions of a schema, by the file they are kept in: a codec of the schema
# knows their fingerprints, so records written before a field was added still decode.
_OLDER_VERSIONS = {
    MODEL_ANNOUNCEMENT: ("model_announcement.v1",),
    ENTITY_RECORD: ("entity_record.v1", "entity_record.v2"),
    RECOMMENDATION: ("recommendation.v1", "recommendation.v2"),
}

# Named types that one shipped schema uses inside another; inlined at load time so every
# schema is self-contained (its canonical form and fingerprint cover the nested record).
_SHARED_TYPES = {
    "io.jodie.v1.Interaction": INTERACTION,
    "io.jodie.v1.InboxEvent": INBOX_MESSAGE,
    "io.jodie.v1.PartnerPreState": INBOX_MESSAGE,
}
# Where a shared named type is defined inside another schema: (schema, field holding it).
_NESTED = {"io.jodie.v1.InboxEvent": "event", "io.jodie.v1.PartnerPreState": "partner"}

# Avro spec, "Single object encoding": two marker bytes, then the writer schema's
# CRC-64-AVRO fingerprint (8 bytes, little-endian), then the binary body.
_SINGLE_OBJECT_MARKER = b"\xc3\x01"
_SINGLE_OBJECT_HEADER = len(_SINGLE_OBJECT_MARKER) + 8
# Confluent wire format: magic byte 0, then the registry's 4-byte big-endian schema id.
_CONFLUENT_MAGIC = 0
_CONFLUENT_HEADER = struct.Struct(">bI")


def load_schema(name: str) -> Schema:
    """The schema shipped in this package as ``<name>.avsc`` (e.g. ``"interaction"``)."""
    try:
        text = resources.files("schemas").joinpath(f"{name}.avsc").read_text()
    except FileNotFoundError as exc:
        raise SchemaError(f"no schema named {name!r} in the schemas package") from exc
    schema: Schema = _inline(json.loads(text), seen=set())
    _parse(schema)  # a broken .avsc fails here, when loaded, not at its first message
    return schema


def _inline(node: Any, seen: set[str]) -> Any:
    if isinstance(node, str) and node in _SHARED_TYPES and node not in seen:
        seen.add(node)  # Avro allows one definition per name; later uses stay references
        schema = load_schema(_SHARED_TYPES[node])
        if node in _NESTED:
            field = next(f for f in schema["fields"] if f["name"] == _NESTED[node])
            schema = next(t for t in field["type"] if isinstance(t, dict))
        return _inline(schema, seen)
    if isinstance(node, list):
        return [_inline(n, seen) for n in node]
    if isinstance(node, dict):
        return {
            k: (_inline(v, seen) if k in ("type", "fields", "items", "values") else v)
            for k, v in node.items()
        }
    return node


def _parse(schema: Schema) -> avro.schema.Schema:
    try:
        return avro.schema.parse(json.dumps(schema))
    except avro.errors.AvroException as exc:
        raise SchemaError(f"invalid schema: {exc}") from exc


def canonical_form(schema: Schema) -> str:
    """Avro Parsing Canonical Form: what fingerprints and registries compare."""
    return _parse(schema).canonical_form


def fingerprint64(schema: Schema) -> bytes:
    """CRC-64-AVRO fingerprint of the canonical form, as the 8 little-endian bytes on the wire."""
    return _parse(schema).fingerprint("CRC-64-AVRO")


class SchemaIdResolver(Protocol):
    """Maps schemas to registry ids and back (a Confluent-compatible registry, or a fake)."""

    def register(self, subject: str, schema: Schema) -> int: ...

    def lookup(self, schema_id: int) -> Schema: ...


class Framing(Protocol):
    """How the writer schema's identity is put in front of the Avro body."""

    def header(self, schema: Schema) -> bytes: ...

    def split(self, data: bytes) -> tuple[Schema, memoryview]: ...


@dataclass
class SingleObjectFraming:
    """Avro single-object encoding; readers know writer schemas by fingerprint.

    Every schema a reader may meet must be given to it (``known``): older versions of a
    schema stay in ``known`` forever, which is the whole schema-evolution story without a
    registry.
    """

    known: dict[bytes, Schema] = field(default_factory=dict)

    def add(self, schema: Schema) -> bytes:
        fp = fingerprint64(schema)
        self.known[fp] = schema
        return fp

    def header(self, schema: Schema) -> bytes:
        fp = fingerprint64(schema)
        self.known.setdefault(fp, schema)
        return _SINGLE_OBJECT_MARKER + fp

    def split(self, data: bytes) -> tuple[Schema, memoryview]:
        if len(data) < _SINGLE_OBJECT_HEADER or data[:2] != _SINGLE_OBJECT_MARKER:
            raise DecodeError("not an Avro single-object message (missing C3 01 marker)")
        fp = bytes(data[2:_SINGLE_OBJECT_HEADER])
        schema = self.known.get(fp)
        if schema is None:
            raise UnknownSchemaError(
                f"unknown writer schema fingerprint {fp.hex()}; "
                "the producer uses a schema version this reader was not given"
            )
        return schema, memoryview(data)[_SINGLE_OBJECT_HEADER:]


@dataclass
class ConfluentFraming:
    """Confluent wire format (magic 0 + 4-byte id); ids come from a schema registry."""

    resolver: SchemaIdResolver
    subject: str
    _ids: dict[str, int] = field(default_factory=dict)
    _schemas: dict[int, Schema] = field(default_factory=dict)

    def header(self, schema: Schema) -> bytes:
        key = canonical_form(schema)
        schema_id = self._ids.get(key)
        if schema_id is None:
            schema_id = self.resolver.register(self.subject, schema)
            self._ids[key] = schema_id
            self._schemas[schema_id] = schema
        return _CONFLUENT_HEADER.pack(_CONFLUENT_MAGIC, schema_id)

    def split(self, data: bytes) -> tuple[Schema, memoryview]:
        if len(data) < _CONFLUENT_HEADER.size or data[0] != _CONFLUENT_MAGIC:
            raise DecodeError("not a Confluent-framed Avro message (missing magic byte 0)")
        _, schema_id = _CONFLUENT_HEADER.unpack_from(data)
        schema = self._schemas.get(schema_id)
        if schema is None:
            try:
                schema = self.resolver.lookup(schema_id)
            except Exception as exc:  # registry clients raise their own error types
                raise UnknownSchemaError(f"schema id {schema_id} not in the registry") from exc
            self._schemas[schema_id] = schema
        return schema, memoryview(data)[_CONFLUENT_HEADER.size :]


class Codec:
    """Encodes records with one writer schema and decodes any known writer schema into it.

    Decoding resolves the writer's schema into the reader's (this codec's) schema by Avro's
    rules: fields the reader added need defaults, fields the reader dropped are skipped. A
    schema given by name also reads the earlier versions of it this package ships.
    """

    def __init__(
        self,
        schema: Schema | str,
        framing: Framing | None = None,
        older: Iterable[Schema] = (),
    ) -> None:
        self.schema: Schema = load_schema(schema) if isinstance(schema, str) else schema
        try:
            self._parsed = fastavro.parse_schema(self.schema)
        except Exception as exc:  # fastavro raises several unrelated types on bad schemas
            raise SchemaError(f"invalid schema: {exc}") from exc
        self.framing: Framing = framing if framing is not None else SingleObjectFraming()
        if isinstance(self.framing, SingleObjectFraming):
            self.framing.add(self.schema)
            shipped = _OLDER_VERSIONS.get(schema, ()) if isinstance(schema, str) else ()
            for schema_version in (*older, *(load_schema(name) for name in shipped)):
                self.framing.add(schema_version)
        self._header = self.framing.header(self.schema)
        self._writers: dict[str, Any] = {}
        self._by_object: dict[int, tuple[Schema, Any, bool]] = {}
        self._canonical = canonical_form(self.schema)

    @property
    def header(self) -> bytes:
        """What every message this codec writes starts with (the framing of its schema): a
        message that starts with it was written with this codec's schema."""
        return self._header

    def encode(self, record: Mapping[str, Any]) -> bytes:
        buf = io.BytesIO()
        buf.write(self._header)
        try:
            fastavro.schemaless_writer(buf, self._parsed, record)
        # (OverflowError: an int beyond a long's 64 bits.)
        except (ValueError, TypeError, KeyError, AttributeError, OverflowError) as exc:
            raise EncodeError(f"record does not fit {self.schema.get('name')}: {exc}") from exc
        return buf.getvalue()

    def decode(self, data: bytes) -> Record:
        writer, body = self.framing.split(data)
        parsed_writer, same = self._parsed_writer(writer)
        stream = io.BytesIO(body)
        try:
            # Without a reader schema when the writer's is ours: no resolution to do.
            reader = None if same else self._parsed
            record = fastavro.schemaless_reader(stream, parsed_writer, reader)
        except Exception as exc:  # truncated or garbage bodies surface as many error types
            raise DecodeError(f"cannot decode {self.schema.get('name')}: {exc!r}") from exc
        if stream.tell() != len(body):
            raise DecodeError(f"{len(body) - stream.tell()} trailing bytes after the record")
        if not isinstance(record, dict):
            raise DecodeError("decoded value is not a record")
        return record

    def _parsed_writer(self, writer: Schema) -> tuple[Any, bool]:
        """The parsed writer schema and whether it is the reader's own (cached per object:
        framings hand out the same schema object for the same fingerprint)."""
        hit = self._by_object.get(id(writer))
        if hit is not None and hit[0] is writer:
            return hit[1], hit[2]
        key = canonical_form(writer)
        parsed = self._writers.get(key)
        if parsed is None:
            try:
                parsed = fastavro.parse_schema(writer)
            except Exception as exc:
                raise SchemaError(f"writer schema does not parse: {exc}") from exc
            self._writers[key] = parsed
        same = key == self._canonical
        self._by_object[id(writer)] = (writer, parsed, same)
        return parsed, same

"""Errors of the codec: schemas, framing, encoding and decoding."""

from jodie_errors import JodieError


class SchemaError(JodieError):
    """A schema could not be parsed or resolved; check the .avsc files and the registry."""

    reason = "schema"


class UnknownSchemaError(SchemaError):
    """The message names a writer schema this reader does not know; register or ship that schema."""

    reason = "unknown_schema"


class DecodeError(JodieError):
    """The bytes are not a valid message of the expected framing and schema; see the DLQ record."""

    reason = "malformed"


class EncodeError(JodieError):
    """The record does not fit its schema (missing field, wrong type); fix the producer."""

    reason = "unencodable"

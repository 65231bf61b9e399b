"""The root of every jodie-stream error, and the codec's errors."""


class JodieError(Exception):
    """Root of all errors raised by jodie-stream; catch this to handle any of them."""

    #: Short machine-readable reason, written to DLQ records next to the original bytes.
    reason: str = "error"


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

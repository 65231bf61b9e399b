"""The root of every jodie-stream error; each package's ``exceptions`` module derives from it.

It sits below every package (schemas/ included) so that one ``except JodieError`` catches an
error from any layer. ``reason`` is the short machine-readable word written to DLQ records
next to the original bytes.
"""


class JodieError(Exception):
    """Root of all errors raised by jodie-stream; catch this to handle any of them."""

    reason: str = "error"

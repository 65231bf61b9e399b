"""Errors of loading interaction data (operators.dataset)."""

from jodie_errors import JodieError


class DataError(JodieError):
    """Input data is unusable; the message names the file, line and reason."""

    reason = "bad_data"


class BadRowError(DataError):
    """One row of a JODIE CSV is malformed; fix the row or run without --strict to skip it."""

    def __init__(self, line: int, reason: str, text: str = "") -> None:
        super().__init__(f"line {line}: {reason}")
        self.line = line
        self.reason_text = reason
        self.text = text

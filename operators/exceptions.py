"""Errors of the pure operators (data loading, model, checkpoints)."""

from schemas.exceptions import JodieError


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


class CheckpointError(JodieError):
    """A checkpoint is missing, incomplete or fails its sha256 check; retrain or re-copy it."""

    reason = "bad_checkpoint"


class RetrievalError(JodieError):
    """A retrieval index got unusable input (wrong dimension, NaN/inf, bad k); fix the caller."""

    reason = "bad_vector"

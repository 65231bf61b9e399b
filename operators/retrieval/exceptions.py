"""Errors of candidate retrieval."""

from jodie_errors import JodieError


class RetrievalError(JodieError):
    """A retrieval index got unusable input (wrong dimension, NaN/inf, bad k); fix the caller."""

    reason = "bad_vector"

"""Errors of the runtime; each docstring says what the operator should do."""

from jodie_errors import JodieError


class StreamRuntimeError(JodieError):
    """Root of the runtime's errors; catch this to handle any of them."""


class RestoreError(StreamRuntimeError):
    """A changelog partition could not be read to its end; check the broker, then restart."""


class FencedError(StreamRuntimeError):
    """Another instance took over this transactional id; run each instance with its own id."""


class TransactionError(StreamRuntimeError):
    """A transaction failed for good; restart the instance (it resumes from its last commit)."""


class AuthenticationError(StreamRuntimeError):
    """The brokers refused the login (or the TLS handshake): fix JODIE_SASL_USERNAME /
    JODIE_SASL_PASSWORD or JODIE_SSL_CA_LOCATION; retrying the same ones cannot succeed."""


class InputGapError(StreamRuntimeError):
    """Input this group never processed is gone (retention deleted it, or the group's committed
    offsets expired while its tables kept state), so its state cannot be made exact by
    resuming; rebuild it from the source of truth (for JODIE: a version replayed from
    interactions.log, see the README), or raise the input topics' retention."""


class RowTooLargeError(StreamRuntimeError):
    """A table row encodes to more bytes than its changelog takes, so no transaction that
    writes it can commit, and reading its batch again would fail the same way for ever: the
    instance stops instead, naming the row. A JODIE row grows with the events waiting in it
    for another worker's pre-states; its partitions move to the other workers once this one
    has left, where those events can apply. Look for a worker far behind the others, or raise
    the changelogs' ``max_message_bytes`` in deploy/topics.toml and run `jodie topics apply`."""

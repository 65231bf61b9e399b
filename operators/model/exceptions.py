"""Errors of the model package: checkpoints."""

from jodie_errors import JodieError


class CheckpointError(JodieError):
    """A checkpoint is missing, incomplete or fails its sha256 check; retrain or re-copy it."""

    reason = "bad_checkpoint"

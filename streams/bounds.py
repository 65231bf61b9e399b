"""What an event must keep to enter the pipeline: the settings' bounds and the served
model's feature count (the router enforces them; operators.protocol.sequencer checks)."""

from __future__ import annotations

from typing import Any

from operators.model.checkpoint import read_meta
from operators.model.exceptions import CheckpointError
from operators.protocol.sequencer import Limits
from streams.models import verified
from streams.settings import Settings


def limits_of(settings: Settings) -> Limits:
    """The sequencer's bounds on an event, from the settings."""
    return Limits(
        max_id_length=settings.max_id_length,
        max_abs_timestamp=settings.max_abs_timestamp,
        max_clock_skew_s=settings.max_clock_skew_s,
        max_feature_abs=settings.max_feature_abs,
        max_features=settings.max_features,
    )


def model_features(announcement: dict[str, Any], settings: Settings) -> int:
    """The feature count of an announced version, from its checkpoint's config.

    The announcement is verified first, as workers do: a length read from a tampered config
    would reject the events the served weights expect.
    """
    meta = read_meta(verified(announcement, settings))
    try:
        return int(meta["model_config"]["n_features"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(
            f"{announcement['uri']}: no n_features in its model config ({err})"
        ) from None

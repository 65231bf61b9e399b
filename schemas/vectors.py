"""Reading the embedding vectors of a decoded recommendation, whatever its schema version."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np


def recommendation_vectors(record: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """(projected user, predicted item) of a decoded recommendation, whichever way its
    writer stored them (packed float32 since schema v3, float arrays before)."""
    if record.get("projected_user_f32") or record.get("predicted_item_f32"):
        return (
            np.frombuffer(record["projected_user_f32"], dtype="<f4").copy(),
            np.frombuffer(record["predicted_item_f32"], dtype="<f4").copy(),
        )
    return (
        np.asarray(record.get("projected_user", ()), dtype=np.float32),
        np.asarray(record.get("predicted_item", ()), dtype=np.float32),
    )

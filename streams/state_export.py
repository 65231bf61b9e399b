"""Current user and item embeddings, read from the tables' changelog topics (not local files)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from operators.checkpoint import load_checkpoint
from operators.streaming import CheckpointStates
from schemas import Codec
from schemas.codec import ENTITY_RECORD
from streams.peek import read_all
from streams.records import embedding_array
from streams.settings import Settings
from streams.topics import changelog_topic


def _latest(settings: Settings, table: str) -> dict[str, bytes | None]:
    """Last value per key of a compacted changelog (a tombstone deletes the row)."""
    rows: dict[str, bytes | None] = {}
    for key, value, _p, _o in read_all(settings, changelog_topic(settings, table)):
        if key is not None:
            rows[key.decode()] = value
    return rows


def collect(settings: Settings, checkpoint_dir: Path) -> dict[str, np.ndarray]:
    """Arrays in the layout of `jodie evaluate --export-states`: ids and embeddings per side.

    An entity the stream has not touched keeps its checkpoint state, exactly as a worker
    would serve it; entities with no state at all (never seen) are left out.
    """
    baseline = CheckpointStates(load_checkpoint(checkpoint_dir))
    codec = Codec(ENTITY_RECORD)
    out: dict[str, np.ndarray] = {}
    for side, table, known in (
        ("user", "user-state", baseline.users.ids),
        ("item", "item-state", baseline.items.ids),
    ):
        start = baseline.user if side == "user" else baseline.item
        states: dict[str, np.ndarray] = {}
        for entity in known:
            emb = start(entity).embedding
            if emb is not None:
                states[entity] = emb
        for entity, value in _latest(settings, table).items():
            emb = embedding_array(codec.decode(value)["embedding"]) if value is not None else None
            if emb is not None:
                states[entity] = emb
        ids = sorted(states)
        out[f"{side}_ids"] = np.asarray(ids, dtype=str)
        out[f"{side}_embeddings"] = (
            np.stack([states[i] for i in ids]).astype(np.float32)
            if ids
            else np.zeros((0, 0), dtype=np.float32)
        )
    return out


def export_states(settings: Settings, checkpoint_dir: Path, out: Path) -> dict[str, int]:
    arrays = collect(settings, checkpoint_dir)
    np.savez(out, **arrays)  # type: ignore[arg-type]
    return {"users": len(arrays["user_ids"]), "items": len(arrays["item_ids"])}

"""Current user and item embeddings, read from the tables' changelog topics (not local files)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from operators.model.checkpoint import load_checkpoint
from operators.protocol.sides import CheckpointStates
from schemas import Codec
from schemas.codec import ENTITY_RECORD
from streams.app.epochs import UNSTAMPED, Epoch, label, split_row_key
from streams.exceptions import RegistryError
from streams.peek import read_all
from streams.records import embedding_array
from streams.settings import Settings
from streams.switch import epoch_checkpoint, latest_epoch
from streams.topics import changelog_topic


def _latest(settings: Settings, table: str) -> dict[bytes, bytes | None]:
    """Last value per row key of a compacted changelog (a tombstone deletes the row)."""
    rows: dict[bytes, bytes | None] = {}
    for key, value, _p, _o in read_all(settings, changelog_topic(settings, table)):
        if key is not None:
            rows[key] = value
    return rows


def collect(settings: Settings, checkpoint_dir: Path) -> dict[str, np.ndarray]:
    """Arrays in the layout of `jodie evaluate --export-states`: ids and embeddings per side,
    for workers serving ``checkpoint_dir`` on the unstamped stream.

    An entity the stream has not touched keeps its checkpoint state, exactly as a worker
    would serve it; entities with no state at all (never seen) are left out.
    """
    return _collect(settings, CheckpointStates(load_checkpoint(checkpoint_dir)), UNSTAMPED)


def collect_epoch(
    settings: Settings, model: str, epoch: Epoch | None = None
) -> tuple[Epoch, dict[str, np.ndarray]]:
    """The states of a stamped epoch (default: the log's latest) of registry model ``model``:
    its rows, and for untouched entities its states at the epoch's start (the version's
    checkpoint caught up over the log, as its workers start from)."""
    epoch = epoch or latest_epoch(settings)
    if epoch == UNSTAMPED:
        raise RegistryError(
            "the log holds no event stamped with a model version; for workers serving a "
            "checkpoint, give --checkpoint"
        )
    baseline = CheckpointStates(epoch_checkpoint(settings, model, epoch))
    return epoch, _collect(settings, baseline, epoch)


def _collect(settings: Settings, baseline: CheckpointStates, epoch: Epoch) -> dict[str, np.ndarray]:
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
        for key, value in _latest(settings, table).items():
            entity_key, row_epoch = split_row_key(key)
            if row_epoch != epoch:
                continue  # another epoch's row: other weights
            emb = embedding_array(codec.decode(value)["embedding"]) if value is not None else None
            if emb is not None:
                states[entity_key.decode()] = emb
        ids = sorted(states)
        out[f"{side}_ids"] = np.asarray(ids, dtype=str)
        out[f"{side}_embeddings"] = (
            np.stack([states[i] for i in ids]).astype(np.float32)
            if ids
            else np.zeros((0, 0), dtype=np.float32)
        )
    return out


def export_states(
    settings: Settings, checkpoint_dir: Path | None, out: Path, model: str | None = None
) -> dict[str, Any]:
    """Write the states to ``out`` (.npz): of the checkpoint's workers, or of ``model``'s
    latest epoch."""
    epoch = None
    if model is not None:
        epoch, arrays = collect_epoch(settings, model)
    else:
        assert checkpoint_dir is not None
        arrays = collect(settings, checkpoint_dir)
    np.savez(out, **arrays)  # type: ignore[arg-type]
    counts: dict[str, Any] = {"users": len(arrays["user_ids"]), "items": len(arrays["item_ids"])}
    if epoch is not None:
        counts["epoch"] = label(epoch)
    return counts

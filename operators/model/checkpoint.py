"""Checkpoint directory: weights, dynamic states at a log offset, config and metrics, sha256-sealed.

Layout::

    model.safetensors    network weights (+ fitted scorer parameters, ``scorer.*``)
    states.safetensors   user/item dynamic embeddings, last event times, user histories,
                         and (checkpoints trained from interactions.log) each row's last seq
    user_ids.json        row → user id (safetensors holds tensors only)
    item_ids.json        row → item id
    checkpoint.json      model and train config, data fingerprint, split, metrics,
                         log offsets, and the sha256 of every file above

Nothing is unpickled: tensors come from safetensors, the rest from JSON. Loading checks every
sha256 first and raises CheckpointError on any mismatch or missing file. The manifest cannot
vouch for checkpoint.json itself: ``directory_digest`` covers every file, and is what a
registry announces and checks.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from operators.model.config import ModelConfig, TrainConfig
from operators.model.exceptions import CheckpointError
from operators.model.jodie import Jodie
from operators.model.state import EntityStore, States

FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"
STATES_FILE = "states.safetensors"
USER_IDS_FILE = "user_ids.json"
ITEM_IDS_FILE = "item_ids.json"
META_FILE = "checkpoint.json"
_SEALED = (MODEL_FILE, STATES_FILE, USER_IDS_FILE, ITEM_IDS_FILE)
# Keys of the last-seq tensors in STATES_FILE; absent from checkpoints trained from a CSV.
_LAST_SEQ = ("user.last_seq", "item.last_seq")


@dataclass(frozen=True)
class EntitySeqs:
    """For every user and item row of a checkpoint's states, the seq (position in
    interactions.log) of that entity's last event the states include, -1 for none."""

    users: np.ndarray  # (n_users,) int64, aligned with States.users rows
    items: np.ndarray  # (n_items,) int64, aligned with States.items rows


@dataclass
class Checkpoint:
    """A loaded checkpoint: the model, its states, and everything recorded with them."""

    model: Jodie
    states: States
    train_config: TrainConfig
    scorer_tensors: dict[str, Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    # Set for checkpoints trained from interactions.log: the states are at
    # meta["log_offsets"]["seq"], and this says which event each row last saw.
    last_seq: EntitySeqs | None = None

    @property
    def config(self) -> ModelConfig:
        return self.model.config


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def directory_digest(path: str | Path) -> str:
    """sha256 over the canonical listing of every file of a checkpoint directory.

    The listing is the JSON array ``[[name, sha256 of the file], ...]`` sorted by name, with no
    spaces. It covers checkpoint.json (config, Δ statistics, metrics, log offsets) as much as
    the tensors, and is computed from the files alone, trusting no digest written inside.
    Anything but a regular file (a folder, a symlink) is refused: what is loaded later must be
    what was hashed here.
    """
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"{root}: not a directory; give a checkpoint directory")
    with os.scandir(root) as found:
        entries = sorted(found, key=lambda e: e.name)
    listing = []
    for entry in entries:
        if not entry.is_file(follow_symlinks=False):
            raise CheckpointError(
                f"{root}: {entry.name!r} is not a regular file; a checkpoint directory holds "
                "only its own files (remove it, or re-save the checkpoint)"
            )
        listing.append([entry.name, sha256_file(Path(entry.path))])
    canonical = json.dumps(listing, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def save_checkpoint(
    out_dir: str | Path,
    model: Jodie,
    states: States,
    train_config: TrainConfig,
    scorer_tensors: dict[str, Tensor] | None = None,
    meta: dict[str, Any] | None = None,
    last_seq: EntitySeqs | None = None,
) -> Path:
    """Write a checkpoint directory (created if needed); returns its path.

    ``meta`` carries e.g. ``data_fingerprint``, ``split``, ``metrics``, ``log_offsets``,
    ``timespan``; the config and sha256 entries are added here. ``last_seq`` goes into the
    states file, so the sha256 manifest covers it.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    weights.update({k: v.detach().contiguous() for k, v in (scorer_tensors or {}).items()})
    save_file(weights, str(out / MODEL_FILE), metadata={"format": str(FORMAT_VERSION)})
    tensors = {**states.users.tensors("user"), **states.items.tensors("item")}
    if last_seq is not None:
        for key, seqs, store in zip(
            _LAST_SEQ, (last_seq.users, last_seq.items), (states.users, states.items), strict=True
        ):
            if seqs.shape != (len(store),):
                raise CheckpointError(
                    f"{key}: {seqs.shape[0]} entries for {len(store)} {store.kind} rows"
                )
            tensors[key] = torch.from_numpy(np.ascontiguousarray(seqs, dtype=np.int64))
    save_file(
        {k: v.contiguous() for k, v in tensors.items()},
        str(out / STATES_FILE),
        metadata={"format": str(FORMAT_VERSION)},
    )
    (out / USER_IDS_FILE).write_text(json.dumps(states.users.ids))
    (out / ITEM_IDS_FILE).write_text(json.dumps(states.items.ids))
    record = {
        "format": FORMAT_VERSION,
        "model_config": model.config.to_dict(),
        "train_config": train_config.to_dict(),
        **(meta or {}),
        "sha256": {name: sha256_file(out / name) for name in _SEALED},
    }
    tmp = out / (META_FILE + ".tmp")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True))
    os.replace(tmp, out / META_FILE)  # the manifest appears last, whole, or not at all
    return out


def read_meta(path: str | Path) -> dict[str, Any]:
    """The checkpoint.json of a checkpoint directory (no integrity check)."""
    meta_path = Path(path) / META_FILE
    if not meta_path.is_file():
        raise CheckpointError(f"{path}: no {META_FILE}; not a checkpoint directory")
    try:
        data: dict[str, Any] = json.loads(meta_path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{meta_path}: not valid JSON ({err})") from None
    return data


def verify(path: str | Path) -> dict[str, Any]:
    """Check every sealed file against its recorded sha256; returns the metadata."""
    root = Path(path)
    meta = read_meta(root)
    sums = meta.get("sha256")
    if not isinstance(sums, dict) or set(sums) != set(_SEALED):
        raise CheckpointError(f"{root}: {META_FILE} lacks the sha256 of {', '.join(_SEALED)}")
    for name in _SEALED:
        file = root / name
        if not file.is_file():
            raise CheckpointError(f"{root}: missing {name}")
        actual = sha256_file(file)
        if actual != sums[name]:
            raise CheckpointError(
                f"{file}: sha256 {actual} does not match {sums[name]} in {META_FILE}"
            )
    return meta


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Load and verify a checkpoint directory."""
    root = Path(path)
    meta = verify(root)
    config = ModelConfig.from_dict(meta["model_config"])
    weights = load_file(str(root / MODEL_FILE))
    scorer_tensors = {k: v for k, v in weights.items() if k.startswith("scorer.")}
    model = Jodie(config)
    try:
        model.load_state_dict({k: v for k, v in weights.items() if not k.startswith("scorer.")})
    except RuntimeError as err:
        raise CheckpointError(f"{root}: weights do not fit the stored config ({err})") from None
    model.eval()
    tensors = load_file(str(root / STATES_FILE))
    user_ids = json.loads((root / USER_IDS_FILE).read_text())
    item_ids = json.loads((root / ITEM_IDS_FILE).read_text())
    try:
        states = States(
            EntityStore.from_tensors("user", user_ids, tensors, "user", config.user_static_dim),
            EntityStore.from_tensors("item", item_ids, tensors, "item", config.item_static_dim),
        )
    except (KeyError, ValueError) as err:
        raise CheckpointError(f"{root}: states are incomplete ({err})") from None
    last_seq = _last_seq(root, tensors, states)
    train_config = TrainConfig.from_dict(meta.get("train_config", {}))
    meta = {k: v for k, v in meta.items() if k not in ("model_config", "train_config")}
    return Checkpoint(model, states, train_config, scorer_tensors, meta, last_seq)


def _last_seq(root: Path, tensors: dict[str, Tensor], states: States) -> EntitySeqs | None:
    present = [key in tensors for key in _LAST_SEQ]
    if not any(present):
        return None  # trained from a CSV, or written before last seqs existed
    if not all(present):
        raise CheckpointError(f"{root}: states hold only one of {', '.join(_LAST_SEQ)}")
    users, items = (tensors[key].numpy().astype(np.int64, copy=False) for key in _LAST_SEQ)
    if users.shape != (len(states.users),) or items.shape != (len(states.items),):
        raise CheckpointError(f"{root}: last seqs do not match the states' rows")
    return EntitySeqs(users, items)

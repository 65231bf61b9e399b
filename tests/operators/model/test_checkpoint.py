"""Checkpoint round trip is bit-exact; tampering and missing files are detected."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from operators.model.checkpoint import (
    EntitySeqs,
    directory_digest,
    load_checkpoint,
    save_checkpoint,
    sha256_file,
    verify,
)
from operators.model.config import TrainConfig
from operators.model.events import encode
from operators.model.exceptions import CheckpointError
from operators.model.jodie import Jodie
from operators.model.kernel import batched, replay
from operators.model.state import States
from tests.operators.conftest import build_log

# Seqs of the _saved log's events; users a, b, c and items x, y last appear at these.
_SEQS = EntitySeqs(np.array([12, 11, 2**40], np.int64), np.array([2**40, 12], np.int64))


def _saved(tmp_path: Path, model: Jodie, last_seq: EntitySeqs | None = None) -> tuple[Path, States]:
    log = build_log(["a", "b", "a", "c"], ["x", "y", "y", "x"], [0.0, 1.5, 2.25, 7.0])
    states = States.empty(8, 8, 8, 4)
    replay(model, states, batched(encode(log, states), model.config, 2.0))
    scorer = {"scorer.log_alpha": torch.tensor(0.25), "scorer.bonus": torch.arange(4.0)}
    path = save_checkpoint(
        tmp_path / "ckpt",
        model,
        states,
        TrainConfig(epochs=3, model=model.config),
        scorer,
        {"split": {"train": [0, 4]}, "log_offsets": {"events": 4}, "metrics": {"mrr": 0.5}},
        last_seq,
    )
    return path, states


def _flip_in_tensor(path: Path, key: str) -> None:
    """Flip one bit of ``key``'s data in a safetensors file (8-byte header size, JSON header,
    then the data at the header's offsets)."""
    data = bytearray(path.read_bytes())
    (size,) = struct.unpack("<Q", data[:8])
    start, _stop = json.loads(data[8 : 8 + size])[key]["data_offsets"]
    data[8 + size + start] ^= 0x01
    path.write_bytes(bytes(data))


def test_round_trip_is_bit_exact(tmp_path: Path, tiny_model: Jodie) -> None:
    path, states = _saved(tmp_path, tiny_model)
    ck = load_checkpoint(path)
    assert ck.config == tiny_model.config
    assert ck.train_config.epochs == 3 and ck.meta["log_offsets"] == {"events": 4}
    for k, v in tiny_model.state_dict().items():
        assert torch.equal(ck.model.state_dict()[k], v), k
    assert torch.equal(ck.scorer_tensors["scorer.bonus"], torch.arange(4.0))
    for a, b in ((ck.states.users, states.users), (ck.states.items, states.items)):
        assert a.ids == b.ids
        assert torch.equal(a.emb, b.emb) and torch.equal(a.static, b.static)
        np.testing.assert_array_equal(a.last_time, b.last_time)
        np.testing.assert_array_equal(a.history, b.history)
        np.testing.assert_array_equal(a.history_counts, b.history_counts)
        np.testing.assert_array_equal(a.count, b.count)
    assert set(p.name for p in path.iterdir()) >= {
        "model.safetensors",
        "states.safetensors",
        "checkpoint.json",
        "user_ids.json",
        "item_ids.json",
    }


@pytest.mark.parametrize("name", ["model.safetensors", "states.safetensors", "item_ids.json"])
def test_tampering_is_detected(tmp_path: Path, tiny_model: Jodie, name: str) -> None:
    path, _ = _saved(tmp_path, tiny_model)
    data = bytearray((path / name).read_bytes())
    data[-2] ^= 0x01
    (path / name).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(path)


def test_the_directory_digest_is_of_every_file_listed(tmp_path: Path, tiny_model: Jodie) -> None:
    import hashlib
    import shutil

    path, _ = _saved(tmp_path, tiny_model)
    names = sorted(p.name for p in path.iterdir())
    listing = json.dumps([[n, sha256_file(path / n)] for n in names], separators=(",", ":"))
    digest = directory_digest(path)
    assert digest == hashlib.sha256(listing.encode()).hexdigest()
    assert directory_digest(shutil.copytree(path, tmp_path / "copy")) == digest

    # checkpoint.json edited (the Δ statistics here): its own manifest still checks out,
    # the directory digest does not.
    meta = json.loads((path / "checkpoint.json").read_text())
    meta["model_config"]["delta_user_mean"] = 1.0
    (path / "checkpoint.json").write_text(json.dumps(meta))
    verify(path)
    assert directory_digest(path) != digest
    (tmp_path / "copy" / "notes.txt").write_text("an extra file is covered too")
    assert directory_digest(tmp_path / "copy") != digest


def test_the_directory_digest_refuses_what_is_not_a_file(tmp_path: Path, tiny_model: Jodie) -> None:
    path, _ = _saved(tmp_path, tiny_model)
    (path / "extra").symlink_to(tmp_path)
    with pytest.raises(CheckpointError, match="not a regular file"):
        directory_digest(path)
    (path / "extra").unlink()
    (path / "extra").mkdir()
    with pytest.raises(CheckpointError, match="not a regular file"):
        directory_digest(path)
    with pytest.raises(CheckpointError, match="not a directory"):
        directory_digest(tmp_path / "nowhere")


def test_missing_file_and_missing_manifest(tmp_path: Path, tiny_model: Jodie) -> None:
    path, _ = _saved(tmp_path, tiny_model)
    (path / "states.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        verify(path)
    (path / "checkpoint.json").unlink()
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


def test_manifest_without_hashes_is_rejected(tmp_path: Path, tiny_model: Jodie) -> None:
    path, _ = _saved(tmp_path, tiny_model)
    meta = json.loads((path / "checkpoint.json").read_text())
    del meta["sha256"]["model.safetensors"]
    (path / "checkpoint.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


def test_last_seq_round_trip_is_bit_exact(tmp_path: Path, tiny_model: Jodie) -> None:
    path, states = _saved(tmp_path, tiny_model, _SEQS)
    ck = load_checkpoint(path)
    assert ck.last_seq is not None
    assert ck.last_seq.users.dtype == np.int64 and ck.last_seq.items.dtype == np.int64
    np.testing.assert_array_equal(ck.last_seq.users, _SEQS.users)
    np.testing.assert_array_equal(ck.last_seq.items, _SEQS.items)
    assert len(ck.last_seq.users) == len(states.users) == len(ck.states.users)
    assert torch.equal(ck.states.users.emb, states.users.emb)


def test_checkpoint_without_last_seq_loads_with_none(tmp_path: Path, tiny_model: Jodie) -> None:
    path, _ = _saved(tmp_path, tiny_model)
    assert load_checkpoint(path).last_seq is None


def test_tampered_last_seq_is_detected(tmp_path: Path, tiny_model: Jodie) -> None:
    path, _ = _saved(tmp_path, tiny_model, _SEQS)
    _flip_in_tensor(path / "states.safetensors", "item.last_seq")
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(path)


def test_last_seq_must_match_the_rows(tmp_path: Path, tiny_model: Jodie) -> None:
    short = EntitySeqs(_SEQS.users[:2], _SEQS.items)
    with pytest.raises(CheckpointError, match="user rows"):
        _saved(tmp_path, tiny_model, short)

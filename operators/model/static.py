"""Open-world static embeddings: fixed pseudo-random vectors derived from a hash of the id.

The reference JODIE uses one-hot static embeddings, whose size is the number of users or items.
Here ``static(id)`` is the column for ``id`` of a fixed random projection of that one-hot
(Achlioptas, 2003): a vector of signs ±1/√s drawn from SHAKE-256 of a namespaced id. Signs need
no floating-point library call, so every machine derives bit-identical vectors; distinct ids
get nearly orthogonal vectors (inner products of order 1/√s), which is what the one-hot gave.
Nothing is learned and nothing depends on how many ids exist, so an unseen id works at once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from functools import lru_cache
from typing import Literal

import numpy as np
import torch

Kind = Literal["user", "item"]

_NAMESPACE: dict[str, bytes] = {"user": b"jodie/static/user\x00", "item": b"jodie/static/item\x00"}


def static_embeddings(kind: Kind, ids: Sequence[str], dim: int) -> np.ndarray:
    """Static vectors for ``ids``; returns (len(ids), dim) float32, each row of unit L2 norm."""
    if dim <= 0:
        return np.zeros((len(ids), 0), dtype=np.float32)
    prefix = _NAMESPACE[kind]
    n_bytes = (dim + 7) // 8
    raw = b"".join(hashlib.shake_256(prefix + i.encode("utf-8")).digest(n_bytes) for i in ids)
    bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8).reshape(len(ids), n_bytes), axis=1)
    signs = bits[:, :dim].astype(np.float32) * 2.0 - 1.0  # (n, dim) in {-1, +1}
    return signs * np.float32(1.0 / np.sqrt(dim))


@lru_cache(maxsize=1 << 17)
def static_tensor(kind: Kind, entity_id: str, dim: int) -> torch.Tensor:
    """One id's static vector as a (1, dim) tensor, cached: the stream's sides and its live
    evaluation ask for the same ids again and again (each is a hash)."""
    return torch.from_numpy(static_embeddings(kind, [entity_id], dim))

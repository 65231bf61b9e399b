"""Reference computations and test-only accessors shared by the retrieval tests."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from operators.retrieval.store import VectorStore
from operators.retrieval.tiered import TieredIndex


def brute_force(ids: list[str], x: np.ndarray, q: np.ndarray, k: int) -> list[list[str]]:
    """Reference: float64 squared L2 to every item, sorted by (distance, id)."""
    d = ((x[None, :, :].astype(np.float64) - q[:, None, :]) ** 2).sum(-1)  # (Q, N)
    return [
        [ids[i] for i in sorted(range(len(ids)), key=lambda i: (row[i], ids[i]))[:k]] for row in d
    ]


def clustered(n: int, dim: int, seed: int, n_clusters: int = 100) -> np.ndarray:
    """Overlapping Gaussian clusters with a decaying spectrum: neither trivial nor hopeless."""
    rng = np.random.default_rng(seed)
    centers = 0.05 * rng.standard_normal((n_clusters, dim))
    scale = np.arange(1, dim + 1) ** -0.75
    z = rng.standard_normal((n, dim)) * scale
    return (centers[rng.integers(0, n_clusters, n)] + z).astype(np.float32)


def vector(store: VectorStore, item_id: str) -> np.ndarray:
    """The stored vector (D,) of an item; KeyError once it is removed."""
    return store.data[store.rows[item_id]].copy()


def merge_and_rerank(
    query: np.ndarray, candidate_lists: Iterable[Iterable[str]], store: VectorStore, k: int
) -> tuple[list[str], np.ndarray]:
    """Union candidate lists (ids not in the store dropped) and keep the exact top-k."""
    merged = {i for cands in candidate_lists for i in cands if i in store.rows}
    rows = np.fromiter((store.rows[i] for i in merged), dtype=np.int64, count=len(merged))
    return store.exact_topk(store.check(query, 1)[0], rows, k)


def recall_at_10(ix: TieredIndex, q: np.ndarray) -> float:
    """Recall@10 of ``ix.search`` against the exact scan of the same vectors."""
    got = ix.search(q, k=10)[0]
    want = ix.search_exact(q, k=10)[0]
    return float(np.mean([len(set(g) & set(w)) / 10 for g, w in zip(got, want, strict=True)]))

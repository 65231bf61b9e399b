"""operators.retrieval.ivf: the IVF overlay's recall and freshness, through the index's IVF tier."""

from __future__ import annotations

import numpy as np
import pytest

from operators.retrieval.ivf import auto_nlist
from operators.retrieval.tiered import TieredIndex
from tests.operators.retrieval.helpers import clustered, recall_at_10, vector


def test_auto_nlist_is_a_power_of_two_near_two_root_n() -> None:
    assert auto_nlist(1_000_000) == 2048
    assert auto_nlist(1) == 16 and auto_nlist(10**12) == 65536


@pytest.fixture(scope="module")
def ivf_20k() -> tuple[TieredIndex, list[str], np.ndarray]:
    x = clustered(20_000, 32, seed=4)
    ids = [f"v{i}" for i in range(len(x))]
    ix = TieredIndex(dim=32, exact_below=0, kind="ivf", nprobe=24, seed=0)
    ix.upsert(ids, x)
    return ix, ids, x


def test_ivf_recall_at_10(ivf_20k: tuple[TieredIndex, list[str], np.ndarray]) -> None:
    ix, _, _ = ivf_20k
    assert ix.approximate
    q = clustered(200, 32, seed=5)
    assert recall_at_10(ix, q) >= 0.95
    # Re-ranked distances are the exact ones for the items returned.
    got, dist = ix.search(q[:3], k=10)
    for row, dr, qq in zip(got, dist, q[:3], strict=True):
        want = [float(((vector(ix._store, i).astype(np.float64) - qq) ** 2).sum()) for i in row]
        np.testing.assert_allclose(dr, want, rtol=1e-12)


def test_ivf_follows_moved_and_removed_vectors(
    ivf_20k: tuple[TieredIndex, list[str], np.ndarray],
) -> None:
    ix, _, _ = ivf_20k
    rng = np.random.default_rng(6)
    target = clustered(1, 32, seed=7)[0]
    movers = [f"v{i}" for i in rng.choice(20_000, 5, replace=False)]
    # Move five items right next to a query point: they must be its top 5, in distance order.
    ix.upsert(movers, target + 1e-3 * np.arange(1, 6)[:, None].astype(np.float32))
    got = ix.search(target[None, :], k=5)[0][0].tolist()
    assert got == movers
    ix.remove(movers[:2])
    got = ix.search(target[None, :], k=3)[0][0].tolist()
    assert got == movers[2:]


def test_sq8_codec_recall() -> None:
    x = clustered(5000, 16, seed=9)
    ids = [f"s{i}" for i in range(len(x))]
    ix = TieredIndex(dim=16, exact_below=0, kind="ivf", codec="sq8", nprobe=16)
    ix.upsert(ids, x)
    assert recall_at_10(ix, clustered(100, 16, seed=10)) >= 0.95

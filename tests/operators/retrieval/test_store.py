"""operators.retrieval.store: row bookkeeping, the exact scan and the exact re-rank."""

from __future__ import annotations

import numpy as np
import pytest

from operators.retrieval.exceptions import RetrievalError
from operators.retrieval.store import FEW_QUERIES, VectorStore, row_dots
from tests.operators.retrieval.helpers import brute_force, merge_and_rerank, vector


def test_exact_matches_brute_force_with_ties_by_id() -> None:
    rng = np.random.default_rng(1)
    # Integer grid coordinates make many exact distance ties; order must follow the id.
    x = rng.integers(-3, 4, size=(400, 6)).astype(np.float32)
    ids = [f"item{i:03d}" for i in rng.permutation(400)]
    store = VectorStore(dim=6)
    store.upsert(ids, x)
    q = rng.integers(-3, 4, size=(25, 6)).astype(np.float32)
    got, dist = store.scan(q, k=15)
    assert got.tolist() == brute_force(ids, x, q, 15)
    want_d = np.sort(((x[None] - q[:, None]) ** 2).sum(-1), axis=1)[:, :15]
    np.testing.assert_array_equal(dist, want_d)


def test_upsert_moves_removes_and_grows() -> None:
    rng = np.random.default_rng(2)
    store = VectorStore(dim=4)
    vecs: dict[str, np.ndarray] = {}
    for step in range(30):  # 3,000 inserts: several capacity doublings, with moves and removals
        new = [f"n{step}-{i}" for i in range(100)]
        v = rng.standard_normal((100, 4)).astype(np.float32)
        store.upsert(new, v)
        vecs.update(zip(new, v, strict=True))
        moved = rng.choice(sorted(vecs), 20, replace=False).tolist()
        mv = rng.standard_normal((20, 4)).astype(np.float32)
        store.upsert(moved, mv)
        vecs.update(zip(moved, mv, strict=True))
        gone = rng.choice(sorted(vecs), 10, replace=False).tolist()
        assert store.remove([*gone, "never-seen"]).size == 10
        store.compact()
        for g in gone:
            del vecs[g]
    assert len(store.rows) == len(vecs) == 3000 - 300
    ids = sorted(vecs)
    x = np.stack([vecs[i] for i in ids])
    for i in ids[:50]:
        np.testing.assert_array_equal(vector(store, i), vecs[i])
    q = rng.standard_normal((10, 4)).astype(np.float32)
    assert store.scan(q, k=7)[0].tolist() == brute_force(ids, x, q, 7)
    with pytest.raises(KeyError):
        vector(store, gone[0])


def test_repeated_id_in_one_batch_keeps_last_vector() -> None:
    store = VectorStore(dim=2)
    store.upsert(["a", "a"], np.array([[1, 1], [2, 2]], dtype=np.float32))
    assert len(store.rows) == 1
    np.testing.assert_array_equal(vector(store, "a"), [2, 2])


def test_removing_most_items_compacts_and_stays_exact() -> None:
    rng = np.random.default_rng(3)
    ids = [f"i{i}" for i in range(5000)]
    x = rng.standard_normal((5000, 3)).astype(np.float32)
    store = VectorStore(dim=3)
    store.upsert(ids, x)
    store.remove(ids[:4000])
    assert store.compact()
    assert store.high == 1000  # holes were closed
    q = rng.standard_normal((5, 3)).astype(np.float32)
    assert store.scan(q, k=5)[0].tolist() == brute_force(ids[4000:], x[4000:], q, 5)


def test_k_larger_than_catalogue_and_bad_input() -> None:
    store = VectorStore(dim=2)
    zero = np.zeros((1, 2), dtype=np.float32)
    assert store.scan(zero, k=3)[0].shape == (1, 0)
    store.upsert(["a", "b"], np.array([[0, 0], [1, 1]], dtype=np.float32))
    assert store.scan(zero, k=3)[0].tolist() == [["a", "b"]]
    with pytest.raises(RetrievalError):
        store.upsert(["c"], np.array([[np.nan, 0]]))
    with pytest.raises(RetrievalError):
        store.upsert(["c"], np.zeros((1, 3)))
    assert "c" not in store.rows


def test_sqdist_is_the_squared_distance_one_query_or_many() -> None:
    rng = np.random.default_rng(4)
    store = VectorStore(dim=8)
    store.upsert([f"i{n}" for n in range(50)], rng.standard_normal((50, 8)))
    store.remove(["i3"])  # a hole: never closer than anything
    q = rng.standard_normal((5, 8)).astype(np.float32)
    want = ((store.data[:50].astype(np.float64)[None] - q[:, None]) ** 2).sum(-1)  # (5, 50)
    want[:, 3] = np.inf
    many = store.sqdist(q)
    one = np.concatenate([store.sqdist(q[b : b + 1]) for b in range(5)])
    np.testing.assert_allclose(many, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(one, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("rows", "dim"), [(1000, 256), (1001, 128), (3000, 257)])
def test_row_dots_are_the_product_bit_for_bit_whatever_the_batch(rows: int, dim: int) -> None:
    # A row's distances must not depend on how many queries came with it, on either side of
    # FEW_QUERIES: the stream batches queries otherwise than the offline replay.
    rng = np.random.default_rng(rows)
    x = rng.standard_normal((rows, dim)).astype(np.float32)
    wide = rng.standard_normal((2 * FEW_QUERIES + 3, dim + 5)).astype(np.float32)
    q = wide[:, 3 : 3 + dim]  # a strided view, as the live evaluation slices its predictions
    whole = q @ x.T
    for size in (2, 3, 5, 17, FEW_QUERIES, FEW_QUERIES + 1, q.shape[0]):
        got = row_dots(q[:size], x)
        assert got.flags.c_contiguous
        np.testing.assert_array_equal(got, q[:size] @ x.T)
    pieces = [row_dots(q[a:b], x) for a, b in ((0, 2), (2, 7), (7, 71), (71, q.shape[0]))]
    np.testing.assert_array_equal(np.concatenate(pieces), whole)
    store = VectorStore(dim=dim)
    store.upsert([f"i{n}" for n in range(rows)], x)
    many = store.sqdist(q)
    np.testing.assert_array_equal(np.concatenate([store.sqdist(q[:9]), store.sqdist(q[9:])]), many)


def test_merge_and_rerank_is_exact_and_dedups() -> None:
    rng = np.random.default_rng(11)
    ids = [f"m{i}" for i in range(300)]
    x = rng.standard_normal((300, 5)).astype(np.float32)
    store = VectorStore(dim=5)
    store.upsert(ids, x)
    q = rng.standard_normal(5).astype(np.float32)
    a, b = ids[:120], [*ids[100:200], "unknown"]
    got, dist = merge_and_rerank(q, [a, b], store, k=10)
    assert got == brute_force(ids[:200], x[:200], q[None, :], 10)[0]
    assert np.all(np.diff(dist) >= 0) and len(set(got)) == 10

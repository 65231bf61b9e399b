"""operators.retrieval.index: exact and IVF indexes, tiering, MinHash candidates, re-rank."""

from __future__ import annotations

import numpy as np
import pytest

from operators.exceptions import RetrievalError, UnknownItemError
from operators.retrieval.index import (
    CooccurrenceCandidates,
    ExactIndex,
    TieredIndex,
    make_index,
    merge_and_rerank,
)


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


def test_exact_matches_brute_force_with_ties_by_id() -> None:
    rng = np.random.default_rng(1)
    # Integer grid coordinates make many exact distance ties; order must follow the id.
    x = rng.integers(-3, 4, size=(400, 6)).astype(np.float32)
    ids = [f"item{i:03d}" for i in rng.permutation(400)]
    ix = ExactIndex(dim=6)
    ix.upsert(ids, x)
    q = rng.integers(-3, 4, size=(25, 6)).astype(np.float32)
    got, dist = ix.search(q, k=15)
    assert got.tolist() == brute_force(ids, x, q, 15)
    want_d = np.sort(((x[None] - q[:, None]) ** 2).sum(-1), axis=1)[:, :15]
    np.testing.assert_array_equal(dist, want_d)


def test_upsert_moves_removes_and_grows() -> None:
    rng = np.random.default_rng(2)
    ix = ExactIndex(dim=4)
    vecs: dict[str, np.ndarray] = {}
    for step in range(30):  # 3,000 inserts: several capacity doublings, with moves and removals
        new = [f"n{step}-{i}" for i in range(100)]
        v = rng.standard_normal((100, 4)).astype(np.float32)
        ix.upsert(new, v)
        vecs.update(zip(new, v, strict=True))
        moved = rng.choice(sorted(vecs), 20, replace=False).tolist()
        mv = rng.standard_normal((20, 4)).astype(np.float32)
        ix.upsert(moved, mv)
        vecs.update(zip(moved, mv, strict=True))
        gone = rng.choice(sorted(vecs), 10, replace=False).tolist()
        assert ix.remove([*gone, "never-seen"]) == 10
        for g in gone:
            del vecs[g]
    assert len(ix) == len(vecs) == 3000 - 300
    ids = sorted(vecs)
    x = np.stack([vecs[i] for i in ids])
    for i in ids[:50]:
        np.testing.assert_array_equal(ix.vector(i), vecs[i])
    q = rng.standard_normal((10, 4)).astype(np.float32)
    assert ix.search(q, k=7)[0].tolist() == brute_force(ids, x, q, 7)
    with pytest.raises(UnknownItemError):
        ix.vector(gone[0])


def test_repeated_id_in_one_batch_keeps_last_vector() -> None:
    ix = ExactIndex(dim=2)
    ix.upsert(["a", "a"], np.array([[1, 1], [2, 2]], dtype=np.float32))
    assert len(ix) == 1
    np.testing.assert_array_equal(ix.vector("a"), [2, 2])


def test_removing_most_items_compacts_and_stays_exact() -> None:
    rng = np.random.default_rng(3)
    ids = [f"i{i}" for i in range(5000)]
    x = rng.standard_normal((5000, 3)).astype(np.float32)
    ix = ExactIndex(dim=3)
    ix.upsert(ids, x)
    ix.remove(ids[:4000])
    assert ix._store.high == 1000  # holes were closed
    q = rng.standard_normal((5, 3)).astype(np.float32)
    assert ix.search(q, k=5)[0].tolist() == brute_force(ids[4000:], x[4000:], q, 5)


def test_k_larger_than_catalogue_and_bad_input() -> None:
    ix = ExactIndex(dim=2)
    assert ix.search(np.zeros((1, 2)), k=3)[0].shape == (1, 0)
    ix.upsert(["a", "b"], np.array([[0, 0], [1, 1]], dtype=np.float32))
    assert ix.search(np.zeros((1, 2)), k=3)[0].tolist() == [["a", "b"]]
    with pytest.raises(RetrievalError):
        ix.upsert(["c"], np.array([[np.nan, 0]]))
    with pytest.raises(RetrievalError):
        ix.upsert(["c"], np.zeros((1, 3)))
    with pytest.raises(RetrievalError):
        ix.search(np.zeros((1, 2)), k=0)
    assert "c" not in ix


@pytest.fixture(scope="module")
def ivf_20k() -> tuple[TieredIndex, list[str], np.ndarray]:
    x = clustered(20_000, 32, seed=4)
    ids = [f"v{i}" for i in range(len(x))]
    ix = TieredIndex(dim=32, exact_below=0, nprobe=24, seed=0)
    ix.upsert(ids, x)
    return ix, ids, x


def recall_at_10(ix: TieredIndex, exact: ExactIndex, q: np.ndarray) -> float:
    got = ix.search(q, k=10)[0]
    want = exact.search(q, k=10)[0]
    return float(np.mean([len(set(g) & set(w)) / 10 for g, w in zip(got, want, strict=True)]))


def test_ivf_recall_at_10(ivf_20k: tuple[TieredIndex, list[str], np.ndarray]) -> None:
    ix, ids, x = ivf_20k
    assert ix.approximate
    exact = ExactIndex(dim=32)
    exact.upsert(ids, x)
    q = clustered(200, 32, seed=5)
    assert recall_at_10(ix, exact, q) >= 0.95
    # Re-ranked distances are the exact ones for the items returned.
    got, dist = ix.search(q[:3], k=10)
    for row, dr, qq in zip(got, dist, q[:3], strict=True):
        want = [float(((ix.vector(i).astype(np.float64) - qq) ** 2).sum()) for i in row]
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


def test_tiered_switches_both_ways() -> None:
    rng = np.random.default_rng(8)
    ix = TieredIndex(dim=8, exact_below=3000, rebuild_growth=2.0)
    ids = [f"t{i}" for i in range(8000)]
    x = rng.standard_normal((8000, 8)).astype(np.float32)
    ix.upsert(ids[:2999], x[:2999])
    assert not ix.approximate and ix.builds == 0
    ix.upsert(ids[2999:3000], x[2999:3000])
    assert ix.approximate and ix.builds == 1
    ix.upsert(ids[3000:5999], x[3000:5999])
    assert ix.builds == 1
    ix.upsert(ids[5999:], x[5999:])  # doubled since the build: re-sized
    assert ix.builds == 2
    ix.remove(ids[1400:])  # below exact_below // 2: back to exact
    assert not ix.approximate and len(ix) == 1400
    q = rng.standard_normal((4, 8)).astype(np.float32)
    assert ix.search(q, k=5)[0].tolist() == brute_force(ids[:1400], x[:1400], q, 5)
    assert isinstance(make_index(8, "exact"), ExactIndex)


def test_sq8_codec_recall() -> None:
    x = clustered(5000, 16, seed=9)
    ids = [f"s{i}" for i in range(len(x))]
    ix = TieredIndex(dim=16, exact_below=0, codec="sq8", nprobe=16)
    ix.upsert(ids, x)
    exact = ExactIndex(dim=16)
    exact.upsert(ids, x)
    assert recall_at_10(ix, exact, clustered(100, 16, seed=10)) >= 0.95


def test_merge_and_rerank_is_exact_and_dedups() -> None:
    rng = np.random.default_rng(11)
    ids = [f"m{i}" for i in range(300)]
    x = rng.standard_normal((300, 5)).astype(np.float32)
    ix = ExactIndex(dim=5)
    ix.upsert(ids, x)
    q = rng.standard_normal(5).astype(np.float32)
    a, b = ids[:120], [*ids[100:200], "unknown"]
    got, dist = merge_and_rerank(q, [a, b], ix, k=10)
    assert got == brute_force(ids[:200], x[:200], q[None, :], 10)[0]
    assert np.all(np.diff(dist) >= 0) and len(set(got)) == 10


def test_minhash_finds_planted_cooccurring_items() -> None:
    rng = np.random.default_rng(12)
    cc = CooccurrenceCandidates(audience_size=64, num_perm=64, threshold=0.3, rehash_every=4)
    fans = [f"fan{i}" for i in range(40)]
    planted = ["p0", "p1", "p2"]  # share one audience of 40 users
    for u in fans:
        for p in planted:
            if rng.random() < 0.9:
                cc.observe(u, p)
    for e in range(4000):  # background: 200 items with random audiences from 2,000 users
        cc.observe(f"user{rng.integers(2000)}", f"bg{e % 200}")
    cc.flush()
    got = cc.candidates(["p0"])
    assert set(planted) <= set(got)
    assert len([g for g in got if g.startswith("bg")]) <= 2
    cc.remove_item("p1")
    assert "p1" not in cc.candidates(["p0", "p1"])
    assert cc.candidates(["never-seen"]) == []


def test_minhash_rehash_is_bounded() -> None:
    cc = CooccurrenceCandidates(audience_size=8, rehash_every=5)
    calls = 0
    original = cc._rehash

    def counting(item_id: str) -> None:
        nonlocal calls
        calls += 1
        original(item_id)

    cc._rehash = counting  # type: ignore[method-assign]
    for u in range(100):
        cc.observe(f"u{u}", "x")
    assert calls == 1 + (100 - 1) // 5  # once when new, then every 5th audience change
    assert len(cc._audience["x"]) == 8


def test_ranks_count_the_items_closer_than_the_true_vector() -> None:
    rng = np.random.default_rng(11)
    ix = ExactIndex(16)
    ids = [f"i{n}" for n in range(300)]
    vectors = rng.standard_normal((300, 16)).astype(np.float32)
    ix.upsert(ids, vectors)
    queries = rng.standard_normal((20, 16)).astype(np.float32)
    true_ids = [f"i{n}" for n in rng.integers(0, 300, size=20)]
    # The caller's current vector of the true item replaces the index's (possibly stale) one.
    current = rng.standard_normal((20, 16)).astype(np.float32)
    got = ix.ranks(queries, true_ids, current)
    for b in range(20):
        d = ((vectors.astype(np.float64) - queries[b]) ** 2).sum(axis=1)
        d[int(true_ids[b][1:])] = np.inf
        true = float(((current[b].astype(np.float64) - queries[b]) ** 2).sum())
        assert got[b] == 1 + int((d < true).sum())
    # An id the index does not hold is ranked against every item.
    far = np.full((1, 16), 100.0, dtype=np.float32)
    assert ix.ranks(queries[:1], ["new"], far)[0] == 301


@pytest.mark.parametrize("exact_below", [20_000, 1024])
def test_recommend_is_the_exact_top_k_of_the_shortlist_and_the_extras(exact_below: int) -> None:
    rng = np.random.default_rng(12)
    n, dim, k = 3000, 16, 10
    ix = TieredIndex(dim, exact_below=exact_below, nprobe=64)
    ids = [f"i{j}" for j in range(n)]
    vectors = rng.standard_normal((n, dim)).astype(np.float32)
    ix.upsert(ids, vectors)
    assert ix.approximate == (exact_below < n)
    queries = rng.standard_normal((8, dim)).astype(np.float32)
    extra = [[f"i{j}" for j in rng.integers(0, n, size=5)] + ["unknown"] for _ in range(8)]
    got = ix.recommend(queries, k, extra)
    for b in range(8):
        d = ((vectors.astype(np.float64) - queries[b]) ** 2).sum(axis=1)
        best = [f"i{j}" for j in np.argsort(d, kind="stable")[:k]]
        got_ids, got_d = got[b]
        assert len(got_ids) == k and np.all(np.diff(got_d) >= 0)
        # The exact top-k over everything (what a full scan returns): recall 1.0 in the
        # exact tier, and with 64 of the IVF lists probed on 3,000 items.
        assert got_ids == best
        # Scores are float32 sums (documented): equal to the float64 distances to ~1e-6.
        np.testing.assert_allclose(got_d, d[[int(i[1:]) for i in best]], rtol=1e-5)
    # Extras compete on distance: a far item among them is not recommended...
    far = np.full((1, dim), 50.0, dtype=np.float32)
    ix.upsert(["far"], far)
    assert "far" not in ix.recommend(queries[:1], k, [["far"]])[0][0]
    # ...and the nearest of all comes first.
    ix.upsert(["close"], queries[:1])
    assert ix.recommend(queries[:1], k, [["close"]])[0][0][0] == "close"

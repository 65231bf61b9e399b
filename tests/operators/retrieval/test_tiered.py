"""operators.retrieval.tiered: switching tiers, the serving path (recommend) and live ranks."""

from __future__ import annotations

import sys
from collections.abc import Callable

import numpy as np
import pytest

from operators.retrieval.exceptions import RetrievalError
from operators.retrieval.tiered import TieredIndex, _lowest
from tests.operators.retrieval.helpers import brute_force


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
    # An unreachable threshold keeps an index exact at any size.
    always_exact = TieredIndex(8, exact_below=sys.maxsize)
    always_exact.upsert(ids, x)
    assert not always_exact.approximate and always_exact.builds == 0


def test_bad_k_and_bad_queries() -> None:
    ix = TieredIndex(dim=2)
    ix.upsert(["a", "b"], np.array([[0, 0], [1, 1]], dtype=np.float32))
    with pytest.raises(RetrievalError):
        ix.search(np.zeros((1, 2)), k=0)
    with pytest.raises(RetrievalError):
        ix.search(np.zeros((1, 3)), k=1)
    assert ix.search(np.zeros((1, 2)), k=3)[0].tolist() == [["a", "b"]]


def test_ranks_count_the_items_closer_than_the_true_vector() -> None:
    rng = np.random.default_rng(11)
    ix = TieredIndex(16)
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


@pytest.mark.parametrize("exact_below", [20_000, 1024])
def test_blocks_of_queries_give_what_one_block_gives(exact_below: int) -> None:
    # A block as small as a few queries (or one) against one block holding the whole batch:
    # the same ranks and the same recommendations, with no batch × all-items scratch.
    rng = np.random.default_rng(5)
    ids = [f"i{n}" for n in range(3000)]
    vectors = rng.standard_normal((3000, 16)).astype(np.float32)
    queries = rng.standard_normal((50, 16)).astype(np.float32)
    true_ids = [f"i{n}" for n in rng.integers(0, 3000, size=50)]
    current = rng.standard_normal((50, 16)).astype(np.float32)
    extra = [[f"i{n}" for n in rng.integers(0, 3000, size=5)] for _ in range(50)]
    got = {}
    for block_elems in (1 << 30, 3 * 3000, 1):
        ix = TieredIndex(16, exact_below=exact_below, block_elems=block_elems)
        ix.upsert(ids, vectors)
        assert ix.approximate == (exact_below < 3000)
        got[block_elems] = (ix.ranks(queries, true_ids, current), ix.recommend(queries, 10, extra))
    whole_ranks, whole_recs = got[1 << 30]
    for block_elems in (3 * 3000, 1):
        ranks, recs = got[block_elems]
        np.testing.assert_array_equal(ranks, whole_ranks)
        for (a_ids, a_d), (b_ids, b_d) in zip(recs, whole_recs, strict=True):
            assert a_ids == b_ids
            np.testing.assert_allclose(a_d, b_d, rtol=1e-6)


def test_a_fresh_vector_ranks_its_item_for_that_query_only() -> None:
    """The serving path ranks the item a user just touched at its state after the event,
    which the index may not hold yet; other queries keep the indexed vector."""
    ix = TieredIndex(dim=2)
    ix.upsert(["a", "b", "c"], np.array([[5.0, 5.0], [1.0, 0.0], [2.0, 0.0]]))
    queries = np.zeros((2, 2))
    extra = [["a"], ["a"]]
    fresh = [("a", np.array([0.5, 0.0])), None]
    got = ix.recommend(queries, 2, extra, fresh=fresh)
    assert got[0][0] == ["a", "b"] and got[0][1].tolist() == [0.25, 1.0]
    assert got[1][0] == ["b", "c"]  # "a" at its indexed vector is far


@pytest.mark.parametrize("dim", [2, 16, 33, 256])
def test_fresh_distances_are_np_dot_bit_for_bit(dim: int) -> None:
    """The fresh items' distances, one stacked matmul for the batch, equal ``np.dot`` of each
    difference with itself, as the served and offline keys were computed one by one (a numpy
    whose matmul summed otherwise would fail here, not move near-ties in served lists)."""
    rng = np.random.default_rng(dim)
    n = 200
    ids = [f"i{j}" for j in range(n)]
    ix = TieredIndex(dim)
    ix.upsert(ids, rng.standard_normal((n, dim)).astype(np.float32))
    queries = (rng.standard_normal((50, dim)) * rng.uniform(0.01, 100, (50, 1))).astype(np.float32)
    fresh: list[tuple[str, np.ndarray] | None] = [
        None if b % 7 == 3 else (ids[b] if b % 11 else "unheld", rng.standard_normal(dim))
        for b in range(50)
    ]
    at, rows, dist = ix._fresh_distances(queries, fresh)
    want = [
        (
            b,
            ids.index(f[0]),
            float(
                np.dot(
                    np.asarray(f[1], np.float32) - queries[b],
                    np.asarray(f[1], np.float32) - queries[b],
                )
            ),
        )
        for b, f in enumerate(fresh)
        if f is not None and f[0] != "unheld"
    ]
    assert list(zip(at.tolist(), rows.tolist(), dist.tolist(), strict=True)) == want


def _exact_index(
    rng: np.random.Generator, n: int, dim: int
) -> tuple[TieredIndex, list[str], np.ndarray, np.ndarray]:
    """An exact-tier index of n random items i0… with random (count, decayed count, time)."""
    ids = [f"i{j}" for j in range(n)]
    vectors = rng.standard_normal((n, dim)).astype(np.float32)
    attrs = np.column_stack([rng.integers(1, 50, n), rng.uniform(0, 5, n), rng.uniform(0, 9, n)])
    ix = TieredIndex(dim, n_attrs=3)
    ix.upsert(ids, vectors, attrs)
    return ix, ids, vectors, attrs


def test_the_exact_tier_serves_the_k_best_of_the_whole_key() -> None:
    """Below ``exact_below`` every item competes by the serving key, scale · ‖x − q‖²
    − prior − bonus, with the fresh vector of the item just touched and removed items out:
    the k best of a reference computed here item by item."""
    rng = np.random.default_rng(21)
    n, dim, k, nq = 600, 8, 10, 40
    ix, ids, vectors, attrs = _exact_index(rng, n, dim)
    gone = {"i3", "i77"}
    ix.remove(gone)
    queries = rng.standard_normal((nq, dim)).astype(np.float32)
    extra = [[f"i{j}" for j in rng.integers(0, n, size=4)] for _ in range(nq)]
    bonus = [{item: float(rng.uniform(0, 3)) for item in e[:3]} for e in extra]
    fresh = [(e[0], rng.standard_normal(dim).astype(np.float32)) for e in extra]
    scale = 1.7

    def prior(a: np.ndarray) -> np.ndarray:
        return 0.4 * np.log1p(a[:, 0]) + 0.2 * np.log1p(a[:, 1])

    got = ix.recommend(queries, k, extra, scale=scale, prior=prior, bonus=bonus, fresh=fresh)
    for b in range(nq):
        key = {}
        for j, item in enumerate(ids):
            if item in gone:
                continue
            x = fresh[b][1] if item == fresh[b][0] else vectors[j]
            dist = float(((x.astype(np.float64) - queries[b]) ** 2).sum())
            key[item] = scale * dist - prior(attrs[j : j + 1])[0] - bonus[b].get(item, 0.0)
        best = sorted(key, key=key.__getitem__)[:k]
        got_ids, got_keys = got[b]
        assert got_ids == best
        # The index takes distances in float32 (documented), the reference in float64.
        np.testing.assert_allclose(got_keys, [key[i] for i in best], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("exact_below", [20_000, 1024])
def test_each_query_keys_its_items_with_its_own_prior(exact_below: int) -> None:
    """``priors``: a ranker whose item term depends on the query's time (the learned
    ranker's recency) keys each query's items with its own, whichever tier: a batch gives
    what each query alone gives with its prior as the only one."""
    rng = np.random.default_rng(3)
    n, dim, k, nq = 3000, 8, 10, 12
    ids = [f"i{j}" for j in range(n)]
    vectors = rng.standard_normal((n, dim)).astype(np.float32)
    attrs = np.column_stack([rng.integers(1, 50, n), rng.uniform(0, 5, n), rng.uniform(0, 9, n)])
    ix = TieredIndex(dim, exact_below=exact_below, n_attrs=3, nprobe=64)
    ix.upsert(ids, vectors, attrs)
    assert ix.approximate == (exact_below < n)
    queries = rng.standard_normal((nq, dim)).astype(np.float32)
    extra = [[f"i{j}" for j in rng.integers(0, n, size=4)] for _ in range(nq)]
    times = rng.uniform(9, 20, nq)

    def at(t: float) -> Callable[[np.ndarray], np.ndarray]:
        return lambda a: -2.0 * np.log1p(np.maximum(t - a[:, 2], 0.0))

    def priors(attrs: np.ndarray, queries: slice) -> np.ndarray:
        return np.stack([at(t)(attrs) for t in times[queries]])

    batch = ix.recommend(queries, k, extra, scale=1.3, prior=at(times.max()), priors=priors)
    for b in range(nq):
        alone_prior = at(times[b])
        [alone] = ix.recommend(queries[b : b + 1], k, [extra[b]], scale=1.3, prior=alone_prior)
        assert batch[b][0] == alone[0]
        np.testing.assert_allclose(batch[b][1], alone[1], rtol=1e-6)
    # The batch's prior alone ranks the early queries otherwise: the priors matter here.
    shared = ix.recommend(queries, k, extra, scale=1.3, prior=at(times.max()))
    assert any(shared[b][0] != batch[b][0] for b in range(nq))
    with pytest.raises(ValueError, match="needs a prior"):
        ix.recommend(queries, k, extra, priors=priors)
    # Blocks of a few queries: each block's terms are its own queries'.
    small = TieredIndex(dim, exact_below=exact_below, n_attrs=3, nprobe=64, block_elems=1)
    small.upsert(ids, vectors, attrs)
    blocked = small.recommend(queries, k, extra, scale=1.3, prior=at(times.max()), priors=priors)
    assert [ids for ids, _keys in blocked] == [ids for ids, _keys in batch]


class _Recency:
    """A ranker's item terms at each query's own time that rise with an item's age (a
    ``BoundedPriors``), or, called alone, the same terms as plain ``QueryPriors``."""

    def __init__(self, times: np.ndarray, weight: float) -> None:
        self.times, self.weight = times, weight

    def at(self, attrs: np.ndarray, queries: slice | np.ndarray) -> np.ndarray:
        age = np.maximum(self.times[queries][:, None] - attrs[..., 2], 0.0)
        return self.weight * np.log1p(age) + 0.3 * np.log1p(attrs[..., 0])

    def __call__(self, attrs: np.ndarray, queries: slice) -> np.ndarray:
        return self.at(np.broadcast_to(attrs, (len(self.times[queries]), *attrs.shape)), queries)

    def upper(self, attrs: np.ndarray, queries: slice) -> np.ndarray:
        t = self.times[queries]
        ends = np.stack([self.at(attrs[None], np.array([i])) for i in (t.argmin(), t.argmax())])
        return ends.max(axis=0)[0] + 1e-9


@pytest.mark.parametrize("weight", [-2.0, 0.5, 40.0])
def test_the_exact_tier_bounds_per_query_terms_and_keys_as_if_it_had_all(weight: float) -> None:
    """Per-query item terms that bound themselves: the exact tier keys most items by the
    bound and gives each query what keying every item gives (the plain callable), with
    the user's own items, a fresh vector and holes; a weight that makes the terms decide
    the order (40) sends queries to the full keys, and they still agree."""
    rng = np.random.default_rng(11)
    n, dim, k, nq = 900, 8, 10, 64
    ix, _ids, _vectors, _attrs = _exact_index(rng, n, dim)
    ix.remove({"i5", "i600"})
    queries = rng.standard_normal((nq, dim)).astype(np.float32)
    extra = [[f"i{j}" for j in rng.integers(0, n, size=6)] for _ in range(nq)]
    bonus = [{item: float(rng.uniform(0, 4)) for item in e} for e in extra]
    fresh = [(e[0], rng.standard_normal(dim).astype(np.float32)) for e in extra]
    bounded = _Recency(rng.uniform(5, 20, nq), weight)
    plain = lambda a, s: bounded(a, s)  # noqa: E731  (not a BoundedPriors: keys every item)

    def prior(a: np.ndarray) -> np.ndarray:
        return np.zeros(len(a))

    kw = {"scale": 1.3, "prior": prior, "bonus": bonus, "fresh": fresh}
    got = ix.recommend(queries, k, extra, priors=bounded, **kw)
    want = ix.recommend(queries, k, extra, priors=plain, **kw)
    assert [i for i, _ in got] == [i for i, _ in want]
    for (_, a), (_, b) in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)
    assert all(len(i) == k and "i5" not in i and "i600" not in i for i, _ in got)


def test_lookup_gathers_vectors_and_attributes_of_held_items() -> None:
    ix = TieredIndex(dim=2, n_attrs=3)
    ix.upsert(["a", "b"], np.array([[1.0, 2.0], [3.0, 4.0]]), np.array([[1, 2, 3], [4, 5, 6]]))
    held, vectors, attrs = ix.lookup(["b", "zz", "a"])
    assert held.tolist() == [True, False, True]
    assert vectors.tolist() == [[3.0, 4.0], [0.0, 0.0], [1.0, 2.0]]
    assert attrs.tolist() == [[4, 5, 6], [0, 0, 0], [1, 2, 3]]
    vectors[0] = 9.0  # copies: the index is untouched
    assert ix.get("b")[0].tolist() == [3.0, 4.0]  # type: ignore[index]


@pytest.mark.parametrize("kind", ["distinct", "ties", "holes", "huge"])
def test_the_pruned_tiers_candidates_are_the_lowest_bounds_and_the_floor_holds(kind: str) -> None:
    """``_lowest``: per row, ``width`` columns in column order whose values are the lowest,
    and a floor that no column left out is below (ties, +inf holes and values past float32's
    range included) — what lets the pruned exact tier skip the items left out."""
    rng = np.random.default_rng(["distinct", "ties", "holes", "huge"].index(kind))
    b, h, width = 60, 400, 48
    lower = rng.standard_normal((b, h)) * 3
    if kind == "ties":
        lower = np.round(lower)  # a handful of values, each shared by many columns
    elif kind == "holes":
        lower[:, rng.random(h) < 0.9] = np.inf
        lower[:5, : h - 10] = np.inf  # rows with fewer finite values than the width
    elif kind == "huge":
        lower *= 1e39
    cand, floor = _lowest(lower, width)
    assert cand.shape == (b, width)
    for row in range(b):
        picked = lower[row, cand[row]]
        rest = np.delete(lower[row], cand[row])
        assert np.all(np.diff(cand[row]) > 0)  # distinct, in column order
        assert picked.max() <= rest.min()
        assert floor[row] <= rest.min()
        with np.errstate(over="ignore"):  # past float32's range rounds to ±inf
            step_below = np.nextafter(np.float32(rest.min()), np.float32(-np.inf))
        assert floor[row] >= step_below  # one float32 step under the exact floor at most

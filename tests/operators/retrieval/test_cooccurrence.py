"""operators.retrieval.cooccurrence: MinHash LSH candidates and the bounded re-hash cost."""

from __future__ import annotations

import numpy as np

from operators.retrieval.cooccurrence import CooccurrenceCandidates


def test_minhash_finds_planted_cooccurring_items() -> None:
    rng = np.random.default_rng(12)
    # rehash_every=1: every sketch is current when queried.
    cc = CooccurrenceCandidates(audience_size=64, num_perm=64, threshold=0.3, rehash_every=1)
    fans = [f"fan{i}" for i in range(40)]
    planted = ["p0", "p1", "p2"]  # share one audience of 40 users
    for u in fans:
        for p in planted:
            if rng.random() < 0.9:
                cc.observe(u, p)
    for e in range(4000):  # background: 200 items with random audiences from 2,000 users
        cc.observe(f"user{rng.integers(2000)}", f"bg{e % 200}")
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


def test_memory_is_bounded_by_items_and_cached_lists() -> None:
    cc = CooccurrenceCandidates(threshold=0.3, rehash_every=1, max_items=50, neighbour_cache=10)
    for e in range(5_000):
        cc.observe(f"u{e % 300}", f"i{e % 400}")
        if e % 7 == 0:
            cc.candidates([f"i{e % 400}", f"i{(e * 13) % 400}"])
    assert len(cc._audience) == len(cc._sketch) == len(cc._pending) == 50
    assert len(cc._neighbours) <= 10
    # The most recently touched items are the ones kept.
    assert set(cc._audience) == {f"i{e % 400}" for e in range(5_000 - 50, 5_000)}
    forgotten = "i0"
    assert forgotten not in cc._audience and forgotten not in cc.candidates(["i399"])


def test_a_bounded_model_equals_an_unbounded_one_while_under_its_bounds() -> None:
    rng = np.random.default_rng(3)
    small = CooccurrenceCandidates(rehash_every=1, max_items=200, neighbour_cache=200)
    big = CooccurrenceCandidates(rehash_every=1)
    for _ in range(3_000):
        u, i = f"u{rng.integers(500)}", f"i{rng.integers(150)}"
        small.observe(u, i)
        big.observe(u, i)
    for k in range(150):
        assert small.candidates([f"i{k}"]) == big.candidates([f"i{k}"])

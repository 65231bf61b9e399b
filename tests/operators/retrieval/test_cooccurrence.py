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

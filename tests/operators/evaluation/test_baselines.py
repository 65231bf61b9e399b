"""Recency and popularity baselines on a hand-checked log."""

from operators.evaluation.baselines import (
    BaselineRanker,
    baseline_ranks,
    evaluate_baseline,
    replay_before,
)
from tests.operators.conftest import build_log

#          0    1    2    3    4    5    6    7
USERS = ["a", "b", "b", "c", "a", "a", "a", "c"]
ITEMS = ["x", "y", "x", "y", "z", "x", "y", "q"]


def test_recency_ranks() -> None:
    log = build_log(USERS, ITEMS, range(8))
    ranks = baseline_ranks(log, 4, 8, "recency")
    # event 4: a's past {x}; z is unseen → n_known(x, y) + 1 = 3
    # event 5: a's past, most recent first: z, x → x ranks 2
    # event 6: a's past: x, z; y is not in it → 2 + (items more popular than y (2): none) + 1 = 3
    # event 7: q unseen; known x, y, z → 4
    assert ranks.tolist() == [3, 2, 3, 4]


def test_popularity_ranks() -> None:
    log = build_log(USERS, ITEMS, range(8))
    ranks = baseline_ranks(log, 4, 8, "popularity")
    # before 5: x 2, y 2, z 1 → x rank 1; before 6: x 3, y 2 → y rank 2
    assert ranks.tolist() == [3, 1, 2, 4]


def test_evaluate_baseline_with_limit() -> None:
    log = build_log(USERS, ITEMS, range(8))
    result = evaluate_baseline(
        log, {"train": (0, 4), "valid": (4, 6), "test": (6, 8)}, "recency", "valid", limit=1
    )
    assert result.ranks.tolist() == [3] and result.summary()["n_events"] == 1


def test_ranker_event_by_event_is_the_batch_ranks() -> None:
    log = build_log(USERS, ITEMS, range(8))
    for kind in ("recency", "popularity"):
        ranker = BaselineRanker(kind)  # type: ignore[arg-type]
        ranks = []
        for u, i in zip(USERS, ITEMS, strict=True):
            ranks.append(ranker.rank(u, i))
            ranker.observe(u, i)
        assert ranks[4:] == baseline_ranks(log, 4, 8, kind).tolist()  # type: ignore[arg-type]


def test_ranker_forgets_the_least_recently_active_user() -> None:
    ranker = BaselineRanker("recency", max_users=2)
    for u, i in [("a", "x"), ("b", "y"), ("a", "y"), ("c", "z")]:  # b is the oldest active
        ranker.observe(u, i)
    # popularity: y 2, x 1, z 1
    assert ranker.rank("a", "x") == 2  # a is remembered: y, then x
    assert ranker.rank("b", "y") == 1  # b forgotten: y ranks by popularity alone
    assert ranker.rank("b", "x") == 2  # ties with z after y
    assert ranker.n_items == 3


def test_replay_before_shows_each_event_what_came_before_it() -> None:
    n_items, events = replay_before(build_log(USERS, ITEMS, range(8)))
    assert n_items == 4  # codes in id order: q 0, x 1, y 2, z 3
    seen = [
        (e.row, e.user, e.item, e.previous, dict(e.history), e.popularity.tolist()) for e in events
    ]
    # event 5: a touched x (row 0) then z (row 4); x and y twice before it, z once
    assert seen[5] == (5, "a", 1, 3, {1: 0, 3: 4}, [0, 2, 2, 1])
    # event 6: a's x is now from row 5; a's previous item is x
    assert seen[6] == (6, "a", 2, 1, {1: 5, 3: 4}, [0, 3, 2, 1])
    assert seen[0] == (0, "a", 1, None, {}, [0, 0, 0, 0])

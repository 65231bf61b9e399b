"""The dashboard's aggregates from hand-made records, without Kafka."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from operators.evaluation.baselines import BaselineRanker
from streams.dashboard.board import Board, BoardConfig
from streams.dashboard.series import Series

T0 = 1_700_000_000.0


def log(seq: int, user: str, item: str, version: str = "", since: int = -1) -> dict[str, Any]:
    return {
        "seq": seq,
        "interaction": {"user_id": user, "item_id": item, "timestamp": float(seq)},
        "model_version": version,
        "model_since": since,
    }


def rec(user: str, item: str, event: str, candidates: list[tuple[str, float]], **kw: Any) -> dict:
    return {
        "user_id": user,
        "event_id": event,
        "item_id": item,
        "timestamp": kw.get("timestamp", 0.0),
        "model_version": kw.get("version", "v1"),
        # As workers write them (packed float32, schema v3).
        "projected_user": [],
        "predicted_item": [],
        "projected_user_f32": np.asarray(kw.get("projected", [0.0] * 3), "<f4").tobytes(),
        "predicted_item_f32": np.asarray(kw.get("predicted", [0.0] * 2), "<f4").tobytes(),
        "candidates": [{"item_id": i, "score": s} for i, s in candidates],
        "state_change_probability": kw.get("p"),
    }


def evaluation(seq: int, user: str, item: str, rank: int) -> dict[str, Any]:
    return {
        "event_id": f"e{seq}",
        "seq": seq,
        "user_id": user,
        "item_id": item,
        "model_version": "v1",
        "rank": rank,
        "n_items": 5,
    }


def test_series_keeps_a_window_of_seconds() -> None:
    s = Series(window_s=3)
    s.add(100.2, log=1)
    s.add(100.7, log=2)
    s.add(102.0, log=1, dlq=1)
    assert s.frame(["log", "dlq"]) == {
        "t": [100, 101, 102],
        "log": [3.0, 0.0, 1.0],
        "dlq": [0.0, 0.0, 1.0],
    }
    s.add(104.5, log=5)
    s.add(101.0, log=7)  # older than the window now: dropped
    s.set(104.9, lag=3)
    s.set(104.1, lag=4)  # a gauge: the latest value set wins
    assert s.frame(["log", "lag"], fill=None) == {
        "t": [102, 103, 104],
        "log": [1.0, None, 5.0],
        "lag": [None, None, 4.0],
    }
    # Up to now when the stream was active within the window: quiet seconds show as quiet.
    assert s.frame(["log"], until=106.2) == {"t": [104, 105, 106], "log": [5.0, 0.0, 0.0]}
    assert s.frame(["log"], until=110.0)["t"] == [102, 103, 104]  # long quiet: the last data
    assert s.frame(["log"], until=103.5)["t"] == [102, 103]  # 104 still filling


def test_throughput_totals_and_dead_letters() -> None:
    board = Board()
    for seq in range(5):
        board.on_log(log(seq, "u", "i"), T0 + seq // 2)
    board.on_recommendation(rec("u", "i", "e0", [("i", 1.0)]), T0 + 1)
    board.on_dlq("malformed", "not Avro", "interactions/0/7", T0 + 2)
    board.on_dlq("malformed", "not Avro", "interactions/0/8", T0 + 2)
    board.on_dlq("duplicate", "", "interactions/1/3", T0 + 2)
    o = board.overview()
    assert o["totals"]["log"] == 5 and o["totals"]["recommendations"] == 1
    assert o["throughput"]["log"] == [2.0, 2.0, 1.0]
    assert o["throughput"]["recs"] == [0.0, 1.0, 0.0]
    assert o["throughput"]["dlq"] == [0.0, 0.0, 3.0]
    assert o["dlq"]["by_reason"] == {"malformed": 2, "duplicate": 1}
    assert o["dlq"]["recent"][0]["source"] == "interactions/1/3"  # newest first


def test_live_quality_joins_model_and_recency_ranks_in_any_order() -> None:
    board = Board(BoardConfig(evaluate_every=1, quality_window=2))
    events = [("a", "x"), ("b", "y"), ("a", "y"), ("a", "x"), ("b", "x")]
    ranker = BaselineRanker("recency")
    want = []
    for u, i in events:
        want.append(ranker.rank(u, i))
        ranker.observe(u, i)
    # seq 2's evaluation arrives before its event, the others after.
    board.on_evaluation(evaluation(2, "a", "y", rank=1), T0)
    for seq, (u, i) in enumerate(events):
        board.on_log(log(seq, u, i), T0)
    board.on_evaluation(evaluation(4, "b", "x", rank=4), T0 + 1)
    for seq in (0, 1, 3):
        board.on_evaluation(evaluation(seq, *events[seq], rank=2), T0 + 1)
    q = board.overview()["quality"]
    model = [1, 4, 2, 2, 2]
    assert q["total"]["events"] == 5
    assert q["total"]["model_mrr"] == sum(1 / r for r in model) / 5
    assert q["total"]["baseline_mrr"] == sum(1 / r for r in want) / 5
    assert q["total"]["baseline_recall"] == 1.0  # five items at most: all within 10
    # Each point: the mean over the latest seconds that hold at least 2 evaluated events (or
    # all there are): T0 holds seq 2 alone, T0 + 1 the four others.
    assert q["t"] == [int(T0), int(T0) + 1]
    assert q["model_mrr"] == [1.0, (1 / 4 + 3 / 2) / 4]


def test_an_evaluation_before_the_log_read_counts_for_the_model_only() -> None:
    board = Board(BoardConfig(evaluate_every=1))
    board.on_log(log(10, "a", "x"), T0)
    board.on_evaluation(evaluation(3, "a", "x", rank=1), T0)
    q = board.overview()["quality"]
    assert q["model_only"] == 1 and q["total"]["events"] == 0


def test_only_the_sampled_events_are_ranked_by_the_baseline() -> None:
    board = Board(BoardConfig(evaluate_every=10))
    for seq in range(25):
        board.on_log(log(seq, "a", f"i{seq % 3}"), T0)
    assert sorted(board._baseline_at) == [0, 10, 20]


def test_models_versions_promotions_and_switches() -> None:
    board = Board()

    def announcement(version: str, created: int, seq: int = -1) -> dict[str, Any]:
        return {
            "name": "jodie",
            "version": version,
            "log_seq": seq,
            "metrics": {"valid_mrr_frozen": 0.5, "bad": float("nan")},
            "created_at_ms": created,
            "previous_version": None,
        }

    board.on_model("jodie@v1", announcement("v1", 1000), T0)
    board.on_model("jodie", announcement("v1", 1000), T0)
    board.on_model("jodie@v2", announcement("v2", 2000, seq=40), T0 + 5)
    board.on_log(log(0, "a", "x", "v1", 0), T0)
    board.on_log(log(50, "a", "y", "v2", 50), T0 + 9)
    board.on_log(log(49, "b", "y", "v1", 0), T0 + 9)  # an earlier epoch's event, read late
    board.on_model("jodie", {**announcement("v2", 2000, 40), "previous_version": "v1"}, T0 + 8)
    m = board.overview()["models"]
    assert [v["version"] for v in m["versions"]] == ["v1", "v2"]
    assert m["versions"][0]["metrics"] == {"valid_mrr_frozen": 0.5, "bad": None}
    assert m["serving"]["version"] == "v2"
    assert [(p["version"], p["previous"]) for p in m["promotions"]] == [("v1", None), ("v2", "v1")]
    assert [(s["version"], s["since_seq"], s["t"]) for s in m["switches"]] == [
        ("v1", 0, T0),
        ("v2", 50, T0 + 9),
    ]


def test_a_users_latest_list_is_explained() -> None:
    board = Board()
    for seq, item in enumerate(["x", "y", "x", "z"]):
        board.on_log(log(seq, "u", item), T0)
    board.on_item_vector("x", np.array([1.0, 0.0], np.float32), "v1")
    board.on_item_vector("y", np.array([0.0, 3.0], np.float32), "")  # unstamped: comparable
    board.on_item_vector("z", np.array([0.0, 1.0], np.float32), "v0")  # another version's
    board.on_recommendation(
        rec("u", "z", "e3", [("x", -0.5), ("y", -2.0), ("z", -3.0), ("w", -4.0)], p=float("nan")),
        T0,
    )
    view = board.user("u")
    assert view is not None
    assert [r["item_id"] for r in view["recent_items"]] == ["z", "x", "y"]
    latest = view["latest"]
    assert latest["state_change_probability"] is None
    rows = {c["item_id"]: c for c in latest["candidates"]}
    assert rows["x"] == {
        "rank": 1,
        "item_id": "x",
        "score": -0.5,
        "below_top": 0.0,
        "distance": 1.0,  # ‖(0, 0) − (1, 0)‖²
        "recent_position": 2,
        "events": 2,
    }
    assert rows["y"]["distance"] == 9.0 and rows["y"]["below_top"] == 1.5
    assert rows["z"]["distance"] is None  # v0's space, not v1's
    assert rows["w"]["distance"] is None and rows["w"]["events"] == 0
    json.dumps(board.overview(), allow_nan=False)
    json.dumps(view, allow_nan=False)


def test_trajectory_in_a_fixed_plane_of_the_latest_version() -> None:
    board = Board(BoardConfig(trajectory=4, plane_fit_on=3))
    rng = np.random.default_rng(0)
    for k in range(3):  # another user's vectors fit v1's plane
        board.on_recommendation(rec("o", "i", f"o{k}", [], projected=rng.normal(size=3)), T0)
    board.on_recommendation(rec("u", "i", "old", [], version="v0", projected=[9.0, 9, 9]), T0)
    for k in range(5):
        board.on_recommendation(
            rec("u", f"i{k}", f"e{k}", [], projected=[float(k), 0, 0], timestamp=k), T0
        )
    before = board.user("u")
    assert before is not None
    traj = before["trajectory"]
    assert traj["version"] == "v1" and traj["plane"]["fixed"] and traj["plane"]["fitted_on"] == 3
    assert [p["event_id"] for p in traj["points"]] == ["e1", "e2", "e3", "e4"]  # the last 4
    assert traj["hidden"] == 0  # v0's point fell out with the oldest
    for k in range(3):  # more vectors do not move the fixed plane
        board.on_recommendation(rec("o", "i", f"p{k}", [], projected=rng.normal(size=3)), T0)
    after = board.user("u")
    assert after is not None
    assert after["trajectory"]["points"] == traj["points"]


def test_memory_is_bounded_by_the_most_recently_active_users() -> None:
    board = Board(BoardConfig(max_users=3))
    for seq, user in enumerate(["a", "b", "c", "a", "d"]):
        board.on_log(log(seq, user, "x"), T0)
    assert list(board.users) == ["c", "a", "d"]
    assert board.user("b") is None
    assert board.find_users("") == ["d", "a", "c"]
    assert board.overview()["active_users"] == ["d", "a", "c"]

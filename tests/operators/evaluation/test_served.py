"""Served lists: the list a user got after their previous event, measured at their next one."""

from __future__ import annotations

import numpy as np
import torch

from operators.evaluation.protocols import event_categories, frozen_replay
from operators.evaluation.scorer import HistoryScorer, PlainScorer, Scorer, UserContext
from operators.evaluation.served import ServedLists, ServedTally, _recent_then_popular, _top
from operators.model.jodie import Jodie
from operators.model.online import OnlineJodie
from operators.model.state import States
from tests.operators.conftest import build_log, tiny_config


def _log(n: int = 400, seed: int = 0):
    rng = np.random.default_rng(seed)
    users = [f"u{k}" for k in rng.integers(0, 15, n)]
    # Users come back to recent items often, as in the real data.
    items = [f"i{k}" for k in rng.integers(0, 25, n)]
    for k in range(1, n):
        if rng.random() < 0.5:
            earlier = [j for j in range(max(0, k - 40), k) if users[j] == users[k]]
            if earlier:
                items[k] = items[earlier[-1]]
    return build_log(users, items, np.cumsum(rng.exponential(30.0, n)))


def _direct_lists(
    model: Jodie,
    log,
    scorer: Scorer,
    horizons: tuple[float, ...],
    k: int,
) -> list[list[int] | None]:
    """Per event, the item rows the model would serve after the user's previous event, by
    another path: OnlineJodie.query at (previous time + h), right after that event."""
    online = OnlineJodie(model, States.empty(8, 8, 8, 4))
    items = online.states.items
    last: dict[str, list[list[int]]] = {}
    out: list[list[int] | None] = []
    for u, i, t in zip(
        log.user_ids.tolist(), log.item_ids.tolist(), log.timestamps.tolist(), strict=True
    ):
        out.append(last.get(u))
        online.observe(u, i, t)
        lists = []
        for h in horizons:
            q = online.query(u, t + h)
            s = scorer.scores(
                q.pred[0],
                items.emb,
                items.static,
                items.count,
                items.trend_at(t),
                UserContext(q.history, q.history_counts),
            ).numpy()
            lists.append(_top(s, min(k, len(items))).tolist())
        last[u] = lists
    return out


def test_positions_are_those_of_the_list_served_after_the_previous_event() -> None:
    torch.manual_seed(0)
    model = Jodie(tiny_config(delta_user_mean=60.0, delta_user_std=30.0)).eval()
    log = _log()
    horizons, k = (0.0, 600.0), 5
    scorers: list[Scorer] = [
        PlainScorer(),
        HistoryScorer(
            torch.tensor(-1.0),
            torch.linspace(2.0, 0.5, 4),
            torch.tensor(0.3),
            torch.tensor(0.1),
            torch.tensor(0.2),
        ),
    ]
    for scorer in scorers:
        served = ServedLists(horizons, k)
        states = States.empty(8, 8, 8, 4)
        frozen_replay(model, states, log, scorer, skip=0, served=served)
        direct = _direct_lists(model, log, scorer, horizons, k)
        items = states.items
        want_pos, want_scored = [], []
        for e, lists in enumerate(direct):
            if lists is None:
                continue
            row = items.row(str(log.item_ids[e]))
            want_scored.append(e)
            want_pos.append([lst.index(row) + 1 if row in lst else 0 for lst in lists])
        assert served.scored == want_scored
        assert np.stack(served.positions).tolist() == want_pos
        summary = served.summary(event_categories(log, 0, len(log)))
        assert summary["covered"] == len(want_scored) == len(log) - len(set(log.user_ids))
        # The heuristic serves the user's last item first: every repeat of it is a hit at 1.
        assert summary["by_category"]["repeat_last"]["heuristic"]["mrr"] == 1.0
        hits = np.array(want_pos)[:, 0] > 0
        assert summary["by_horizon"][0]["recall"] == hits.mean()


def test_the_heuristic_serves_recent_items_then_popular_ones() -> None:
    history = np.array([3, 0, -1, -1])
    count = np.array([5, 1, 9, 2, 7])
    assert _recent_then_popular(history, count, 4).tolist() == [3, 0, 2, 4]
    assert _recent_then_popular(history, count, 1).tolist() == [3]


def test_top_breaks_ties_by_row() -> None:
    assert _top(np.array([1.0, 3.0, 3.0, 2.0]), 3).tolist() == [1, 2, 3]


def test_the_live_tally_measures_the_list_served_before_each_event() -> None:
    tally = ServedTally(k=3)
    tally.event("u", "a", ["b", "c", "d"])  # first event: nothing served before
    tally.event("v", "b", ["a", "b", "c"])
    tally.event("u", "c", ["a", "c", "e"])  # "c" was 2nd in u's list: hit at 2
    tally.event("u", "z", ["c", "a", "b"])  # "z" absent from ["a", "c", "e"]: miss
    tally.event("v", "b", ["b"])  # "b" 2nd in v's list
    s = tally.summary()
    assert s["events"] == 3
    assert s["recall"] == 2 / 3 and s["mrr"] == (1 / 2 + 0 + 1 / 2) / 3
    # The heuristic served u's recent items first, then the popular ones (a, b by count):
    # before "c": [a, b, ...] → miss ("c" has no count yet); before "z": [c, a, b] → miss;
    # v before "b": [b, ...] → hit at 1.
    assert s["heuristic"]["recall"] == 1 / 3 and s["heuristic"]["mrr"] == 1 / 3


def test_the_live_tally_forgets_the_least_recent_users_beyond_its_bound() -> None:
    tally = ServedTally(k=2, max_users=2)
    for user in ("u", "v", "w"):
        tally.event(user, "a", ["a"])
    tally.event("u", "a", ["a"])  # u was forgotten: not measured
    tally.event("w", "a", ["a"])
    assert tally.summary()["events"] == 1

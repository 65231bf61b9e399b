"""Served lists: the list a user got after their previous event, measured at their next one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from operators.evaluation.protocols import event_categories, frozen_replay
from operators.evaluation.scorer import HistoryScorer, PlainScorer, Scorer, UserContext
from operators.evaluation.served import (
    LastItemMargins,
    ServedLists,
    ServedTally,
    _recent_then_popular,
    _top,
)
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
        _history_scorer(),
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


def _history_scorer(first_bonus: float = 0.0) -> HistoryScorer:
    bonus = torch.linspace(2.0, 0.5, 4)
    bonus[0] += first_bonus
    return HistoryScorer(
        torch.tensor(-1.0), bonus, torch.tensor(0.3), torch.tensor(0.1), torch.tensor(0.2)
    )


def test_a_margin_places_each_item_as_the_list_of_a_scorer_with_that_first_bonus() -> None:
    torch.manual_seed(0)
    model = Jodie(tiny_config(delta_user_mean=60.0, delta_user_std=30.0)).eval()
    log = _log()
    margins = (0.0, 0.5, 1.0, 4.0, 64.0)
    measured = LastItemMargins(None, margins, k=5)
    frozen_replay(model, States.empty(8, 8, 8, 4), log, _history_scorer(), served=measured)
    positions = np.stack(measured.positions)  # (E, M)
    # Each margin by another path: the lists of a scorer whose last-item bonus carries it.
    for j, margin in enumerate(margins):
        lists = ServedLists((None,), k=5)
        frozen_replay(model, States.empty(8, 8, 8, 4), log, _history_scorer(margin), served=lists)
        assert np.stack(lists.positions)[:, 0].tolist() == positions[:, j].tolist()
    # The margins do move items (the history bonus alone does not put the last item first).
    assert len({tuple(positions[:, j]) for j in range(len(margins))}) > 1
    mrr = measured.mrr()
    want = [np.mean([1.0 / p if p else 0.0 for p in positions[:, j].tolist()]) for j in range(5)]
    assert mrr.tolist() == pytest.approx(want, rel=1e-12)
    assert measured.best() == margins[int(np.argmax(mrr))]


def test_the_raised_item_passes_the_others_it_now_outscores() -> None:
    measured = LastItemMargins(None, (0.0, 1.0, 2.5), k=3)
    # The user just touched row 5 (score 1.0); the best others, best first: rows 2, 7, 3.
    others = np.array([2, 7, 3]), np.array([3.0, 1.5, 1.0], dtype=np.float32)
    for target, want in ((5, [0, 2, 1]), (7, [2, 3, 3]), (2, [1, 1, 2]), (9, [0, 0, 0])):
        measured._pending[0] = (5, np.float32(1.0), *others, 3)
        measured.before(0, 0, target)
        # Row 5 at margin 0: after 2, 7 and 3 (a tie, lower row first), 4th of a list of 3.
        assert measured.positions[-1].tolist() == want, target
    # MRR (1/2 + 1/3 + 1) / 4 at margins 1.0 and 2.5 (above 1.5 / 4 at 0): the smaller wins.
    assert measured.mrr().tolist() == pytest.approx([1.5 / 4, 11 / 6 / 4, 11 / 6 / 4])
    assert measured.best() == 1.0


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


def test_the_live_tally_forgets_by_last_activity_not_first_sight() -> None:
    tally = ServedTally(k=2, max_users=2)
    for user in ("u", "v", "u", "w"):  # u active again after v: v is the least recent
        tally.event(user, "a", ["a"])
    assert tally.summary()["events"] == 1  # u's second event
    tally.event("u", "a", ["a"])  # still remembered
    tally.event("v", "a", ["a"])  # forgotten when w came: not measured
    assert tally.summary()["events"] == 2


class _PlainTally:
    """The live tally's definition, written plainly: the heuristic's list is built whole."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.users: dict[str, tuple[list[str], list[str]]] = {}
        self.model: list[int] = []
        self.heuristic: list[int] = []

    def event(self, user: str, item: str, served: list[str], popular: list[str]) -> None:
        if user in self.users:
            last_served, recent = self.users[user]
            self.model.append(last_served.index(item) + 1 if item in last_served else 0)
            heuristic = list(recent)
            for other in popular:
                if len(heuristic) < self.k and other not in heuristic:
                    heuristic.append(other)
            self.heuristic.append(heuristic.index(item) + 1 if item in heuristic else 0)
            recent = [item, *(r for r in recent if r != item)][: self.k]
        else:
            recent = [item]
        self.users[user] = (list(served[: self.k]), recent)


@pytest.mark.parametrize("seed", range(5))
def test_the_live_tally_counts_as_its_plain_definition(seed: int) -> None:
    rng = np.random.default_rng(seed)
    k = 4
    tally, plain = ServedTally(k=k), _PlainTally(k)
    for _ in range(600):
        user, item = f"u{rng.integers(0, 12)}", f"i{rng.integers(0, 15)}"
        served = [f"i{j}" for j in rng.choice(15, size=rng.integers(0, 7), replace=False)]
        # a popular list with repeats and items the user already holds
        popular = [f"i{j}" for j in rng.integers(0, 15, size=rng.integers(0, 9))]
        tally.event(user, item, served, popular)
        plain.event(user, item, served, popular)
    s = tally.summary()
    model, heuristic = np.array(plain.model), np.array(plain.heuristic)
    assert s["events"] == len(model) > 500
    assert s["recall"] == pytest.approx(np.mean(model > 0))
    assert s["mrr"] == pytest.approx(np.mean(np.where(model > 0, 1 / np.maximum(model, 1), 0)))
    assert s["heuristic"]["recall"] == pytest.approx(np.mean(heuristic > 0))
    assert s["heuristic"]["mrr"] == pytest.approx(
        np.mean(np.where(heuristic > 0, 1 / np.maximum(heuristic, 1), 0))
    )

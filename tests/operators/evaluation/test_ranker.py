"""The learned ranker: its terms by hand, rows scored apart, what its fit learns on synthetic
samples whose deciding feature is known, and that it is fitted on the training split only."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from operators.evaluation.metrics import mrr, rank_of
from operators.evaluation.ranker import (
    ITEM_FEATURES,
    USER_FEATURES,
    LearnedRanker,
    RankerNet,
    RankerSamples,
    entry_width,
    fit_ranker,
    item_features,
)
from operators.evaluation.scorer import UserContext, fitted, make_scorer
from operators.model.config import ModelConfig, TrainConfig
from operators.training.run import run_training
from tests.operators.conftest import build_log, tiny_config
from tests.operators.training.test_trainer import planted_stream


def _linear(log_alpha: float, items: list[float], entries: list[float]) -> LearnedRanker:
    net = RankerNet(history_size=2, hidden=0)
    with torch.no_grad():
        net.log_alpha.fill_(log_alpha)
        net.item_weights.copy_(torch.tensor(items))
        net.entry_weights.copy_(torch.tensor(entries))
    return LearnedRanker(net)


def test_terms_by_hand() -> None:
    pred = torch.zeros(3)  # d = 2, s = 1
    dyn = torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]])
    static = torch.zeros(3, 1)
    count = np.array([0.0, math.e - 1, 0.0])  # log(1 + n) = 0, 1, 0
    trend = np.zeros(3)
    last = np.array([100.0 - (math.e - 1), 100.0, 0.0])  # log(1 + age) = 1, 0, log 101
    # history: item 1 last (log(1 + n) = 2, touched at 90), then item 0 (once, at 100 − 10)
    user = UserContext(
        np.array([1, 0]),
        np.array([math.e**2 - 1, 0.0]),
        times=np.array([100.0 - (math.e**3 - 1), 90.0]),
        now=100.0,
    )
    # α = 2; w: popularity 1, recency 10 (x = −log(1 + age)/10); v: position 0 → 5,
    # position 1 → 1, log count 0.5, since-the-user-touched-it 10
    ranker = _linear(math.log(2.0), [1.0, 0.0, 10.0], [5.0, 1.0, 0.5, 10.0])
    out = ranker.scores(pred, dyn, static, count, trend, user, last)
    item0 = -2.0 + 0.0 - 1.0 + (1.0 + 0.0 - math.log1p(10.0))
    item1 = -8.0 + 1.0 - 0.0 + (5.0 + 0.5 * 2.0 - 3.0)
    item2 = -0.0 + 0.0 - math.log(101.0)
    torch.testing.assert_close(out, torch.tensor([item0, item1, item2]))
    # The split the serving index takes: scale, item prior, history bonus.
    x = item_features(count, trend, last, 100.0)
    bonus = ranker.history_bonus(user, x[user.history], np.array([4.0, 1.0]))
    assert ranker.scale == 2.0
    recombined = -ranker.scale * np.array([1.0, 4.0, 0.0]) + ranker.prior(x)
    recombined[user.history] += bonus
    np.testing.assert_allclose(recombined, out.numpy(), rtol=1e-6, atol=1e-6)
    # Without the user's times and the items' last times those terms drop out, nothing else.
    bare = ranker.scores(pred, dyn, static, count, trend, UserContext(user.history, user.counts))
    torch.testing.assert_close(bare, torch.tensor([-2.0 + 1.0, -8.0 + 1.0 + 6.0, 0.0]))


def test_rows_scored_apart_score_as_in_the_full_array() -> None:
    torch.manual_seed(1)
    net = RankerNet(history_size=4, hidden=8)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_()
    ranker = LearnedRanker(net)
    rng = np.random.default_rng(0)
    n = 12
    dyn, static, pred = torch.randn(n, 3), torch.randn(n, 2), torch.randn(5)
    count, trend = rng.integers(0, 9, n).astype(float), rng.uniform(0, 3, n)
    last = rng.uniform(0, 50, n)
    user = UserContext(
        np.array([7, 2, 9, -1]),
        np.array([3, 1, 2, 0]),
        np.array([49.0, 40.0, 12.0, np.nan]),
        np.array([4.0, 2.0, 1.0, 2.5]),
        events=6,
        last_time=49.0,
        now=51.0,
    )
    full = ranker.scores(pred, dyn, static, count, trend, user, last)
    rows = np.array([2, 5, 9])
    local = {int(r): j for j, r in enumerate(rows)}
    sub = UserContext(
        np.array([local.get(int(r), -1) for r in user.history]),
        user.counts,
        user.times,
        user.habits,
        user.events,
        user.last_time,
        user.now,
    )
    apart = ranker.scores(pred, dyn[rows], static[rows], count[rows], trend[rows], sub, last[rows])
    torch.testing.assert_close(apart, full[torch.from_numpy(rows)])


def test_make_scorer_loads_a_fitted_ranker_and_tells_what_is_fitted() -> None:
    cfg = ModelConfig(scorer="ranker", history_size=2)
    ranker = _linear(0.5, [1.0, 2.0, 3.0], [1.0, 0.0, 0.0, 0.0])
    tensors = ranker.tensors()
    assert fitted(cfg, tensors) and not fitted(cfg, {}) and fitted(cfg.with_(scorer="plain"), {})
    loaded = make_scorer(cfg, tensors)
    assert isinstance(loaded, LearnedRanker) and loaded.net.mlp is None
    assert loaded.scale == ranker.scale and loaded.net.item_weights.tolist() == [1.0, 2.0, 3.0]
    blank = make_scorer(cfg, {})  # unfitted: the plain distance
    assert isinstance(blank, LearnedRanker) and blank.scale == 1.0


def _synthetic(seed: int, e: int = 400, n: int = 20, k: int = 4) -> RankerSamples:
    """Uninformative distances and popularity. Users with a high share of new items (the 4th
    user feature) go to the item anyone touched most recently outside their history; the
    others come back to their last item. Only a ranker that reads the user can tell."""
    rng = np.random.default_rng(seed)
    dist2 = rng.uniform(0.0, 4.0, (e, n)).astype(np.float32)
    x = rng.uniform(-1.0, 0.0, (e, n, ITEM_FEATURES)).astype(np.float32)
    entries = np.zeros((e, k, entry_width(k)), dtype=np.float32)
    rows = np.full((e, k), -1, dtype=np.int64)
    users = rng.uniform(0.0, 1.0, (e, USER_FEATURES)).astype(np.float32)
    targets = np.empty(e, dtype=np.int64)
    for r in range(e):
        hist = rng.choice(n - 1, size=k, replace=False)
        rows[r] = hist
        entries[r, np.arange(k), np.arange(k)] = 1.0
        explorer = rng.uniform() < 0.5
        users[r, 3] = rng.uniform(0.7, 1.0) if explorer else rng.uniform(0.0, 0.3)
        outside = np.setdiff1d(np.arange(n - 1), hist)
        targets[r] = outside[np.argmax(x[r, outside, 2])] if explorer else hist[0]
    dist2[:, -1] = np.inf  # an item unknown at these events never wins
    return RankerSamples(dist2, x, entries, rows, users, targets)


def _mrr(ranker: LearnedRanker, s: RankerSamples) -> float:
    ranks = []
    for r in range(s.targets.shape[0]):
        logits = (
            -ranker.scale * torch.from_numpy(s.dist2[r])
            + torch.from_numpy(ranker.prior(s.items[r])).float()
        )
        valid = s.entry_rows[r] >= 0
        with torch.no_grad():
            bonus = ranker.net.bonus(
                torch.from_numpy(s.entries[r][valid]),
                torch.from_numpy(s.users[r]).expand(int(valid.sum()), -1),
                torch.from_numpy(s.items[r][s.entry_rows[r][valid]]),
                torch.from_numpy(s.dist2[r][s.entry_rows[r][valid]]),
            )
        logits[torch.from_numpy(s.entry_rows[r][valid])] += bonus
        ranks.append(rank_of(logits, int(s.targets[r])))
    return mrr(np.asarray(ranks))


def test_fit_learns_the_feature_that_decides() -> None:
    train, held_out = _synthetic(0), _synthetic(1)
    linear = fit_ranker(train, history_size=4, hidden=0)
    deep = fit_ranker(train, history_size=4, hidden=8)
    blank = LearnedRanker(RankerNet(4, 0))
    w = linear.net.item_weights.tolist()
    assert w[2] > abs(w[0]) and w[2] > abs(w[1])  # recency is the item term that matters
    assert linear.net.entry_weights[0] > linear.net.entry_weights[1:4].max()  # the last item
    plain, lin, mlp = _mrr(blank, held_out), _mrr(linear, held_out), _mrr(deep, held_out)
    assert plain < 0.3 < lin < mlp - 0.1 and mlp > 0.85, (plain, lin, mlp)


def _tail_swapped(log_a, start: int):
    """``log_a`` with every event from ``start`` on replaced (other users, other items)."""
    rng = np.random.default_rng(7)
    n = len(log_a)
    users = [*log_a.user_ids[:start].tolist(), *(f"x{rng.integers(3)}" for _ in range(n - start))]
    items = [*log_a.item_ids[:start].tolist(), *(f"y{rng.integers(4)}" for _ in range(n - start))]
    return build_log(users, items, log_a.timestamps)


def test_the_fit_reads_no_event_after_the_training_split() -> None:
    log = planted_stream(n_events=600, n_users=8, n_items=6)
    other = _tail_swapped(log, 480)  # the training split is the first 480 events
    config = TrainConfig(epochs=1, n_spans=20, progress=False, model=tiny_config(scorer="ranker"))
    runs = [run_training(data, config) for data in (log, other)]
    assert runs[0].result.split.train_end == 480
    a, b = (dict(r.scorer_tensors) for r in runs)
    assert set(a) == set(b) and "scorer.ranker.item_weights" in a
    # The served margin of the last item is chosen on the validation split afterwards and
    # added to the weight of history position 0: the fit itself is that weight without it.
    key = "scorer.ranker.entry_weights"
    fitted = [
        float(t[key][0]) - r.result.metrics["served_margin"]
        for t, r in zip((a, b), runs, strict=True)
    ]
    assert fitted[0] == pytest.approx(fitted[1], abs=1e-5)  # float32 (w + m) − m
    a[key], b[key] = a[key][1:], b[key][1:]
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # …and the fitted ranker is not a blank one.
    assert float(a["scorer.ranker.item_weights"].abs().sum()) > 0

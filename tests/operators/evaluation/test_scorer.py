"""Scorers: plain distance, history bonus, and its fit on synthetic samples."""

from __future__ import annotations

import numpy as np
import torch

from operators.evaluation.scorer import (
    HistoryScorer,
    PlainScorer,
    ScorerSamples,
    UserContext,
    fit_history_scorer,
    log1p_count,
    make_scorer,
    numpy_scores,
)
from operators.model.config import ModelConfig


def test_history_terms_are_added_at_history_positions() -> None:
    pred = torch.tensor([0.0, 0.0, 0.0])  # d = 2, s = 1
    dyn = torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]])
    static = torch.zeros(3, 1)
    counts = np.array([0, np.e - 1, 0])  # log(1 + n) = 0, 1, 0
    user = UserContext(np.array([1, 0]), np.array([np.e**2 - 1, 0]))  # log(1 + n) = 2, 0
    plain = PlainScorer().scores(pred, dyn, static, counts, counts, user)
    torch.testing.assert_close(plain, torch.tensor([-1.0, -4.0, 0.0]))
    scorer = HistoryScorer(
        torch.tensor(float(np.log(2.0))),
        torch.tensor([5.0, 1.0]),
        torch.tensor(0.5),
        torch.tensor(3.0),
        torch.tensor(-1.0),
    )
    trend = np.array([np.e - 1, 0.0, 0.0])  # log(1 + m) = 1, 0, 0
    out = scorer.scores(pred, dyn, static, counts, trend, user)
    # α = 2: [-2, -8, 0]; item 1: +5 (last) + 0.5·2 (user count) + 3·1 (popularity);
    # item 0: +1 (second in history) - 1·1 (trend)
    torch.testing.assert_close(out, torch.tensor([-2.0, 1.0, 0.0]))


def test_make_scorer_is_chosen_by_config() -> None:
    assert isinstance(make_scorer(ModelConfig(scorer="plain")), PlainScorer)
    s = make_scorer(
        ModelConfig(scorer="history", history_size=3),
        {"scorer.log_alpha": torch.tensor(0.0), "scorer.bonus": torch.ones(3)},
    )
    assert isinstance(s, HistoryScorer) and torch.equal(s.bonus, torch.ones(3))
    assert float(s.beta) == 0.0 and float(s.gamma) == 0.0


def test_fit_learns_a_monotone_recency_bonus() -> None:
    rng = np.random.default_rng(0)
    e, n, k = 400, 30, 4
    dist2 = rng.uniform(0.0, 4.0, size=(e, n)).astype(np.float32)  # uninformative distances
    positions = np.full((e, n), -1, dtype=np.int64)
    targets = np.empty(e, dtype=np.int64)
    for r in range(e):
        hist = rng.choice(n, size=k, replace=False)
        positions[r, hist] = np.arange(k)
        # the truth is the last item 60% of the time, the second one 20%, else random
        u = rng.uniform()
        targets[r] = hist[0] if u < 0.6 else hist[1] if u < 0.8 else rng.integers(n)
    dist2[:, -1] = np.inf  # an item unknown at these events never wins
    zeros = np.zeros((e, n), dtype=np.float32)
    scorer = fit_history_scorer(ScorerSamples(dist2, positions, zeros, zeros, zeros, targets), k)
    b = scorer.bonus.numpy()
    assert b[0] > b[1] > 0.5 and b[1] >= b[2] >= b[3] >= 0
    assert b[0] - b[1] > 0.5


def test_numpy_scores_agree_with_the_scorers() -> None:
    rng = np.random.default_rng(0)
    n, d, s, k = 500, 8, 4, 5
    pred = rng.normal(size=d + s).astype(np.float32)
    dyn = rng.normal(size=(n, d)).astype(np.float32)
    static = rng.normal(size=(n, s)).astype(np.float32)
    count = rng.integers(0, 50, n).astype(np.float64)
    trend = rng.random(n) * 10
    user = UserContext(np.array([7, 3, -1, 400, -1]), np.array([4, 1, 0, 2, 0]))
    history = HistoryScorer(
        torch.tensor(-0.3),
        torch.linspace(2.0, 0.5, k),
        torch.tensor(0.4),
        torch.tensor(0.7),
        torch.tensor(-0.2),
    )
    for scorer in (PlainScorer(), history):
        fast = numpy_scores(scorer)
        assert fast is not None
        got = fast(pred, dyn, static, count, trend, user)
        want = scorer.scores(
            torch.from_numpy(pred),
            torch.from_numpy(dyn),
            torch.from_numpy(static),
            count,
            trend,
            user,
        ).numpy()
        assert got.dtype == np.float32
        # The same float32 operations; only a sum's order may differ (a few ulps).
        np.testing.assert_allclose(
            got, want, rtol=0, atol=8 * float(np.spacing(np.abs(want).max()))
        )
        assert not np.array_equal(got, -got)  # a real score vector, not zeros


def test_a_scorer_without_a_numpy_twin_gets_none() -> None:
    class Other(PlainScorer):
        pass

    assert numpy_scores(Other()) is None


def test_log1p_count_is_numpys_for_every_count_below_two_million() -> None:
    # The served lists take log1p one count at a time, the scorer on arrays: bit for bit the
    # same, inside the table and past it.
    counts = np.arange(2_000_000)
    assert np.array_equal(
        np.log1p(counts.astype(np.float64)), [log1p_count(c) for c in counts.tolist()]
    )

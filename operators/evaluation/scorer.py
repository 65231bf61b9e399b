"""Candidate scorers: plain JODIE distance, or distance plus learned history and popularity terms.

Plain JODIE ranks items by −‖j̃ − [i, ī]‖². On the Wikipedia data most events repeat one of
the user's recent items, and the trained projection mostly points at the last item, so the
order of the other candidates carries little signal. ``HistoryScorer`` adds three learned
terms computed from bounded state the stream already keeps (the user's last K distinct items
with their per-user counts, and each item's event count):

    score_j = −α ‖j̃ − [j, j̄]‖² + b_pos(j) + β·log(1 + n_user,j) + γ·log(1 + n_j)
              + δ·log(1 + m_j(t))

b_pos is a bonus per history position (0 = last item), non-increasing by construction; n_user,j
is how often the user touched j while it stayed in the history; n_j is j's popularity so far
and m_j(t) its event count decayed with a one-day time constant (what is being edited now).
α, b, β, γ, δ are fitted by softmax cross-entropy over all known items on the last part of the
training split only (``fit_history_scorer``); a training run then raises b_0 by the margin
under which the lists served on the validation split score the highest served MRR
(``operators.training.run.fit_served_margin``). The JODIE weights are untouched. Variants are
injected through ``make_scorer``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import Tensor, nn

from operators.evaluation.context import UserContext
from operators.evaluation.ranker import LearnedRanker
from operators.model.config import ModelConfig, ScorerName
from operators.model.jodie import squared_distances


class Scorer(Protocol):
    """Scores n candidate items for one user query; higher is better."""

    def scores(
        self,
        pred: Tensor,
        item_dyn: Tensor,
        item_static: Tensor,
        item_count: np.ndarray,
        item_trend: np.ndarray,
        user: UserContext,
        item_last: np.ndarray | None = None,
    ) -> Tensor:
        """pred (d + s,), item_dyn (n, d), item_static (n, s), item_count (n,), item_trend (n,)
        (decayed counts at ``user.now``), item_last (n,) each item's last event time → (n,).

        A score may depend on one item's row and the user only, never on the other items, so
        that rows can be scored apart (``operators.evaluation.live`` relies on it)."""
        ...

    def tensors(self) -> dict[str, Tensor]:
        """Fitted parameters to store in the checkpoint (may be empty)."""
        ...


class PlainScorer:
    """JODIE as published: the negative squared L2 distance to [i(t), ī]."""

    def scores(
        self,
        pred: Tensor,
        item_dyn: Tensor,
        item_static: Tensor,
        item_count: np.ndarray,
        item_trend: np.ndarray,
        user: UserContext,
        item_last: np.ndarray | None = None,
    ) -> Tensor:
        return -squared_distances(pred, item_dyn, item_static)

    def tensors(self) -> dict[str, Tensor]:
        return {}


#: numpy's log1p of every count below 65,536, as Python floats, for ``log1p_count``.
_LOG1P_COUNTS: list[float] = np.log1p(np.arange(1 << 16, dtype=np.float64)).tolist()


def log1p_count(count: int) -> float:
    """numpy's log1p of one count, the double the scorers' array calls give: for paths that
    take it one count at a time, where a numpy call per scalar costs twenty times a list
    lookup. Not ``math.log1p``: the C library's and numpy's (a SIMD loop on recent CPUs)
    differ in the last bit on some counts, and a served score must equal the offline one."""
    if 0 <= count < len(_LOG1P_COUNTS):
        return _LOG1P_COUNTS[count]
    return float(np.log1p(np.float64(count)))


class HistoryScorer:
    """Distance scaled by α, plus history-position, per-user-count and popularity terms."""

    def __init__(
        self, log_alpha: Tensor, bonus: Tensor, beta: Tensor, gamma: Tensor, delta: Tensor
    ) -> None:
        self.log_alpha = log_alpha.detach().reshape(())  # α = exp(log α) > 0
        self.bonus = bonus.detach().reshape(-1)  # (K,) non-increasing in the position
        self.beta = beta.detach().reshape(())
        self.gamma = gamma.detach().reshape(())
        self.delta = delta.detach().reshape(())

    def scores(
        self,
        pred: Tensor,
        item_dyn: Tensor,
        item_static: Tensor,
        item_count: np.ndarray,
        item_trend: np.ndarray,
        user: UserContext,
        item_last: np.ndarray | None = None,
    ) -> Tensor:
        out = -self.log_alpha.exp() * squared_distances(pred, item_dyn, item_static)
        out = out + self.gamma * torch.from_numpy(np.log1p(item_count).astype(np.float32))
        out = out + self.delta * torch.from_numpy(np.log1p(item_trend).astype(np.float32))
        valid = user.history >= 0
        if valid.any():
            rows = torch.from_numpy(user.history[valid])
            extra = self.bonus[
                torch.from_numpy(np.flatnonzero(valid))
            ] + self.beta * torch.from_numpy(np.log1p(user.counts[valid]).astype(np.float32))
            out = out.index_add(0, rows, extra)
        return out

    def tensors(self) -> dict[str, Tensor]:
        return {
            "scorer.log_alpha": self.log_alpha.clone(),
            "scorer.bonus": self.bonus.clone(),
            "scorer.beta": self.beta.clone(),
            "scorer.gamma": self.gamma.clone(),
            "scorer.delta": self.delta.clone(),
        }


def make_scorer(config: ModelConfig, tensors: dict[str, Tensor] | None = None) -> Scorer:
    """The scorer named by ``config.scorer``, with its fitted parameters from ``tensors``.

    A history scorer or a ranker without fitted parameters (a plain-trained checkpoint)
    scores like plain.
    """
    t = tensors or {}
    zero = torch.zeros(())
    factories: dict[ScorerName, Callable[[], Scorer]] = {
        "plain": PlainScorer,
        "history": lambda: HistoryScorer(
            t.get("scorer.log_alpha", zero),
            t.get("scorer.bonus", torch.zeros(config.history_size)),
            t.get("scorer.beta", zero),
            t.get("scorer.gamma", zero),
            t.get("scorer.delta", zero),
        ),
        "ranker": lambda: _learned_ranker(t, config.history_size),
    }
    return factories[config.scorer]()


def _learned_ranker(tensors: dict[str, Tensor], history_size: int) -> Scorer:
    return LearnedRanker.from_tensors(tensors, history_size)


def fitted(config: ModelConfig, tensors: dict[str, Tensor]) -> bool:
    """Whether ``tensors`` hold the fitted parameters of the scorer ``config`` names."""
    marker = {"plain": None, "history": "scorer.bonus", "ranker": "scorer.ranker.item_weights"}
    key = marker[config.scorer]
    return key is None or key in tensors


@dataclass(frozen=True)
class ScorerSamples:
    """Features of E sampled events against n candidate items, for fitting."""

    dist2: np.ndarray  # (E, n) float32 squared distance, +inf where the item was unknown
    positions: np.ndarray  # (E, n) int64 history position, -1 outside the history
    user_counts: np.ndarray  # (E, n) float32 the user's events on the item (history only)
    item_counts: np.ndarray  # (E, n) float32 the item's events so far
    item_trends: np.ndarray  # (E, n) float32 the item's decayed event count at that time
    targets: np.ndarray  # (E,) int64 column of the true item


# Samples per autograd pass when fitting the scorer (bounds the fit's memory).
_FIT_CHUNK = 512


def fit_history_scorer(
    samples: ScorerSamples, history_size: int, steps: int = 200
) -> HistoryScorer:
    """Fit α, b, β, γ by maximising the softmax likelihood of the true item among known items.

    The bonus is parametrised as a reversed cumulative sum of softplus terms, so it is
    non-negative and never larger for an older position than for a more recent one: a
    monotone recency prior rather than a free table that could overfit sparse positions.
    """
    d = torch.from_numpy(samples.dist2)
    pos = torch.from_numpy(samples.positions)
    ucount = torch.from_numpy(np.log1p(samples.user_counts))
    icount = torch.from_numpy(np.log1p(samples.item_counts))
    itrend = torch.from_numpy(np.log1p(samples.item_trends))
    y = torch.from_numpy(samples.targets)
    finite = torch.isfinite(d)
    d = torch.where(finite, d, torch.zeros(()))
    log_alpha = torch.zeros((), requires_grad=True)
    raw = torch.full((history_size,), -2.0, requires_grad=True)
    beta = torch.zeros((), requires_grad=True)
    gamma = torch.zeros((), requires_grad=True)
    delta = torch.zeros((), requires_grad=True)

    def bonus() -> Tensor:
        return nn.functional.softplus(raw).flip(0).cumsum(0).flip(0)  # b_k = Σ_{j≥k} softplus

    optimizer = torch.optim.LBFGS(
        [log_alpha, raw, beta, gamma, delta], lr=0.5, max_iter=steps, line_search_fn="strong_wolfe"
    )

    n_samples = max(int(y.shape[0]), 1)

    def closure() -> Tensor:
        # The mean cross entropy over all samples, with its gradient accumulated chunk by
        # chunk: the autograd graph of one (E, n) pass would hold gigabytes of intermediates.
        optimizer.zero_grad()
        total = torch.zeros(())
        for lo in range(0, int(y.shape[0]), _FIT_CHUNK):
            hi = lo + _FIT_CHUNK
            padded = torch.cat([bonus(), torch.zeros(1)])  # position -1 reads the 0 at the end
            logits = (
                -log_alpha.exp() * d[lo:hi]
                + padded[pos[lo:hi]]
                + beta * ucount[lo:hi]
                + gamma * icount[lo:hi]
                + delta * itrend[lo:hi]
            )
            masked = logits.masked_fill(~finite[lo:hi], float("-inf"))
            loss = nn.functional.cross_entropy(masked, y[lo:hi], reduction="sum") / n_samples
            loss.backward()
            total = total + loss.detach()
        return total

    if samples.targets.size:
        optimizer.step(closure)
    with torch.no_grad():
        fitted = HistoryScorer(
            log_alpha.clone(), bonus().clone(), beta.clone(), gamma.clone(), delta.clone()
        )
    return fitted


class NumpyScores(Protocol):
    """``Scorer.scores`` on numpy arrays: pred (d + s,), item_dyn (n, d), item_static (n, s),
    item_count (n,), item_trend (n,), the user's context → (n,) float32. ``dist`` (n,): the
    squared distances to use instead of computing them (an approximation, see
    ``operators.evaluation.live``); a score moves by ``scale`` times a distance's error."""

    @property
    def scale(self) -> float: ...

    def __call__(
        self,
        pred: np.ndarray,
        item_dyn: np.ndarray,
        item_static: np.ndarray,
        item_count: np.ndarray,
        item_trend: np.ndarray,
        user: UserContext,
        dist: np.ndarray | None = None,
    ) -> np.ndarray: ...


@dataclass(frozen=True)
class _NumpyScores:
    scale: float
    alpha: np.float32
    bonus: np.ndarray | None  # None: plain distance
    beta: np.float32
    gamma: np.float32
    delta: np.float32

    def __call__(
        self,
        pred: np.ndarray,
        item_dyn: np.ndarray,
        item_static: np.ndarray,
        item_count: np.ndarray,
        item_trend: np.ndarray,
        user: UserContext,
        dist: np.ndarray | None = None,
    ) -> np.ndarray:
        if dist is None:
            d = item_dyn.shape[1]
            dist = np.square(item_dyn - pred[:d]).sum(axis=1) + np.square(
                item_static - pred[d:]
            ).sum(axis=1)
        if self.bonus is None:
            return -dist
        out = -self.alpha * dist
        out += self.gamma * np.log1p(item_count).astype(np.float32)
        out += self.delta * np.log1p(item_trend).astype(np.float32)
        valid = user.history >= 0
        if valid.any():
            positions = np.flatnonzero(valid)
            extra = self.bonus[positions] + self.beta * np.log1p(user.counts[valid]).astype(
                np.float32
            )
            np.add.at(out, user.history[valid], extra)
        return out


def numpy_scores(scorer: Scorer) -> NumpyScores | None:
    """The same arithmetic as ``scorer.scores`` in numpy, for the scorers defined here; None
    for any other (its own ``scores`` is then the one to call).

    A stream ranks one query against every item a few hundred times a second; torch's
    per-operation dispatch costs more there than the arithmetic. The float32 operations are
    the same, so scores agree with the torch ones to the order of a sum's rounding.
    """

    if type(scorer) is PlainScorer:
        one = np.float32(1.0)
        return _NumpyScores(1.0, one, None, one, one, one)
    if type(scorer) is not HistoryScorer:
        return None
    history: HistoryScorer = scorer
    alpha = np.float32(history.log_alpha.exp().item())
    return _NumpyScores(
        float(alpha),
        alpha,
        history.bonus.numpy().astype(np.float32),
        np.float32(history.beta.item()),
        np.float32(history.gamma.item()),
        np.float32(history.delta.item()),
    )

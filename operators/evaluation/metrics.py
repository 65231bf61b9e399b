"""Ranking and classification metrics: rank of the true item, MRR, Recall@k, ROC AUC."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np
from torch import Tensor


def rank_of(scores: Tensor, true_index: int) -> int:
    """1 + the number of candidates scored strictly higher than the true one (ties favour it)."""
    return 1 + int((scores > scores[true_index]).sum())


def mrr(ranks: np.ndarray) -> float:
    """Mean reciprocal rank; NaN for no events."""
    r = np.asarray(ranks, dtype=np.float64)
    return float(np.mean(1.0 / r)) if r.size else float("nan")


def recall_at_k(ranks: np.ndarray, k: int = 10) -> float:
    """Share of events whose true item ranks within the top k; NaN for no events."""
    r = np.asarray(ranks)
    return float(np.mean(r <= k)) if r.size else float("nan")


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann–Whitney U, ties count one half); NaN if one class only."""
    y = np.asarray(labels).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    n_pos = int(y.sum())
    n_neg = int(y.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    ranks = np.empty(s.size, dtype=np.float64)
    # average 1-based rank over each run of tied scores
    starts = np.flatnonzero(np.r_[True, sorted_s[1:] != sorted_s[:-1]])
    ends = np.r_[starts[1:], s.size]
    avg = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(avg, ends - starts)
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def summary(ranks: np.ndarray, k: int = 10) -> dict[str, float]:
    return {"mrr": mrr(ranks), f"recall_at_{k}": recall_at_k(ranks, k)}


@dataclass
class RollingRanks:
    """The live evaluation's running figures: MRR and Recall@10 overall and over a window."""

    window: int = 1000
    count: int = 0
    sum_reciprocal: float = 0.0
    hits_at_10: int = 0
    recent: deque[int] = field(default_factory=deque)

    def add(self, rank: int) -> None:
        self.count += 1
        self.sum_reciprocal += 1.0 / rank
        self.hits_at_10 += rank <= 10
        self.recent.append(rank)
        if len(self.recent) > self.window:
            self.recent.popleft()

    def summary(self) -> dict[str, float | int]:
        nan = float("nan")
        window = np.fromiter(self.recent, dtype=np.int64, count=len(self.recent))
        return {
            "events": self.count,
            "mrr": self.sum_reciprocal / self.count if self.count else nan,
            "recall_at_10": self.hits_at_10 / self.count if self.count else nan,
            "window": int(window.size),
            "window_mrr": mrr(window),
            "window_recall_at_10": recall_at_k(window, 10),
        }

"""Hand-computed metric values."""

import math

import numpy as np
import torch

from operators.evaluation.metrics import mrr, rank_of, recall_at_k, roc_auc


def test_rank_counts_only_strictly_better_candidates() -> None:
    scores = torch.tensor([0.5, 0.9, 0.5, 0.1, 0.9])
    assert rank_of(scores, 0) == 3  # two items at 0.9 beat it; the tie at 0.5 does not
    assert rank_of(scores, 1) == 1
    assert rank_of(scores, 3) == 5


def test_mrr_and_recall() -> None:
    ranks = np.array([1, 2, 4, 20])
    assert math.isclose(mrr(ranks), (1 + 0.5 + 0.25 + 0.05) / 4)
    assert recall_at_k(ranks, 10) == 0.75
    assert recall_at_k(ranks, 1) == 0.25
    assert math.isnan(mrr(np.array([], dtype=int)))


def test_auc_hand_computed_with_ties() -> None:
    labels = np.array([0, 0, 1, 1, 0, 1])
    scores = np.array([0.1, 0.4, 0.35, 0.8, 0.35, 0.9])
    # positive/negative pairs: (0.35 vs 0.1 win, 0.4 loss, 0.35 tie) = 1.5; 0.8 wins 3; 0.9 wins 3
    assert math.isclose(roc_auc(labels, scores), 7.5 / 9)
    assert roc_auc(np.array([1, 0]), np.array([0.2, 0.7])) == 0.0
    assert math.isnan(roc_auc(np.array([0, 0]), np.array([0.2, 0.7])))

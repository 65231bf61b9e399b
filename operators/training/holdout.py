"""Retraining on the newest events: fit on everything but a short recent hold-out, and judge a
candidate against the serving version on that same hold-out, both scored the same way.

A retrain from the log used to fit on the first 80 % of the replayed window and only replay
the newest 20 % through states, and it compared its validation figure with one the serving
version had measured on an older window. Here:

- ``holdout_config``: the training split is every event but the last ``h``; those ``h`` are
  the validation split (they also pick the best epoch) and there is no test split;
- ``holdout_score``: a version's MRR on the hold-out under the frozen protocol with the
  version's own default ranker — what it would serve — from its states just before the
  hold-out. The serving version's states get there from its checkpoint's log position by the
  catch-up a worker runs (``operators.protocol.catchup``), so both are judged on the same
  events from the same log, by the same code.

If the serving version's states already include events of the hold-out (it was trained on a
later window), both are judged on the part after its log position instead.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from operators.dataset import InteractionLog
from operators.evaluation.metrics import mrr, recall_at_k
from operators.evaluation.protocols import frozen_replay
from operators.evaluation.scorer import Scorer
from operators.model.checkpoint import Checkpoint
from operators.model.config import TrainConfig
from operators.model.jodie import Jodie
from operators.model.state import States
from operators.protocol.catchup import CatchUp, LogEvent, log_position
from operators.training.run import advance


def holdout_size(n_events: int, holdout: int) -> int:
    """Events held out of ``n_events``: ``holdout``, at most a fifth, at least one."""
    return max(1, min(holdout, n_events // 5))


def holdout_config(config: TrainConfig, n_events: int, holdout: int) -> TrainConfig:
    """``config`` whose split trains on all but the last ``holdout_size`` events and
    validates on those (no test split)."""
    h = holdout_size(n_events, holdout)
    # Half an event of slack: Split.of truncates n × fraction, which float rounding could
    # otherwise put one event short.
    train = (n_events - h + 0.5) / n_events
    return replace(config, train_fraction=train, valid_fraction=h / n_events)


@dataclass(frozen=True)
class HoldoutScore:
    """A version's figures on the hold-out (default ranker, frozen protocol)."""

    mrr: float
    recall_at_10: float
    n_events: int
    first_seq: int  # the hold-out's first log position


def holdout_score(
    model: Jodie, states: States, scorer: Scorer, log: InteractionLog, first_seq: int
) -> HoldoutScore:
    """Frozen replay of ``log`` (the hold-out, from log position ``first_seq``) from
    ``states`` (left as they are), ranked by ``scorer`` (the version's default ranker,
    ``make_scorer(config, scorer tensors)``)."""
    with torch.no_grad():
        ranks, _ = frozen_replay(model.eval(), states.copy(), log, scorer)
    return HoldoutScore(mrr(ranks), recall_at_k(ranks, 10), int(ranks.shape[0]), first_seq)


def caught_up(ckpt: Checkpoint, log: InteractionLog, seqs: np.ndarray, until_seq: int) -> States:
    """The checkpoint's states advanced over the log from its own position to ``until_seq``
    (exclusive), as a worker's catch-up does; ``seqs`` gives each row's log position."""
    cu = CatchUp(ckpt)
    start = log_position(ckpt)
    lo, hi = np.searchsorted(seqs, [start, until_seq])
    feats = log.features if log.n_features else None
    for row in range(int(lo), int(hi)):
        cu.offer(
            LogEvent(
                int(seqs[row]),
                str(log.user_ids[row]),
                str(log.item_ids[row]),
                float(log.timestamps[row]),
                tuple(float(x) for x in feats[row]) if feats is not None else (),
            )
        )
    cu.advance(until_seq)
    if cu.next_seq < until_seq and hi > lo:
        raise ValueError(
            f"the log has a gap between seq {cu.next_seq} and {until_seq}: cannot bring "
            "the serving version's states to the hold-out"
        )
    return cu.states


def advanced(model: Jodie, states: States, log: InteractionLog) -> States:
    """A copy of ``states`` after ``log``'s events with frozen weights."""
    out = states.copy()
    advance(model, out, log)
    return out

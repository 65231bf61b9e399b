"""Checkpoints of random weights, for tests and benchmarks whose figures do not depend on
the model's quality (exactness, latency, memory).

The weights are drawn from a seed; the ranker is the history scorer (or the learned ranker)
with fixed terms that exercise its history, count and popularity parts, not just the
distance; the states are those of the first rows of the bundled Wikipedia log, as a
checkpoint trained on them would hold.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from operators.dataset import bundled_wikipedia, load_interactions
from operators.model.checkpoint import EntitySeqs, save_checkpoint
from operators.model.config import ModelConfig, TrainConfig
from operators.model.jodie import Jodie
from operators.model.online import OnlineJodie
from operators.model.state import States

#: Δ statistics of the order of Wikipedia's (seconds between a user's or an item's events).
WIKIPEDIA_DELTAS = ModelConfig(
    delta_user_mean=20_000.0,
    delta_user_std=50_000.0,
    delta_item_mean=3_000.0,
    delta_item_std=10_000.0,
)


def fixed_history_scorer(history_size: int) -> dict[str, Tensor]:
    """The history scorer's parameters as a fit might leave them."""
    return {
        "scorer.log_alpha": torch.tensor(-0.7),
        "scorer.bonus": torch.linspace(3.0, 0.2, history_size),
        "scorer.beta": torch.tensor(0.4),
        "scorer.gamma": torch.tensor(0.3),
        "scorer.delta": torch.tensor(0.5),
    }


def fixed_learned_ranker(history_size: int, seed: int = 0) -> dict[str, Tensor]:
    """The learned ranker's parameters (``operators.evaluation.ranker.RankerNet``, by their
    checkpoint keys: this package may not import the evaluation one) as a fit might leave
    them: every part non-zero — distance, item terms, the history entries' weights and eight
    hidden units over them and the user's habits — the hidden layer drawn from ``seed``."""
    hidden, width = 8, history_size + 2  # entries: position one-hot, count, time
    inputs = width + 7 + 3 + 1  # entry, user, item, distance
    generator = torch.Generator().manual_seed(seed)
    prefix = "scorer.ranker."
    return {
        f"{prefix}log_alpha": torch.tensor(-0.7),
        f"{prefix}item_weights": torch.tensor([0.3, 0.5, 1.5]),
        f"{prefix}entry_weights": torch.cat(
            [torch.linspace(3.0, 0.2, history_size), torch.tensor([0.4, 1.0])]
        ),
        f"{prefix}mlp.0.weight": 0.5 * torch.randn(hidden, inputs, generator=generator),
        f"{prefix}mlp.0.bias": 0.5 * torch.randn(hidden, generator=generator),
        f"{prefix}mlp.2.weight": 0.5 * torch.randn(1, hidden, generator=generator),
        f"{prefix}mlp.2.bias": 0.5 * torch.randn(1, generator=generator),
    }


def synthetic_checkpoint(
    out: Path,
    history: int = 0,
    *,
    version: str = "synthetic",
    seed: int = 0,
    with_seqs: bool = False,
    config: ModelConfig = WIKIPEDIA_DELTAS,
    fixed_scorer: bool = True,
) -> Path:
    """Write to ``out`` a checkpoint of weights drawn from ``seed`` whose states have seen the
    first ``history`` rows of the bundled Wikipedia log (none: every entity starts from the
    model's initial state).

    ``with_seqs``: record each entity's last seq, as a checkpoint replayed from a log that
    holds those rows (seq = row) does; only such a checkpoint is at a log position.
    ``fixed_scorer``: the history scorer with ``fixed_history_scorer``'s terms, or with
    ``config.scorer`` "ranker" the learned ranker with ``fixed_learned_ranker``'s (otherwise
    their initial ones).
    """
    torch.manual_seed(seed)
    model = Jodie(config)
    states = States.empty(
        config.embedding_dim, config.user_static_dim, config.item_static_dim, config.history_size
    )
    online = OnlineJodie(model, states)
    rows = _first_rows(history)
    for user, item, t in rows:
        online.observe(user, item, t)
    seqs = None
    if with_seqs:
        users, items = online.states.users, online.states.items
        seqs = EntitySeqs(np.full(len(users), -1, np.int64), np.full(len(items), -1, np.int64))
        for k, (user, item, _t) in enumerate(rows):
            seqs.users[users.row(user)] = k
            seqs.items[items.row(item)] = k
    offsets = {"events": history, **({"seq": history} if with_seqs else {})}
    save_checkpoint(
        out,
        model,
        online.states,
        TrainConfig(model=config),
        None
        if not fixed_scorer
        else fixed_learned_ranker(config.history_size, seed)
        if config.scorer == "ranker"
        else fixed_history_scorer(config.history_size),
        meta={"version": version, "log_offsets": offsets},
        last_seq=seqs,
    )
    return out


def _first_rows(n: int) -> list[tuple[str, str, float]]:
    """(user, item, timestamp) of the bundled log's first ``n`` rows (not read for none)."""
    if n == 0:
        return []
    log = load_interactions(bundled_wikipedia())
    return [(log.user_ids[k], log.item_ids[k], float(log.timestamps[k])) for k in range(n)]

"""t-batch trainer of JODIE: truncated back-propagation per timespan, validation, best epoch."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from operators.dataset import InteractionLog
from operators.evaluation.protocols import frozen_validation_mrr
from operators.model.config import ModelConfig, TrainConfig
from operators.model.events import EncodedEvents, encode
from operators.model.fused import TrainPlan, train_spans
from operators.model.jodie import Jodie
from operators.model.kernel import batched, replay, state_class_weight
from operators.model.state import States
from operators.model.tbatch import default_timespan


class Progress(Protocol):
    """What a caller may show while training runs (the CLI draws a progress bar)."""

    def start(self, epochs: int, spans: int) -> None: ...

    def span(self, span: int, loss: float) -> None: ...

    def epoch_done(self, epoch: int, loss: float, mrr: float, seconds: float) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Split:
    """Chronological split points: train [0, train_end), valid [.., valid_end), test [.., N)."""

    train_end: int
    valid_end: int
    n: int

    @classmethod
    def of(cls, n: int, train_fraction: float = 0.8, valid_fraction: float = 0.1) -> Split:
        return cls(int(n * train_fraction), int(n * (train_fraction + valid_fraction)), n)

    def bounds(self, name: str) -> tuple[int, int]:
        return {
            "train": (0, self.train_end),
            "valid": (self.train_end, self.valid_end),
            "test": (self.valid_end, self.n),
        }[name]


def delta_statistics(ev: EncodedEvents, config: ModelConfig) -> ModelConfig:
    """Config with Δ mean/std measured on these (training) events only."""

    def stats(x: np.ndarray) -> tuple[float, float]:
        std = float(x.std()) if x.size else 1.0
        return float(x.mean()) if x.size else 0.0, std if std > 0 else 1.0

    mu, su = stats(ev.gap_user)
    mi, si = stats(ev.gap_item)
    return config.with_(
        delta_user_mean=mu, delta_user_std=su, delta_item_mean=mi, delta_item_std=si
    )


@dataclass
class TrainResult:
    """The trained model, its states after the training split, and the run's record."""

    model: Jodie
    states: States
    config: TrainConfig
    split: Split
    timespan: float
    best_epoch: int
    curves: dict[str, list[float]] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)


def train(
    log: InteractionLog,
    config: TrainConfig,
    validate: Callable[[Jodie, States], float] | None = None,
    progress: Progress | None = None,
) -> TrainResult:
    """Train JODIE on the first ``train_fraction`` of ``log`` with t-batches (``_train``).

    Denormal floats slow small CPU matmuls several-fold, so they are flushed while training;
    the flag is process-wide, so it is cleared again afterwards: a trainer running beside
    other code must not change its floating-point arithmetic.
    """
    torch.set_flush_denormal(True)
    try:
        return _train(log, config, validate, progress)
    finally:
        torch.set_flush_denormal(False)


def _train(
    log: InteractionLog,
    config: TrainConfig,
    validate: Callable[[Jodie, States], float] | None,
    progress: Progress | None,
) -> TrainResult:
    """Train JODIE on the first ``train_fraction`` of ``log`` with t-batches.

    Each epoch: reset states, run all spans (every event, including those after the last
    span boundary), then replay the training split without gradients so the states match the
    epoch's final weights, and call ``validate(model, states_copy)`` (frozen validation MRR by
    default, see ``operators.evaluation.protocols``). The best epoch's weights and states are
    returned.
    """
    torch.set_num_threads(config.threads)
    seed_everything(config.seed)
    split = Split.of(len(log), config.train_fraction, config.valid_fraction)
    mcfg = config.model
    states = States.empty(
        mcfg.embedding_dim, mcfg.user_static_dim, mcfg.item_static_dim, max(1, mcfg.history_size)
    )
    train_log = log.slice(0, split.train_end)
    ev = encode(train_log, states)
    mcfg = delta_statistics(ev, mcfg.with_(n_features=train_log.n_features))
    timespan = default_timespan(train_log.timestamps, config.n_spans)
    data = batched(ev, mcfg, timespan)
    plan = TrainPlan.of(data.ev, data.evt, data.tb.bounds)  # the same for every epoch
    model = Jodie(mcfg)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    weight = state_class_weight(ev.labels) if mcfg.state_change else None
    valid_log = log.slice(split.train_end, split.valid_end)
    check = validate or (lambda m, s: frozen_validation_mrr(m, s, valid_log))

    curves: dict[str, list[float]] = {"loss": [], "valid_mrr": [], "epoch_seconds": []}
    best = (-math.inf, -1, copy.deepcopy(model.state_dict()))
    if progress is not None:
        progress.start(config.epochs, data.tb.n_spans)
    try:
        for epoch in range(config.epochs):
            started = time.perf_counter()
            model.train()
            states.reset()
            loss = train_spans(
                model,
                states,
                data.ev,
                data.evt,
                data.tb.bounds,
                data.tb.span_bounds,
                optimizer,
                plan,
                weight,
                on_span=None if progress is None else progress.span,
                # The epoch's pass feeds only the loss and the plain validation (distances);
                # the states returned are replayed below with every scorer's bookkeeping. A
                # caller's own ``validate`` may score with a history: it gets them.
                bookkeeping=validate is not None,
            )
            seconds = time.perf_counter() - started
            # Validate from the states this epoch's pass left, as the reference does; the
            # returned states are recomputed below with the chosen weights.
            mrr = check(model, states.copy())
            curves["loss"].append(loss)
            curves["valid_mrr"].append(mrr)
            curves["epoch_seconds"].append(seconds)
            if progress is not None:
                progress.epoch_done(epoch, loss, mrr, seconds)
            if mrr > best[0]:
                best = (mrr, epoch, copy.deepcopy(model.state_dict()))
    finally:
        if progress is not None:
            progress.close()
    model.load_state_dict(best[2])
    model.eval()
    # Weights and states belong together: the checkpoint's states are those the chosen
    # weights give on the training split (no-grad t-batch replay), not the states left by an
    # epoch whose weights moved while it ran.
    states.reset()
    replay(model, states, data)
    return TrainResult(
        model=model,
        states=states,
        config=TrainConfig.from_dict({**config.to_dict(), "model": mcfg.to_dict()}),
        split=split,
        timespan=timespan,
        best_epoch=best[1],
        curves=curves,
        metrics={"valid_mrr_frozen": best[0]},
    )

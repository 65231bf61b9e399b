"""End-to-end training run: t-batch training, scorer fitting on the training split, checkpoint."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from operators.config import TrainConfig
from operators.dataset import InteractionLog, file_fingerprint
from operators.evaluate import frozen_validation_mrr, scorer_samples
from operators.events import encode
from operators.model import Jodie
from operators.scorer import fit_history_scorer
from operators.state import States
from operators.train import TrainResult, batched, replay, save_curves, train

#: Share of the training split, at its end, on which the history scorer is fitted.
SCORER_FIT_FRACTION = 0.2


@dataclass
class RunResult:
    """A finished run: the trained result, the fitted scorer parameters, the checkpoint path."""

    result: TrainResult
    scorer_tensors: dict[str, Tensor]
    checkpoint: Path | None


def fit_scorer(model: Jodie, train_log: InteractionLog, timespan: float) -> dict[str, Tensor]:
    """Fit the history scorer on the last SCORER_FIT_FRACTION of the training split.

    States for the fit come from a replay of the earlier training events; the fit events are
    then replayed sequentially with frozen weights, exactly as at serving time. Validation
    and test events are never used.
    """
    mcfg = model.config
    states = States.empty(
        mcfg.embedding_dim, mcfg.user_static_dim, mcfg.item_static_dim, max(1, mcfg.history_size)
    )
    cut = int(len(train_log) * (1.0 - SCORER_FIT_FRACTION))
    head = train_log.slice(0, cut)
    replay(model, states, batched(encode(head, states), mcfg, timespan))
    samples = scorer_samples(model, states, train_log.slice(cut, len(train_log)))
    scorer = fit_history_scorer(samples, mcfg.history_size)
    return scorer.tensors()


def run_training(
    log: InteractionLog,
    config: TrainConfig,
    out_dir: str | Path | None = None,
    data_path: str | Path | None = None,
) -> RunResult:
    """Train, fit the scorer when the config asks for it, and write a checkpoint to ``out_dir``."""
    from operators.checkpoint import save_checkpoint

    started = time.perf_counter()
    result = train(log, config)
    scorer_tensors: dict[str, Tensor] = {}
    if result.model.config.scorer == "history":
        scorer_tensors = fit_scorer(
            result.model, log.slice(0, result.split.train_end), result.timespan
        )
    valid = log.slice(result.split.train_end, result.split.valid_end)
    with torch.no_grad():
        result.metrics["valid_mrr_frozen_checkpoint_states"] = frozen_validation_mrr(
            result.model, result.states.copy(), valid
        )
    result.metrics["train_seconds"] = time.perf_counter() - started
    path: Path | None = None
    if out_dir is not None:
        meta: dict[str, Any] = {
            "data_fingerprint": file_fingerprint(data_path) if data_path else None,
            "data_path_name": Path(data_path).name if data_path else None,
            "split": {
                "train": [0, result.split.train_end],
                "valid": [result.split.train_end, result.split.valid_end],
                "test": [result.split.valid_end, result.split.n],
            },
            # The states are those after the first `train_end` events of the log.
            "log_offsets": {"events": result.split.train_end},
            "timespan": result.timespan,
            "best_epoch": result.best_epoch,
            "metrics": result.metrics,
            "curves": result.curves,
        }
        path = save_checkpoint(
            out_dir, result.model, result.states, result.config, scorer_tensors, meta
        )
        save_curves(result.curves, path)
    return RunResult(result, scorer_tensors, path)

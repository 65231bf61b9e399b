"""t-batch trainer of JODIE: truncated back-propagation per timespan, validation, best epoch."""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from operators.dataset import InteractionLog
from operators.model.config import ModelConfig, TrainConfig
from operators.model.events import EncodedEvents, EventTensors, encode
from operators.model.jodie import Jodie, target_embedding
from operators.model.state import EntityStore, States
from operators.model.tbatch import TBatches, default_timespan, span_ids, tbatch

#: Called before a batch's states are updated: (event slice, j̃ (B, d+s) detached, u_new).
PredictHook = Callable[[slice, Tensor, Tensor], None]


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


def state_class_weight(labels: np.ndarray) -> Tensor | None:
    """Class weights [1, n_neg/n_pos] for the rare state-change class (as the reference)."""
    n_pos = int((labels == 1).sum())
    if n_pos == 0:
        return None
    return torch.tensor([1.0, (labels.size - n_pos) / n_pos])


class _SpanPool:
    """This span's new states, kept with their autograd history.

    The store holds plain values; reading an entity updated earlier in the span must come from
    here instead, so that gradients flow across the span's t-batches (truncated BPTT). Row 0 is
    the learned initial vector, read by never-seen entities. The pool is small (one span) and is
    dropped at the span end, which is where the truncation happens.
    """

    def __init__(self, initial: Tensor, n_rows: int) -> None:
        self.parts: list[Tensor] = [initial.unsqueeze(0)]  # (1, d)
        self.size = 1
        self.latest = np.full(n_rows, -1, dtype=np.int64)

    def gather(self, store: EntityStore, rows: np.ndarray) -> Tensor:
        """States of ``rows`` (B,), -1 meaning "no entity" (initial vector); (B, d)."""
        safe = np.maximum(rows, 0)
        src = self.latest[safe]
        src[(rows < 0) | store.fresh(safe)] = 0
        base = store._emb[torch.from_numpy(safe)]  # (B, d) values from before this span
        use = src >= 0
        if not use.any():
            return base
        if len(self.parts) > 1:
            self.parts = [torch.cat(self.parts)]
        picked = self.parts[0][torch.from_numpy(np.maximum(src, 0))]
        return torch.where(torch.from_numpy(use).unsqueeze(1), picked, base)

    def push(self, rows: np.ndarray, out: Tensor) -> None:
        self.latest[rows] = self.size + np.arange(rows.shape[0])
        self.parts.append(out)
        self.size += rows.shape[0]


def _read(store: EntityStore, rows: np.ndarray, *, initial: Tensor) -> Tensor:
    """No-grad read of states (B,), -1 or fresh → initial; (B, d)."""
    safe = np.maximum(rows, 0)
    out = store._emb[torch.from_numpy(safe)]
    fresh = (rows < 0) | store.fresh(safe)
    if fresh.any():
        out[torch.from_numpy(fresh)] = initial.detach()
    return out


def run_spans(
    model: Jodie,
    states: States,
    ev: EncodedEvents,
    evt: EventTensors,
    bounds: np.ndarray,
    span_bounds: np.ndarray,
    optimizer: torch.optim.Optimizer | None,
    state_weight: Tensor | None = None,
    on_predict: PredictHook | None = None,
    on_span: Callable[[int, float], None] | None = None,
) -> float:
    """Apply batches ``[bounds[b], bounds[b+1])`` of ``ev`` (already in batch order) to ``states``.

    Batches are grouped into spans by ``span_bounds``. With an optimizer, each span's summed
    batch losses are back-propagated and the optimizer steps at the span end (gradient cut
    there); without one, this is a no-grad replay. Returns the total loss.
    """
    train = optimizer is not None
    users, items = states.users, states.items
    total = 0.0
    with torch.set_grad_enabled(train):
        for s in range(span_bounds.shape[0] - 1):
            u_init, i_init = model.initial_user(), model.initial_item()
            read_u: Callable[[np.ndarray], Tensor]
            read_i: Callable[[np.ndarray], Tensor]
            if train:
                u_pool = _SpanPool(u_init, len(users))
                i_pool = _SpanPool(i_init, len(items))
                read_u = partial(u_pool.gather, users)
                read_i = partial(i_pool.gather, items)
            else:
                read_u = partial(_read, users, initial=u_init)
                read_i = partial(_read, items, initial=i_init)

            span_loss: Tensor | None = None
            for b in range(int(span_bounds[s]), int(span_bounds[s + 1])):
                sl = slice(int(bounds[b]), int(bounds[b + 1]))
                u, i, p = ev.user_rows[sl], ev.item_rows[sl], ev.prev_item[sl]
                du, di, f = evt.delta_user[sl], evt.delta_item[sl], evt.features[sl]
                u_prev = read_u(u)  # (B, d)
                i_prev = read_i(i)  # (B, d)
                p_dyn = read_i(p)  # (B, d) current state of the user's previous item
                p_static = items._static[torch.from_numpy(np.maximum(p, 0))]
                if (p < 0).any():
                    p_static = p_static * torch.from_numpy(p >= 0).unsqueeze(1)
                u_static = users._static[torch.from_numpy(u)]
                i_static = items._static[torch.from_numpy(i)]
                pred = model.predict(model.project(u_prev, du), u_static, p_dyn, p_static)
                u_new = model.update_user(u_prev, i_prev, du, f)
                i_new = model.update_item(i_prev, u_prev, di, f)
                if on_predict is not None:
                    on_predict(sl, pred.detach(), u_new.detach())
                if train:
                    logits = (
                        model.state_change_logits(u_new) if model.state_head is not None else None
                    )
                    loss = model.loss(
                        pred,
                        target_embedding(i_prev, i_static),
                        u_new,
                        u_prev,
                        i_new,
                        i_prev,
                        logits,
                        evt.labels[sl] if logits is not None else None,
                        state_weight,
                    )
                    span_loss = loss if span_loss is None else span_loss + loss
                    u_pool.push(u, u_new)
                    i_pool.push(i, i_new)
                t = ev.timestamps[sl]
                users.update(u, u_new, t, items=i)
                items.update(i, i_new, t)
            if train and span_loss is not None:
                assert optimizer is not None
                optimizer.zero_grad(set_to_none=True)
                span_loss.backward()
                optimizer.step()
                value = float(span_loss.detach())
                total += value
                if on_span is not None:
                    on_span(s, value)
            states.detach()
    return total


@dataclass(frozen=True)
class Batched:
    """Training events reordered batch by batch, with their t-batch layout."""

    ev: EncodedEvents
    evt: EventTensors
    tb: TBatches


def batched(ev: EncodedEvents, config: ModelConfig, timespan: float) -> Batched:
    tb = tbatch(ev.user_rows, ev.item_rows, ev.timestamps, timespan)
    ordered = ev.take(tb.order)
    return Batched(ordered, EventTensors.of(ordered, config), tb)


def replay(model: Jodie, states: States, data: Batched) -> None:
    """No-grad t-batch replay: the states that ``model``'s weights give after these events."""
    model.eval()
    run_spans(model, states, data.ev, data.evt, data.tb.bounds, data.tb.span_bounds, None)


def sequential_layout(timestamps: np.ndarray, timespan: float) -> tuple[np.ndarray, np.ndarray]:
    """One event per batch, spans by the reference rule: (bounds, span_bounds)."""
    n = timestamps.shape[0]
    bounds = np.arange(n + 1, dtype=np.int64)
    spans = span_ids(timestamps, timespan)
    change = np.flatnonzero(np.r_[True, spans[1:] != spans[:-1]]) if n else np.zeros(0, np.int64)
    return bounds, np.r_[change, n].astype(np.int64)


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
) -> TrainResult:
    """Train JODIE on the first ``train_fraction`` of ``log`` with t-batches (``_train``).

    Denormal floats slow small CPU matmuls several-fold, so they are flushed while training;
    the flag is process-wide, so it is cleared again afterwards: a trainer running beside
    other code must not change its floating-point arithmetic.
    """
    torch.set_flush_denormal(True)
    try:
        return _train(log, config, validate)
    finally:
        torch.set_flush_denormal(False)


def _train(
    log: InteractionLog,
    config: TrainConfig,
    validate: Callable[[Jodie, States], float] | None = None,
) -> TrainResult:
    """Train JODIE on the first ``train_fraction`` of ``log`` with t-batches.

    Each epoch: reset states, run all spans (every event, including those after the last
    span boundary), then replay the training split without gradients so the states match the
    epoch's final weights, and call ``validate(model, states_copy)`` (frozen validation MRR by
    default, see ``operators.evaluation.protocols``). The best epoch's weights and states are
    returned.
    """
    from operators.evaluation.protocols import (
        frozen_validation_mrr,  # evaluate builds on this module
    )

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
    model = Jodie(mcfg)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    weight = state_class_weight(ev.labels) if mcfg.state_change else None
    valid_log = log.slice(split.train_end, split.valid_end)
    check = validate or (lambda m, s: frozen_validation_mrr(m, s, valid_log))

    curves: dict[str, list[float]] = {"loss": [], "valid_mrr": [], "epoch_seconds": []}
    best = (-math.inf, -1, copy.deepcopy(model.state_dict()))
    progress = _Progress(config.epochs, data.tb.n_spans, enabled=config.progress)
    with progress:
        for epoch in range(config.epochs):
            started = time.perf_counter()
            model.train()
            states.reset()
            loss = run_spans(
                model,
                states,
                data.ev,
                data.evt,
                data.tb.bounds,
                data.tb.span_bounds,
                optimizer,
                weight,
                on_span=progress.span,
            )
            seconds = time.perf_counter() - started
            # Validate from the states this epoch's pass left, as the reference does; the
            # returned states are recomputed below with the chosen weights.
            mrr = check(model, states.copy())
            curves["loss"].append(loss)
            curves["valid_mrr"].append(mrr)
            curves["epoch_seconds"].append(seconds)
            progress.epoch_done(epoch, loss, mrr, seconds)
            if mrr > best[0]:
                best = (mrr, epoch, copy.deepcopy(model.state_dict()))
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


class _Progress:
    """A rich progress bar over spans, with loss and epoch time in the description."""

    def __init__(self, epochs: int, spans: int, enabled: bool = True) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self.enabled = enabled
        self.spans = spans
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            disable=not enabled,
        )
        self._task = self._progress.add_task(f"epoch 1/{epochs}", total=spans)
        self.epochs = epochs
        self._loss = 0.0

    def __enter__(self) -> _Progress:
        self._progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.__exit__(None, None, None)

    def span(self, s: int, loss: float) -> None:
        self._loss += loss
        self._progress.update(self._task, completed=s + 1)

    def epoch_done(self, epoch: int, loss: float, mrr: float, seconds: float) -> None:
        self._progress.console.log(
            f"epoch {epoch + 1}/{self.epochs}: loss {loss:.2f}, valid MRR (frozen) {mrr:.4f}, "
            f"{seconds:.1f} s"
        ) if self.enabled else None
        self._loss = 0.0
        if epoch + 1 < self.epochs:
            self._progress.reset(
                self._task, total=self.spans, description=f"epoch {epoch + 2}/{self.epochs}"
            )


def save_curves(curves: dict[str, list[float]], out_dir: Path) -> tuple[Path, Path]:
    """Write training curves as JSON and PNG into ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "curves.json"
    json_path.write_text(json.dumps(curves, indent=2))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    epochs = np.arange(1, len(curves.get("loss", [])) + 1)
    ax1.plot(epochs, curves.get("loss", []), marker="o")
    ax1.set(xlabel="epoch", ylabel="training loss (sum over t-batches)", title="Training loss")
    ax2.plot(epochs, curves.get("valid_mrr", []), marker="o", color="tab:green")
    ax2.set(xlabel="epoch", ylabel="MRR", title="Validation MRR (frozen)")
    fig.tight_layout()
    png_path = out_dir / "curves.png"
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return json_path, png_path

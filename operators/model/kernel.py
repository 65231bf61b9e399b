"""The one event kernel: how a batch of events advances (user, item) states with given weights.

Every path that moves states which anything serves or scores goes through ``step``: the
trainer's no-grad replay that gives a checkpoint its states, the paper and frozen evaluation
protocols, the catch-up of a new model version, the offline replay and both sides of the
streaming workers. "The stream equals the offline replay" therefore holds because both run
this code on the same float32 inputs, not because two copies agree. The one exception is the
trainer's pass with gradients (``operators.model.fused``): it computes the same update with
fewer autograd nodes, equal up to float32 rounding (tested), and its states are replaced by
the replay's before anything uses them.

The per-event query (what the model predicts for an event before applying it, and what every
rank is computed against) is defined once, as the reference implementation does:

    j̃ = predict(project(u(t⁻), Δu), ū, p(t), p̄)

with p the user's previous item and p(t) **that item's current state at the event**: its
state after its own latest event before this one, which may be another user's event after
this user last touched it (the learned initial vector and a zero static when the user has
no previous item). The streaming workers compute it from item states versioned by log
position (``operators.evaluation.live``), so live ranks equal offline ranks.

**Quarantine.** An event whose inputs or update are not finite (a gap or a feature that
overflows float32, a state that would; ``admitted`` False for inputs the caller already found
unusable, such as a feature row of the wrong length) changes no embedding: ``step`` returns
both pre-event states for it and flags it in ``Step.quarantined``. Everything else about the
event stays as for any event — the entities' clocks move to its time and the item enters the
user's history, as the log says — so every path that replays the log (each calls ``step``)
quarantines the same events and keeps the same states. One event can therefore never put a
NaN into a state that every later event of its user and item would inherit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from torch import Tensor

from operators.model.config import ModelConfig
from operators.model.events import EncodedEvents, EventTensors
from operators.model.jodie import Jodie, target_embedding
from operators.model.state import EntityStore, States
from operators.model.tbatch import TBatches, span_ids, tbatch

#: Called before a batch's states are updated: (event slice, j̃ (B, d+s) detached, u_new).
PredictHook = Callable[[slice, Tensor, Tensor], None]


@dataclass(frozen=True)
class Step:
    """What ``step`` computes for B events from their pre-event states."""

    user: Tensor  # (B, d) u(t)
    item: Tensor  # (B, d) i(t)
    #: (B,) bool, True where the event was quarantined (states kept); None: none was.
    quarantined: np.ndarray | None = None


def query(
    model: Jodie, u: Tensor, delta: Tensor, u_static: Tensor, p_dyn: Tensor, p_static: Tensor
) -> tuple[Tensor, Tensor]:
    """(û, j̃) with û = project(u, Δ) and j̃ = predict(û, ū, p, p̄): u (B, d), Δ (B, 1),
    ū (B, s_u), p (B, d), p̄ (B, s_i) → (B, d), (B, d + s_i). The per-event query (u = u(t⁻),
    Δ = Δu, p = the previous item's current state) and the recommendation after the event
    (u = u(t), Δ = the horizon, p = the event's item)."""
    u_proj = model.project(u, delta)
    return u_proj, model.predict(u_proj, u_static, p_dyn, p_static)


def step(
    model: Jodie,
    u_prev: Tensor,
    i_prev: Tensor,
    delta_u: Tensor,
    delta_i: Tensor,
    features: Tensor,
    admitted: np.ndarray | None = None,
) -> Step:
    """Apply B events of distinct users and distinct items to their pre-event states.

    u_prev, i_prev (B, d); Δu, Δi (B, 1) standardised; f (B, F). Both updates read only the
    pre-event states (the reference's coupled update); the per-event query is ``query`` (see
    the module doc). ``admitted`` (B,) bool: False quarantines the event whatever its update
    gives.
    """
    u_new = model.update_user(u_prev, i_prev, delta_u, features)
    i_new = model.update_item(i_prev, u_prev, delta_i, features)
    ok = torch.isfinite(u_new).all(dim=1) & torch.isfinite(i_new).all(dim=1)
    # Saturating layers turn an infinite gap or feature into a finite but meaningless state,
    # so the inputs are checked as well as the result.
    ok &= torch.isfinite(torch.cat([delta_u, delta_i, features], dim=1)).all(dim=1)
    if admitted is not None:
        ok &= torch.from_numpy(np.asarray(admitted, dtype=bool))
    if bool(ok.all()):
        return Step(u_new, i_new)
    keep = ok.unsqueeze(1)
    return Step(
        torch.where(keep, u_new, u_prev),
        torch.where(keep, i_new, i_prev),
        (~ok).numpy().copy(),
    )


def feature_rows(
    rows: list[tuple[float, ...]] | list[np.ndarray], width: int
) -> tuple[Tensor, np.ndarray | None]:
    """(B, width) float32 features of B events and, when some row cannot be used, the
    ``admitted`` mask for ``step``. An empty row means "no features" (zeros), as everywhere;
    a row of another length is replaced by zeros and its event quarantined."""
    lengths = [len(r) for r in rows]
    if all(n == width for n in lengths):
        if width == 0:
            return torch.zeros(len(rows), 0), None
        return torch.from_numpy(np.asarray(rows, dtype=np.float32).reshape(len(rows), width)), None
    out = np.zeros((len(rows), width), dtype=np.float32)
    good = np.array([n in (0, width) for n in lengths], dtype=bool)
    for b, row in enumerate(rows):
        if lengths[b] == width:
            out[b] = np.asarray(row, dtype=np.float32)
    return torch.from_numpy(out), None if good.all() else good


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


def read_states(store: EntityStore, rows: np.ndarray, *, initial: Tensor) -> Tensor:
    """No-grad read of states (B,), -1 or fresh → initial; (B, d)."""
    safe = np.maximum(rows, 0)
    out = store._emb[torch.from_numpy(safe)]
    fresh = (rows < 0) | store.fresh(safe)
    if fresh.any():
        out[torch.from_numpy(fresh)] = initial.detach()
    return out


def query_inputs(
    users: EntityStore, items: EntityStore, u: np.ndarray, p: np.ndarray, p_dyn: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """(ū, p(t), p̄) of events with users ``u`` and previous items ``p`` (-1: none, a zero
    static), given the previous items' current states ``p_dyn``: the query's inputs after
    u(t⁻) and Δu."""
    p_static = items._static[torch.from_numpy(np.maximum(p, 0))]
    if (p < 0).any():
        p_static = p_static * torch.from_numpy(p >= 0).unsqueeze(1)
    return users._static[torch.from_numpy(u)], p_dyn, p_static


def span_loss(
    model: Jodie,
    users: EntityStore,
    items: EntityStore,
    ev: EncodedEvents,
    evt: EventTensors,
    span: slice,
    sizes: np.ndarray,
    states: tuple[Tensor, Tensor, Tensor, Tensor, Tensor],
    state_weight: Tensor | None,
) -> Tensor:
    """The summed t-batch losses of a span's events ``span`` (t-batches of ``sizes``), given
    their (u(t⁻), i(t⁻), p(t), u(t), i(t)), each (m, d): the query j̃ = predict(project(u(t⁻),
    Δu), ū, p(t), p̄) against [i(t⁻), ī], the state-change head on u(t), ``Jodie.loss``."""
    u_prev, i_prev, p_dyn, u_new, i_new = states
    u, i, p = ev.user_rows[span], ev.item_rows[span], ev.prev_item[span]
    pred = query(model, u_prev, evt.delta_user[span], *query_inputs(users, items, u, p, p_dyn))[1]
    logits = model.state_change_logits(u_new) if model.state_head is not None else None
    return model.loss(
        pred,
        target_embedding(i_prev, items._static[torch.from_numpy(i)]),
        u_new,
        u_prev,
        i_new,
        i_prev,
        logits,
        evt.labels[span] if logits is not None else None,
        state_weight,
        sizes=sizes,
    )


def fit_span(
    model: Jodie,
    states: States,
    ev: EncodedEvents,
    evt: EventTensors,
    batches: tuple[np.ndarray, int, int],
    outputs: tuple[Tensor, Tensor, Tensor, Tensor, Tensor],
    state_weight: Tensor | None,
    optimizer: torch.optim.Optimizer,
) -> float:
    """One optimizer step on a span's loss: ``batches`` = (bounds, first, end) names the span's
    t-batches ``bounds[first:end]``, ``outputs`` its rows as ``span_loss`` takes them. Returns
    the loss."""
    bounds, first, end = batches
    loss = span_loss(
        model,
        states.users,
        states.items,
        ev,
        evt,
        slice(int(bounds[first]), int(bounds[end])),
        np.diff(bounds[first : end + 1]),
        outputs,
        state_weight,
    )
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


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
    bookkeeping: bool = True,
) -> float:
    """Apply batches ``[bounds[b], bounds[b+1])`` of ``ev`` (already in batch order) to ``states``.

    Batches are grouped into spans by ``span_bounds``. With an optimizer, each span's summed
    batch losses are back-propagated and the optimizer steps at the span end (gradient cut
    there), step by step (the trainer's epochs use ``operators.model.fused.train_spans``, the
    same pass with fewer autograd nodes); without one, this is a no-grad replay. Returns the
    total loss.
    ``bookkeeping`` False leaves the users' histories, habits and the trends as they were (see
    ``EntityStore.update``): nothing here reads them, only scorers do.
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
                read_u = partial(read_states, users, initial=u_init)
                read_i = partial(read_states, items, initial=i_init)

            # This span's inputs and outputs of every t-batch, for its loss at the span end:
            # the query, the state head and the loss feed no later state, so they are
            # computed once per span on all its rows rather than once per t-batch.
            kept: list[tuple[Tensor, ...]] = []
            for b in range(int(span_bounds[s]), int(span_bounds[s + 1])):
                sl = slice(int(bounds[b]), int(bounds[b + 1]))
                u, i, p = ev.user_rows[sl], ev.item_rows[sl], ev.prev_item[sl]
                du, di, f = evt.delta_user[sl], evt.delta_item[sl], evt.features[sl]
                u_prev = read_u(u)  # (B, d)
                i_prev = read_i(i)  # (B, d)
                # read_i(p): the previous item's current state (see the module doc), read
                # before this t-batch's updates
                p_dyn = read_i(p) if train or on_predict is not None else None
                out = step(model, u_prev, i_prev, du, di, f)
                if on_predict is not None:
                    assert p_dyn is not None
                    pred = query(model, u_prev, du, *query_inputs(users, items, u, p, p_dyn))[1]
                    on_predict(sl, pred.detach(), out.user.detach())
                if train:
                    assert p_dyn is not None
                    kept.append((u_prev, i_prev, p_dyn, out.user, out.item))
                    u_pool.push(u, out.user)
                    i_pool.push(i, out.item)
                t = ev.timestamps[sl]
                users.update(u, out.user, t, items=i, bookkeeping=bookkeeping)
                items.update(i, out.item, t, bookkeeping=bookkeeping)
            if train and kept:
                assert optimizer is not None
                outputs = tuple(torch.cat(parts) for parts in zip(*kept, strict=True))
                value = fit_span(
                    model,
                    states,
                    ev,
                    evt,
                    (bounds, int(span_bounds[s]), int(span_bounds[s + 1])),
                    outputs,  # type: ignore[arg-type]
                    state_weight,
                    optimizer,
                )
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

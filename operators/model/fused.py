"""The trainer's pass over t-batches, with the per-t-batch work cut to what the recurrence needs.

Training spends most of its time in the autograd graph's bookkeeping, not in arithmetic: a
t-batch holds about ten events on Wikipedia, and every operator applied to it is a node that
the backward pass visits. This pass computes what ``kernel.step`` computes for each t-batch,
with fewer nodes:

- **A plan made once.** Where each event's pre-event states come from (the learned initial
  vector, the state from before the span, or the output of an earlier t-batch of the span) only
  depends on the order of the events, so it is worked out once for all epochs
  (``TrainPlan``), and each t-batch reads both pre-states with one index.
- **Both updates in one product.** The user's and the item's RNN cells have the same shape:
  their inputs are stacked and multiplied by their stacked weights in one batched matmul. The
  part of the input that is a constant (the time gap and the features) is multiplied once
  per span, for all its events.
- **The loss once per span.** The query, the state-change head and the loss feed no later
  state, so they are computed at the span end on all its rows (``kernel.span_loss``), with each
  term's mean taken per t-batch as in the reference.

The arithmetic is the same as ``step``'s up to float32 rounding (the sums are grouped
differently), which the tests bound. The states a checkpoint keeps do not come from here: the
trainer replays the training split through ``step`` with the chosen weights, so serving and
evaluation see ``step``'s states. Quarantine is kept: an event whose inputs or update are not
finite keeps its pre-event states, as in ``step``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from operators.model.events import EncodedEvents, EventTensors
from operators.model.jodie import Jodie
from operators.model.kernel import fit_span
from operators.model.state import States


def _latest_before(rows: np.ndarray, query_rows: np.ndarray, before: np.ndarray) -> np.ndarray:
    """For each query, the last event index < ``before`` whose entity is ``query_rows`` (-1:
    none, or a negative query row). ``rows`` (N,) are the events' entities in event order."""
    n = rows.shape[0]
    order = np.argsort(rows, kind="stable")  # grouped by entity, event order inside
    keys = rows[order] * (n + 1) + order
    wanted = np.maximum(query_rows, 0) * (n + 1) + before
    pos = np.searchsorted(keys, wanted, side="left") - 1
    found = (pos >= 0) & (query_rows >= 0)
    found[found] = keys[pos[found]] // (n + 1) == query_rows[found]
    return np.where(found, order[np.maximum(pos, 0)], -1)


@dataclass(frozen=True)
class TrainPlan:
    """Where each event's inputs come from, for events in t-batch order (see the module doc).

    For event k: ``user[k]`` and ``item[k]`` are the indices of its user's and its item's
    previous events (-1: none in these events), ``prev[k]`` that of the last event of the
    user's previous item in an earlier t-batch (its state when the query reads it), and
    ``out[k]`` the offset of k's outputs within its span's outputs, which are laid out t-batch
    by t-batch, the users' rows then the items' rows (the item's at ``out[k] + size[k]``).
    """

    user: np.ndarray  # (N,) int64
    item: np.ndarray  # (N,) int64
    prev: np.ndarray  # (N,) int64
    out: np.ndarray  # (N,) int64, relative to the span's first event
    size: np.ndarray  # (N,) int64, the size of k's t-batch
    admitted: np.ndarray  # (N,) bool, finite gaps and features

    @classmethod
    def of(cls, ev: EncodedEvents, evt: EventTensors, bounds: np.ndarray) -> TrainPlan:
        n = len(ev)
        k = np.arange(n, dtype=np.int64)
        sizes = np.diff(bounds).astype(np.int64)
        start = np.repeat(bounds[:-1].astype(np.int64), sizes)
        inputs = torch.cat([evt.delta_user, evt.delta_item, evt.features], dim=1)
        return cls(
            user=_latest_before(ev.user_rows, ev.user_rows, k),
            item=_latest_before(ev.item_rows, ev.item_rows, k),
            # an item appears at most once per t-batch: "before the t-batch" is "< its start"
            prev=_latest_before(ev.item_rows, ev.prev_item, start),
            out=k + start,  # 2 × (start − lo) + (k − start), plus lo once per span
            size=np.repeat(sizes, sizes),
            admitted=torch.isfinite(inputs).all(dim=1).numpy(),
        )


def _stacked_weights(model: Jodie) -> tuple[Tensor, Tensor, Tensor]:
    """The two RNN cells' weights for the stacked update: (2, 2d, d) for [other side's state,
    own state], (2, 1 + F, d) for [Δ, f], (2, 1, d) the summed biases; [0] users, [1] items."""
    d = model.config.embedding_dim
    cells = (model.user_rnn, model.item_rnn)
    state = torch.stack([torch.cat([c.weight_ih[:, :d], c.weight_hh], dim=1).t() for c in cells])
    rest = torch.stack([c.weight_ih[:, d:].t() for c in cells])
    bias = torch.stack([(c.bias_ih + c.bias_hh).unsqueeze(0) for c in cells])
    return state, rest, bias


def _reads(
    src: np.ndarray, ext: np.ndarray, lo: int, fresh: np.ndarray, first: int, init: int
) -> np.ndarray:
    """Pool rows (m,) of a span's reads of one kind, relative to the span's outputs where the
    state was made inside the span (``src`` its event), else ``init`` for a fresh entity or
    the next base row from ``first``."""
    at = np.empty(src.shape[0], dtype=np.int64)
    inside = ~ext
    at[inside] = src[inside] - lo
    at[ext] = np.where(fresh, init, first + np.arange(int(ext.sum())))
    return at


def train_spans(
    model: Jodie,
    states: States,
    ev: EncodedEvents,
    evt: EventTensors,
    bounds: np.ndarray,
    span_bounds: np.ndarray,
    optimizer: torch.optim.Optimizer,
    plan: TrainPlan,
    state_weight: Tensor | None = None,
    on_span: Callable[[int, float], None] | None = None,
    bookkeeping: bool = True,
) -> float:
    """One training pass: what ``kernel.run_spans`` does with an optimizer, with fewer autograd
    nodes; ``plan`` is ``TrainPlan.of`` these events, made once for every epoch. Returns the
    summed loss."""
    users, items = states.users, states.items
    d = model.config.embedding_dim
    total = 0.0
    for s in range(span_bounds.shape[0] - 1):
        b0, b1 = int(span_bounds[s]), int(span_bounds[s + 1])
        lo, hi = int(bounds[b0]), int(bounds[b1])
        if hi == lo:
            continue
        span, m = slice(lo, hi), hi - lo
        u_rows, i_rows, p_rows = ev.user_rows[span], ev.item_rows[span], ev.prev_item[span]
        out_u = plan.out[span] - 2 * lo
        out_i = out_u + plan.size[span]

        # Pool rows: 0 and 1 the initial user and item, then the states from before the span
        # that the span reads, then the span's outputs (2m rows in t-batch layout).
        src_u, src_i, src_p = plan.user[span], plan.item[span], plan.prev[span]
        ext_u, ext_i = src_u < lo, src_i < lo
        has_p = p_rows >= 0
        ext_p = (src_p < lo) & has_p
        base_u = u_rows[ext_u]
        base_i = np.concatenate([i_rows[ext_i], p_rows[ext_p]])
        fixed = 2 + base_u.shape[0] + base_i.shape[0]
        fresh_i = items.fresh(base_i)
        n_i = int(ext_i.sum())
        at_u = _reads(src_u, ext_u, lo, users.fresh(base_u), 2, 0)
        at_i = _reads(src_i, ext_i, lo, fresh_i[:n_i], 2 + base_u.shape[0], 1)
        at_p = _reads(src_p, ext_p, lo, fresh_i[n_i:], 2 + base_u.shape[0] + n_i, 1)
        # made inside the span: the output row of that event's user or item
        at_u[~ext_u] = fixed + out_u[at_u[~ext_u]]
        at_i[~ext_i] = fixed + out_i[at_i[~ext_i]]
        inside_p = has_p & ~ext_p
        at_p[inside_p] = fixed + out_i[at_p[inside_p]]
        at_p[~has_p] = 1  # no previous item: the initial item state
        # Each output row's two inputs, [the other side's pre-state, its own], t-batch layout.
        pairs = np.empty((2 * m, 2), dtype=np.int64)
        pairs[out_u] = np.stack([at_i, at_u], axis=1)
        pairs[out_i] = np.stack([at_u, at_i], axis=1)
        pairs_t = torch.from_numpy(pairs)

        w_state, w_rest, bias = _stacked_weights(model)
        # The constant part of both cells' inputs (Δ, f), for all the span's events at once.
        rest = torch.stack(
            [
                torch.cat([evt.delta_user[span], evt.features[span]], dim=1),
                torch.cat([evt.delta_item[span], evt.features[span]], dim=1),
            ]
        )
        admitted = plan.admitted[span]
        if not admitted.all():  # quarantined events: keep their infinities out of the grads
            rest = torch.where(torch.from_numpy(admitted).unsqueeze(1), rest, 0.0)
        layout = np.empty(2 * m, dtype=np.int64)
        layout[out_u] = np.arange(m)
        layout[out_i] = m + np.arange(m)
        const = torch.baddbmm(bias, rest, w_rest).reshape(2 * m, d)[torch.from_numpy(layout)]

        pool = torch.cat(
            [
                model.initial_user().unsqueeze(0),
                model.initial_item().unsqueeze(0),
                users._emb[torch.from_numpy(base_u)],
                items._emb[torch.from_numpy(base_i)],
            ]
        )
        for b in range(b0, b1):
            e0, e1 = int(bounds[b]) - lo, int(bounds[b + 1]) - lo
            size = e1 - e0
            x = pool[pairs_t[2 * e0 : 2 * e1]].reshape(2, size, 2 * d)  # [other, own] per side
            z = torch.baddbmm(const[2 * e0 : 2 * e1].reshape(2, size, d), x, w_state)
            new = F.normalize(torch.tanh(z), dim=2).reshape(2 * size, d)
            ok = admitted[e0:e1]
            if not ok.all() or not bool(torch.isfinite(new).all()):
                finite = torch.isfinite(new.reshape(2, size, d)).all(dim=2).all(dim=0).numpy()
                keep = torch.from_numpy(np.tile(ok & finite, 2)).unsqueeze(1)
                new = torch.where(keep, new, x.reshape(2 * size, 2 * d)[:, d:])
            pool = torch.cat([pool, new])
            t = ev.timestamps[lo + e0 : lo + e1]
            users.update(u_rows[e0:e1], new[:size], t, items=i_rows[e0:e1], bookkeeping=bookkeeping)
            items.update(i_rows[e0:e1], new[size:], t, bookkeeping=bookkeeping)

        rows = np.concatenate([at_u, at_i, at_p, fixed + out_u, fixed + out_i])
        u_prev, i_prev, p_dyn, u_new, i_new = pool[torch.from_numpy(rows)].split(m)
        value = fit_span(
            model,
            states,
            ev,
            evt,
            (bounds, b0, b1),
            (u_prev, i_prev, p_dyn, u_new, i_new),
            state_weight,
            optimizer,
        )
        total += value
        if on_span is not None:
            on_span(s, value)
        states.detach()
    return total

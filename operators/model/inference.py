"""The event kernel's inference arithmetic in numpy, for the stream's small batches.

A streaming worker applies events in waves of a few entities each (one user's events come one
after another), so it calls the model thousands of times a second on batches of about ten
rows. At that size torch spends far longer dispatching than computing: one ``kernel.step``
for five events costs about 350 µs on one thread, the same arithmetic in numpy about 100 µs.
``NumpyJodie`` holds float32 copies of a trained ``Jodie``'s weights and computes exactly the
operators ``kernel.step`` and ``kernel.query`` compute — the same formulas, the same float32
inputs, the same quarantine rule — for inference only (no gradients).

The results agree with the torch kernel to float32 rounding (a few units in the last place of
unit-norm rows: the two libraries sum a dot product in different orders), which is the same
latitude batched and one-by-one torch calls already have with each other; tests bound the
difference on real weights and check the quarantine masks are identical.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from operators.model.jodie import Jodie
from operators.model.static import Kind, static_embeddings

_EPS = np.float32(1e-12)  # F.normalize's eps


def _normalize(x: np.ndarray) -> np.ndarray:
    norm = np.sqrt(np.einsum("ij,ij->i", x, x))[:, None]
    return x / np.maximum(norm, _EPS)


@dataclass(frozen=True)
class StepResult:
    """``kernel.Step`` in numpy: u(t), i(t) (B, d) and the quarantine mask."""

    user: np.ndarray
    item: np.ndarray
    quarantined: np.ndarray | None  # (B,) bool; None: none was


class NumpyJodie:
    """Inference with a trained ``Jodie``'s weights, on numpy float32 arrays."""

    def __init__(self, model: Jodie) -> None:
        def w(name: str) -> np.ndarray:
            return model.state_dict()[name].detach().cpu().numpy().astype(np.float32)

        cfg = model.config
        self.config = cfg
        # Transposed once so that each call is x @ W (rows of x contiguous).
        self._rnn = {
            side: (
                np.ascontiguousarray(w(f"{side}_rnn.weight_ih").T),
                np.ascontiguousarray(w(f"{side}_rnn.weight_hh").T),
                w(f"{side}_rnn.bias_ih"),
                w(f"{side}_rnn.bias_hh"),
            )
            for side in ("user", "item")
        }
        self._proj_w = w("projection.weight")[:, 0]  # (d,): the layer's input is Δ (B, 1)
        self._proj_b = w("projection.bias")
        self._pred_w = np.ascontiguousarray(w("prediction.weight").T)
        self._pred_b = w("prediction.bias")
        self._head = (
            (
                np.ascontiguousarray(w("state_head.0.weight").T),
                w("state_head.0.bias"),
                np.ascontiguousarray(w("state_head.2.weight").T),
                w("state_head.2.bias"),
            )
            if model.state_head is not None
            else None
        )

    def update(
        self, side: str, prev: np.ndarray, other: np.ndarray, delta: np.ndarray, f: np.ndarray
    ) -> np.ndarray:
        """``Jodie.update_user`` (side "user": prev = u(t⁻), other = i(t⁻)) or
        ``update_item`` (side "item"); (B, d) unit rows."""
        w_ih, w_hh, b_ih, b_hh = self._rnn[side]
        x = np.concatenate([other, delta, f], axis=1)
        return _normalize(np.tanh((x @ w_ih + b_ih) + (prev @ w_hh + b_hh)))

    def step(
        self,
        u_prev: np.ndarray,
        i_prev: np.ndarray,
        delta_u: np.ndarray,
        delta_i: np.ndarray,
        features: np.ndarray,
        admitted: np.ndarray | None = None,
    ) -> StepResult:
        """``kernel.step`` without the query, with the same quarantine rule."""
        with np.errstate(all="ignore"):  # a poisoned input overflows: it is quarantined below
            u_new = self.update("user", u_prev, i_prev, delta_u, features)
            i_new = self.update("item", i_prev, u_prev, delta_i, features)
            ok = np.isfinite(u_new).all(axis=1) & np.isfinite(i_new).all(axis=1)
            ok &= np.isfinite(np.concatenate([delta_u, delta_i, features], axis=1)).all(axis=1)
        if admitted is not None:
            ok &= np.asarray(admitted, dtype=bool)
        if ok.all():
            return StepResult(u_new, i_new, None)
        keep = ok[:, None]
        return StepResult(np.where(keep, u_new, u_prev), np.where(keep, i_new, i_prev), ~ok)

    def query(
        self,
        u: np.ndarray,
        delta: np.ndarray,
        u_static: np.ndarray,
        p_dyn: np.ndarray,
        p_static: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray]:
        """``kernel.query``: (û, j̃) = (project(u, Δ), predict(û, ū, p, p̄))."""
        u_proj = u * (1.0 + (delta * self._proj_w + self._proj_b))
        x = np.concatenate([u_proj, u_static, p_dyn, p_static], axis=1)
        return u_proj, x @ self._pred_w + self._pred_b

    def state_change_probability(self, u: np.ndarray) -> np.ndarray | None:
        """softmax(state_change_logits(u))[:, 1], or None without the head; (B,)."""
        if self._head is None:
            return None
        w0, b0, w2, b2 = self._head
        logits = np.maximum(u @ w0 + b0, 0.0) @ w2 + b2
        logits = logits - logits.max(axis=1, keepdims=True)
        e = np.exp(logits)
        return e[:, 1] / e.sum(axis=1)


@lru_cache(maxsize=1 << 17)
def static_row(kind: Kind, entity_id: str, dim: int) -> np.ndarray:
    """One id's static vector (dim,) float32, cached (read-only: it is shared)."""
    row = static_embeddings(kind, [entity_id], dim)[0]
    row.setflags(write=False)
    return row

"""JODIE (Kumar, Zhang, Leskovec, "Predicting Dynamic Embedding Trajectory in Temporal
Interaction Networks", KDD 2019): update, projection and prediction operators, open world.

Pure: no state, no I/O. Every operator takes tensors shaped ``(B, ·)`` and is used unchanged
for a t-batch of B events in training and for a single event (B = 1) in the stream, so the
stream computes what evaluation computes. States live in ``operators.model.state``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from operators.model.config import ModelConfig


class _NormalLinear(nn.Linear):
    """Linear layer initialised N(0, 1/fan_in) as in the reference (its ``NormalLinear``)."""

    def reset_parameters(self) -> None:
        std = 1.0 / float(np.sqrt(self.weight.size(1)))
        nn.init.normal_(self.weight, 0.0, std)
        if self.bias is not None:
            nn.init.normal_(self.bias, 0.0, std)


def standardise_delta(raw: np.ndarray | float, mean: float, std: float) -> np.ndarray:
    """Seconds since the entity's previous event → the model's Δ input, float32.

    One function for batch and stream so both round identically: float64 arithmetic, then
    one cast to float32.
    """
    return ((np.asarray(raw, dtype=np.float64) - mean) / std).astype(np.float32)


class Jodie(nn.Module):
    """The JODIE network. Parameters are independent of the number of users and items."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        d, su, si, f = (
            config.embedding_dim,
            config.user_static_dim,
            config.item_static_dim,
            config.n_features,
        )
        # Learned shared starting point of every dynamic trajectory (the reference's
        # initial_user_embedding / initial_item_embedding); unseen ids start here.
        self.user_init = nn.Parameter(F.normalize(torch.rand(d), dim=0))
        self.item_init = nn.Parameter(F.normalize(torch.rand(d), dim=0))
        self.user_rnn = nn.RNNCell(d + 1 + f, d, nonlinearity="tanh")
        self.item_rnn = nn.RNNCell(d + 1 + f, d, nonlinearity="tanh")
        self.projection = _NormalLinear(1, d)
        self.prediction = _NormalLinear(d + su + d + si, d + si)
        self.state_head: nn.Module | None = (
            nn.Sequential(
                nn.Linear(d, config.state_change_hidden),
                nn.ReLU(),
                nn.Linear(config.state_change_hidden, 2),
            )
            if config.state_change
            else None
        )

    # -- initial states ----------------------------------------------------------------------
    def initial_user(self) -> Tensor:
        """The dynamic state of a user before its first event; (d,)."""
        return F.normalize(self.user_init, dim=0)

    def initial_item(self) -> Tensor:
        """The dynamic state of an item before its first event; (d,)."""
        return F.normalize(self.item_init, dim=0)

    # -- the three operators ------------------------------------------------------------------
    def update_user(
        self, u_prev: Tensor, i_prev: Tensor, delta_u: Tensor, features: Tensor
    ) -> Tensor:
        """u(t) from u(t⁻) (B, d), i(t⁻) (B, d), Δu (B, 1), f (B, F); returns (B, d), unit rows."""
        x = torch.cat([i_prev, delta_u, features], dim=1)  # (B, d + 1 + F)
        return F.normalize(self.user_rnn(x, u_prev), dim=1)

    def update_item(
        self, i_prev: Tensor, u_prev: Tensor, delta_i: Tensor, features: Tensor
    ) -> Tensor:
        """i(t) from i(t⁻) (B, d), u(t⁻) (B, d), Δi (B, 1), f (B, F); returns (B, d), unit rows."""
        x = torch.cat([u_prev, delta_i, features], dim=1)  # (B, d + 1 + F)
        return F.normalize(self.item_rnn(x, i_prev), dim=1)

    def project(self, u: Tensor, delta: Tensor) -> Tensor:
        """û(t + Δ) = u(t) ⊙ (1 + W_p Δ); u (B, d), Δ (B, 1) → (B, d)."""
        return u * (1.0 + self.projection(delta))

    def predict(
        self, u_proj: Tensor, u_static: Tensor, i_prev_dyn: Tensor, i_prev_static: Tensor
    ) -> Tensor:
        """j̃ = W [û, ū, i_prev(t⁻), ī_prev] + b; returns (B, d + s_item) = [j̃_dyn, j̃_static].

        u_proj (B, d), u_static (B, s_user), i_prev_dyn (B, d): current state of the user's
        previous item, i_prev_static (B, s_item): its static vector (zeros if none).
        """
        return self.prediction(torch.cat([u_proj, u_static, i_prev_dyn, i_prev_static], dim=1))

    def state_change_logits(self, u: Tensor) -> Tensor:
        """Logits of (no change, change) of the user's state from u(t) (B, d); (B, 2)."""
        if self.state_head is None:
            raise ValueError("this model was built with state_change=False")
        out: Tensor = self.state_head(u)
        return out

    # -- loss ---------------------------------------------------------------------------------
    def loss(
        self,
        pred: Tensor,
        target: Tensor,
        u_new: Tensor,
        u_prev: Tensor,
        i_new: Tensor,
        i_prev: Tensor,
        state_logits: Tensor | None = None,
        state_labels: Tensor | None = None,
        state_weight: Tensor | None = None,
        sizes: np.ndarray | None = None,
    ) -> Tensor:
        """Loss: MSE(j̃, [i(t⁻), ī]) + λ_U‖u(t)−u(t⁻)‖² + λ_I‖i(t)−i(t⁻)‖² (+ state CE).

        Each term is a mean over a t-batch as in the reference, summed over the t-batches.
        ``sizes`` (G,) splits the rows into consecutive t-batches (None: one batch), so that a
        whole span's losses are computed in one call instead of one call per t-batch: none of
        them feeds the recurrence. Targets and previous states are constants.
        """
        n = pred.shape[0]
        if sizes is None:
            sizes = np.array([n], dtype=np.int64)
        sizes_t = torch.from_numpy(np.asarray(sizes, dtype=np.int64))
        batch = torch.repeat_interleave(torch.arange(sizes_t.shape[0]), sizes_t)  # row → t-batch
        # 1 / (size of the row's t-batch): a t-batch's mean is then its rows' weighted sum.
        per_row = (1.0 / sizes_t.to(pred.dtype))[batch]

        def mean_rows(a: Tensor, b: Tensor) -> Tensor:
            return (((a - b.detach()) ** 2).mean(dim=1) * per_row).sum()

        loss = mean_rows(pred, target)
        loss = loss + self.config.lambda_user * mean_rows(u_new, u_prev)
        loss = loss + self.config.lambda_item * mean_rows(i_new, i_prev)
        if state_logits is not None and state_labels is not None:
            # A t-batch's weighted cross-entropy is Σ w[y]·nll / Σ w[y] over its rows.
            nll = F.cross_entropy(state_logits, state_labels, reduction="none")
            w = (
                torch.ones_like(nll)
                if state_weight is None
                else state_weight.to(nll.dtype)[state_labels]
            )
            norm = torch.zeros(sizes_t.shape[0], dtype=nll.dtype).index_add_(0, batch, w)
            loss = loss + (nll * (w / norm[batch])).sum()
        return loss


def target_embedding(i_prev: Tensor, i_static: Tensor) -> Tensor:
    """The prediction target [i(t⁻), ī] of the true item; (B, d + s_item)."""
    return torch.cat([i_prev, i_static], dim=1)


def squared_distances(pred: Tensor, item_dyn: Tensor, item_static: Tensor) -> Tensor:
    """‖j̃ − [i_dyn, ī]‖² of one prediction (d + s,) against n items (n, d), (n, s); (n,)."""
    d = item_dyn.shape[1]
    return ((item_dyn - pred[:d]) ** 2).sum(dim=1) + ((item_static - pred[d:]) ** 2).sum(dim=1)


def squared_distances_many(preds: Tensor, item_dyn: Tensor, item_static: Tensor) -> Tensor:
    """``squared_distances`` of B predictions (B, d + s) at once; (B, n). The same elementwise
    arithmetic and per-row reduction, so each row is bitwise what the one-by-one call gives
    (tested), at one call's overhead; memory B × n × (d + s) floats."""
    d = item_dyn.shape[1]
    dyn = ((item_dyn.unsqueeze(0) - preds[:, None, :d]) ** 2).sum(dim=2)
    return dyn + ((item_static.unsqueeze(0) - preds[:, None, d:]) ** 2).sum(dim=2)

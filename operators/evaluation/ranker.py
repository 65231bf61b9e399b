"""The learned ranker: JODIE's distance plus item, history and user features, weighted by a
small model fitted on the training split's tail.

    score_j = −α d_j + w·x_j + [j ∈ H_u] · (v·h_j + g([h_j, z_u, x_j, −d_j])),
    d_j = ‖j̃ − [j, j̄]‖²

- x_j (3): the item — log(1 + n_j) its events so far, log(1 + m_j(t)) the same decayed with a
  one-day constant, and −log(1 + t − t_j)/10, how recently anyone touched it;
- h_j (K + 2): the user's history entry of j — its position (one-hot, 0 = the last item),
  log(1 + n_uj) the user's events on it, −log(1 + t − t_uj)/10 how long since the user last
  touched it;
- z_u (7): the user — log(1 + n_u)/5, log(1 + Δu)/10 the gap since its last event, the
  shares of its events that repeated the previous item and that went outside its history,
  log(1 + r)/3 for a current run of r events on its last item, how full its history is, and
  (log(1 + Δu) − its running mean)/10 (``operators.model.state.HABITS``);
- g: one hidden layer of tanh units, so the user's habits and the gap can decide between
  "the last item again", an older item of the history and anything else.

Every term reads one item's row and the user's bounded row (K history entries with their
counts and times, four habit figures, the event count and last time), never the other
items, so a score splits into what ``TieredIndex.recommend`` takes: a distance scale α, an
item prior w·x_j and a bonus per history item (``scale``, ``prior``, ``history_bonus``).
The weights are fitted by softmax cross-entropy of the true item against every known item
(``fit_ranker``), on events of the training split only; the JODIE weights are untouched.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from operators.evaluation.context import UserContext
from operators.model.jodie import squared_distances

#: Width of x_j and of z_u; h_j has K + 2 columns (``entry_width``).
ITEM_FEATURES = 3
USER_FEATURES = 7
#: Hidden units of g unless a fit asks for another size.
HIDDEN = 16
#: Key prefix of the ranker's parameters in a checkpoint.
PREFIX = "scorer.ranker."
#: Log-seconds are divided by this so that every feature stays of order one.
_LOG_SECONDS = 10.0


def entry_width(history_size: int) -> int:
    """Columns of h_j for a history of ``history_size`` entries."""
    return history_size + 2


def _log_age(now: float, then: np.ndarray) -> np.ndarray:
    """−log(1 + seconds since ``then``)/10; 0 where a time is unknown (NaN)."""
    age = np.maximum(np.float64(now) - np.asarray(then, dtype=np.float64), 0.0)
    return np.nan_to_num(-np.log1p(age) / _LOG_SECONDS, nan=0.0)


def item_features(
    count: np.ndarray, trend: np.ndarray, last: np.ndarray | None, now: float
) -> np.ndarray:
    """x (n, 3) float32 from the items' event counts, decayed counts at ``now`` and last event
    times (None: unknown, the recency term is then 0 for every item)."""
    n = np.asarray(count).shape[0]
    recency = np.zeros(n) if last is None else _log_age(now, last)
    return np.stack(
        [np.log1p(np.asarray(count, dtype=np.float64)), np.log1p(trend), recency], axis=1
    ).astype(np.float32)


def entry_features(user: UserContext) -> tuple[np.ndarray, np.ndarray]:
    """The user's history entries: their item rows (V,) and h (V, K + 2) float32, V the
    valid (non-padding) entries, most recent first."""
    k = user.history.shape[0]
    valid = np.flatnonzero(user.history >= 0)
    h = np.zeros((valid.size, entry_width(k)), dtype=np.float32)
    h[np.arange(valid.size), valid] = 1.0
    h[:, k] = np.log1p(np.asarray(user.counts, dtype=np.float64)[valid])
    if user.times is not None:
        h[:, k + 1] = _log_age(user.now, np.asarray(user.times)[valid])
    return user.history[valid], h


def user_features(user: UserContext) -> np.ndarray:
    """z (7,) float32 from the user's row (see the module doc)."""
    k = max(1, user.history.shape[0])
    n = float(user.events)
    gap = max(user.now - user.last_time, 0.0)
    log_gap = 0.0 if np.isnan(gap) else float(np.log1p(gap))
    repeats, news, run, mean_log_gap = (
        (0.0, 0.0, 0.0, log_gap) if user.habits is None else map(float, user.habits)
    )
    return np.array(
        [
            np.log1p(n) / 5.0,
            log_gap / _LOG_SECONDS,
            (repeats + 1.0) / (n + 2.0),
            (news + 1.0) / (n + 2.0),
            np.log1p(run) / 3.0,
            # from the counts: a caller scoring some rows apart masks the others' history rows
            float(np.count_nonzero(np.asarray(user.counts) > 0)) / k,
            (log_gap - mean_log_gap) / _LOG_SECONDS,
        ],
        dtype=np.float32,
    )


class RankerNet(nn.Module):
    """The ranker's parameters: α (as log α), w, v and g."""

    def __init__(self, history_size: int, hidden: int = HIDDEN) -> None:
        super().__init__()
        width = entry_width(history_size)
        self.log_alpha = nn.Parameter(torch.zeros(()))
        self.item_weights = nn.Parameter(torch.zeros(ITEM_FEATURES))
        self.entry_weights = nn.Parameter(torch.zeros(width))
        self.hidden = hidden
        self.mlp: nn.Module | None = None
        if hidden:
            out = nn.Linear(hidden, 1)
            nn.init.zeros_(out.weight)  # g starts at 0: the fit starts from a linear ranker
            nn.init.zeros_(out.bias)
            self.mlp = nn.Sequential(
                nn.Linear(width + USER_FEATURES + ITEM_FEATURES + 1, hidden), nn.Tanh(), out
            )

    def bonus(self, h: Tensor, z: Tensor, x: Tensor, d: Tensor) -> Tensor:
        """History bonus of entries h (..., K + 2) of users z (..., 7) on items x (..., 3) at
        squared distances d (...) from the prediction."""
        out = h @ self.entry_weights
        if self.mlp is not None:
            out = out + self.mlp(torch.cat([h, z, x, -d.unsqueeze(-1)], dim=-1)).squeeze(-1)
        return out


class LearnedRanker:
    """Scores with a fitted ``RankerNet`` (see the module doc); a ``Scorer``."""

    def __init__(self, net: RankerNet) -> None:
        self.net = net.eval().requires_grad_(False)

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], history_size: int) -> LearnedRanker:
        """The ranker saved by ``tensors()`` (``scorer.ranker.*`` keys, so that a checkpoint
        may hold the history scorer's too); without them, one that scores by plain distance
        (α = 1, every other weight 0)."""
        own = {k.removeprefix(PREFIX): v for k, v in tensors.items() if k.startswith(PREFIX)}
        first = own.get("mlp.0.weight")
        net = RankerNet(history_size, 0 if first is None else int(first.shape[0]))
        if own:
            net.load_state_dict(own)
        return cls(net)

    def tensors(self) -> dict[str, Tensor]:
        return {f"{PREFIX}{k}": v.detach().clone() for k, v in self.net.state_dict().items()}

    @property
    def scale(self) -> float:
        """α, the weight of the squared distance."""
        return float(self.net.log_alpha.exp())

    @torch.no_grad()
    def prior(self, x: np.ndarray) -> np.ndarray:
        """w·x_j for item features x (n, 3) (``item_features``); (n,) float64."""
        w = self.net.item_weights.numpy().astype(np.float64)
        return np.asarray(x, dtype=np.float64) @ w

    def history_bonus(
        self, user: UserContext, x_history: np.ndarray, d_history: np.ndarray
    ) -> np.ndarray:
        """The bonus (K,) float64 of each of the user's history entries (0 for padding), from
        ``x_history`` (K, 3), the item features of the entries' items, and ``d_history``
        (K,), their squared distances from the prediction (padding rows are ignored): what a
        server adds to the history items' keys."""
        [out] = self.history_bonuses([user], [x_history], [d_history])
        return out

    @torch.no_grad()
    def history_bonuses(
        self,
        users: list[UserContext],
        x_histories: list[np.ndarray],
        d_histories: list[np.ndarray],
    ) -> list[np.ndarray]:
        """``history_bonus`` of several users at once: one pass of the network over all
        their entries (a server's batch of recommendations)."""
        hs, zs, xs, ds, spans = [], [], [], [], []
        start = 0
        for user, x_history, d_history in zip(users, x_histories, d_histories, strict=True):
            rows, h = entry_features(user)
            valid = np.flatnonzero(user.history >= 0)
            spans.append((valid, start))
            start += valid.size
            hs.append(h)
            zs.append(np.broadcast_to(user_features(user), (rows.size, USER_FEATURES)))
            xs.append(np.asarray(x_history, dtype=np.float32)[valid])
            ds.append(np.asarray(d_history, dtype=np.float32)[valid])
        outs = [np.zeros(user.history.shape[0]) for user in users]
        if start:
            bonus = self.net.bonus(
                torch.from_numpy(np.concatenate(hs)),
                torch.from_numpy(np.concatenate(zs)),
                torch.from_numpy(np.concatenate(xs)),
                torch.from_numpy(np.concatenate(ds)),
            ).numpy()
            for out, (valid, start) in zip(outs, spans, strict=True):
                out[valid] = bonus[start : start + valid.size]
        return outs

    @torch.no_grad()
    def scores(
        self,
        pred: Tensor,
        item_dyn: Tensor,
        item_static: Tensor,
        item_count: np.ndarray,
        item_trend: np.ndarray,
        user: UserContext,
        item_last: np.ndarray | None = None,
    ) -> Tensor:
        x = item_features(item_count, item_trend, item_last, user.now)
        d = squared_distances(pred, item_dyn, item_static)
        out = -self.net.log_alpha.exp() * d + torch.from_numpy(x) @ self.net.item_weights
        valid = user.history >= 0
        if valid.any():
            safe = np.maximum(user.history, 0)
            bonus = self.history_bonus(user, x[safe], d.numpy()[safe])
            rows = torch.from_numpy(user.history[valid])
            out = out.index_add(0, rows, torch.from_numpy(bonus[valid]).to(out.dtype))
        return out


@dataclass(frozen=True)
class RankerSamples:
    """Features of E sampled events against the n items known at the end of the sample."""

    dist2: np.ndarray  # (E, n) float32 squared distance, +inf where the item was unknown
    items: np.ndarray  # (E, n, 3) float32 x
    entries: np.ndarray  # (E, K, K + 2) float32 h, zero rows for padding
    entry_rows: np.ndarray  # (E, K) int64 item row of each entry, -1 for padding
    users: np.ndarray  # (E, 7) float32 z
    targets: np.ndarray  # (E,) int64 row of the true item


#: Events per autograd pass when fitting (bounds the fit's memory).
_FIT_CHUNK = 256


def fit_ranker(
    samples: RankerSamples,
    history_size: int,
    hidden: int = HIDDEN,
    steps: int = 100,
    l2: float = 1e-4,
    seed: int = 0,
) -> LearnedRanker:
    """Fit the ranker by maximising the softmax likelihood of each true item among the items
    known at its event (full-batch L-BFGS; ``l2`` on every weight but α)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = RankerNet(history_size, hidden)
    e = int(samples.targets.shape[0])
    if e == 0:
        return LearnedRanker(net)
    d = torch.from_numpy(samples.dist2)
    finite = torch.isfinite(d)
    d = torch.where(finite, d, torch.zeros(()))
    x = torch.from_numpy(samples.items)
    h = torch.from_numpy(samples.entries)
    rows = torch.from_numpy(samples.entry_rows)
    valid = rows >= 0
    safe = rows.clamp(min=0)
    z = torch.from_numpy(samples.users)
    y = torch.from_numpy(samples.targets)
    penalised = [p for name, p in net.named_parameters() if name != "log_alpha"]
    optimizer = torch.optim.LBFGS(
        net.parameters(), lr=0.5, max_iter=steps, line_search_fn="strong_wolfe"
    )

    def closure() -> Tensor:
        # The mean cross entropy, its gradient accumulated chunk by chunk: one (E, n) graph
        # would hold gigabytes of intermediates.
        optimizer.zero_grad()
        penalty = l2 * sum((p**2).sum() for p in penalised)
        assert isinstance(penalty, Tensor)
        penalty.backward()
        total = penalty.detach()
        for lo in range(0, e, _FIT_CHUNK):
            sl = slice(lo, lo + _FIT_CHUNK)
            logits = -net.log_alpha.exp() * d[sl] + x[sl] @ net.item_weights  # (b, n)
            xe = torch.gather(x[sl], 1, safe[sl].unsqueeze(-1).expand(-1, -1, ITEM_FEATURES))
            ze = z[sl].unsqueeze(1).expand(-1, safe.shape[1], -1)
            de = torch.gather(d[sl], 1, safe[sl])
            bonus = net.bonus(h[sl], ze, xe, de) * valid[sl]  # (b, K)
            logits = logits.scatter_add(1, safe[sl], bonus)
            masked = logits.masked_fill(~finite[sl], float("-inf"))
            loss = nn.functional.cross_entropy(masked, y[sl], reduction="sum") / e
            loss.backward()
            total = total + loss.detach()
        return total

    optimizer.step(closure)
    return LearnedRanker(net)

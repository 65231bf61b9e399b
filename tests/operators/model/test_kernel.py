"""The event kernel's quarantine: an event it cannot apply keeps both embeddings, on every
path that replays events (one at a time, and in t-batches)."""

from __future__ import annotations

import numpy as np
import torch

from operators.dataset import InteractionLog
from operators.model.config import ModelConfig
from operators.model.events import encode
from operators.model.jodie import Jodie
from operators.model.kernel import batched, feature_rows, replay, step
from operators.model.state import States
from operators.training.run import advance

CFG = ModelConfig(
    embedding_dim=8,
    user_static_dim=4,
    item_static_dim=4,
    n_features=2,
    history_size=3,
    delta_user_mean=5.0,
    delta_user_std=3.0,
    delta_item_mean=2.0,
    delta_item_std=1.5,
)


def test_step_keeps_the_pre_states_of_what_it_cannot_apply() -> None:
    torch.manual_seed(0)
    model = Jodie(CFG).eval()
    u, i = torch.randn(4, 8), torch.randn(4, 8)
    du, di = torch.zeros(4, 1), torch.zeros(4, 1)
    du[1, 0] = float("inf")  # a gap that overflowed float32
    f = torch.ones(4, 2)
    f[2, 1] = float("nan")
    admitted = np.array([True, True, True, False])  # e.g. a feature row of another length
    with torch.no_grad():
        out = step(model, u, i, du, di, f, admitted=admitted)
        plain = step(model, u[:1], i[:1], du[:1], di[:1], f[:1])
    assert out.quarantined is not None
    assert out.quarantined.tolist() == [False, True, True, True]
    torch.testing.assert_close(out.user[1:], u[1:])
    torch.testing.assert_close(out.item[1:], i[1:])
    torch.testing.assert_close(out.user[:1], plain.user)
    assert plain.quarantined is None


def test_feature_rows_quarantine_another_length_and_zero_an_empty_row() -> None:
    block, admitted = feature_rows([(1.0, 2.0), (), (1.0,)], 2)
    assert block.tolist() == [[1.0, 2.0], [0.0, 0.0], [0.0, 0.0]]
    assert admitted is not None and admitted.tolist() == [True, True, False]
    block, admitted = feature_rows([(1.0, 2.0), (3.0, 4.0)], 2)
    assert admitted is None and block.shape == (2, 2)


def test_the_tbatch_replay_quarantines_as_the_sequential_one() -> None:
    """Catch-up runs long stretches of the log in t-batches: a poisoned event there must
    leave what the one-by-one replay (the workers' semantics) leaves."""
    torch.manual_seed(1)
    model = Jodie(CFG).eval()
    rng = np.random.default_rng(0)
    n = 300
    features = rng.normal(size=(n, 2)).astype(np.float32)
    features[[40, 41, 150]] = np.inf
    features[200, 0] = np.nan
    log = InteractionLog(
        user_ids=np.array([f"u{k}" for k in rng.integers(0, 12, n)]),
        item_ids=np.array([f"i{k}" for k in rng.integers(0, 7, n)]),
        timestamps=np.cumsum(rng.exponential(2.0, n)),
        state_labels=np.zeros(n, dtype=np.int8),
        features=features,
        lines=np.arange(n),
    )
    sequential = States.empty(8, 4, 4, 3)
    advance(model, sequential, log)
    tbatched = States.empty(8, 4, 4, 3)
    with torch.inference_mode():
        replay(model, tbatched, batched(encode(log, tbatched), CFG, 0.0))
    for mine, theirs in ((sequential.users, tbatched.users), (sequential.items, tbatched.items)):
        rows = [theirs.row(e) for e in mine.ids]
        assert torch.isfinite(mine.emb).all()
        np.testing.assert_allclose(mine.emb.numpy(), theirs.emb[rows].numpy(), atol=1e-5)
        np.testing.assert_array_equal(mine.last_time, theirs.last_time[rows])
    # A quarantined event changes no embedding; its time still moves its user's clock.
    user = str(log.user_ids[40])
    before = States.empty(8, 4, 4, 3)
    advance(model, before, log.slice(0, 40))
    after = before.copy()
    advance(model, after, log.slice(40, 41))
    row = after.users.row(user)
    assert row is not None
    np.testing.assert_array_equal(after.users.emb[row].numpy(), before.users.emb[row].numpy())
    assert after.users.last_time[row] == log.timestamps[40]

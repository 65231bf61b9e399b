"""The numpy inference path computes what the torch kernel computes, quarantine included."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from operators.model.config import ModelConfig
from operators.model.inference import NumpyJodie, static_row
from operators.model.jodie import Jodie
from operators.model.kernel import query, step
from operators.model.static import static_embeddings

CFG = ModelConfig(
    embedding_dim=32,
    user_static_dim=16,
    item_static_dim=16,
    n_features=3,
    state_change_hidden=8,
    history_size=3,
    delta_user_mean=5.0,
    delta_user_std=3.0,
    delta_item_mean=2.0,
    delta_item_std=1.5,
)


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("batch", [1, 7, 64])
def test_step_query_and_state_head_agree_with_torch(batch: int) -> None:
    torch.manual_seed(batch)
    model = Jodie(CFG).eval()
    net = NumpyJodie(model)
    rng = np.random.default_rng(batch)
    u, i = _unit(rng, batch, 32), _unit(rng, batch, 32)
    du, di = rng.standard_normal((batch, 1)), rng.standard_normal((batch, 1))
    du, di = du.astype(np.float32), di.astype(np.float32)
    f = rng.standard_normal((batch, 3)).astype(np.float32)
    us, ps = _unit(rng, batch, 16), _unit(rng, batch, 16)
    t = torch.from_numpy
    with torch.inference_mode():
        want = step(model, t(u), t(i), t(du), t(di), t(f))
        want_proj, want_pred = query(model, want.user, t(du), t(us), want.item, t(ps))
        want_prob = torch.softmax(model.state_change_logits(want.user), dim=1)[:, 1]
    got = net.step(u, i, du, di, f)
    proj, pred = net.query(got.user, du, us, got.item, ps)
    # Float32 rounding only: the two libraries sum dot products in different orders.
    np.testing.assert_allclose(got.user, want.user.numpy(), atol=2e-6)
    np.testing.assert_allclose(got.item, want.item.numpy(), atol=2e-6)
    np.testing.assert_allclose(proj, want_proj.numpy(), atol=1e-5)
    np.testing.assert_allclose(pred, want_pred.numpy(), atol=1e-5)
    prob = net.state_change_probability(got.user)
    assert prob is not None
    np.testing.assert_allclose(prob, want_prob.numpy(), atol=1e-6)
    assert got.quarantined is None and want.quarantined is None
    assert got.user.dtype == np.float32 and pred.dtype == np.float32


def test_it_quarantines_what_the_torch_kernel_quarantines() -> None:
    torch.manual_seed(0)
    model = Jodie(CFG).eval()
    rng = np.random.default_rng(0)
    u, i = _unit(rng, 5, 32), _unit(rng, 5, 32)
    du, di = np.zeros((5, 1), np.float32), np.zeros((5, 1), np.float32)
    f = np.ones((5, 3), np.float32)
    du[1, 0] = np.inf  # a gap that overflowed float32
    f[2, 1] = np.nan
    di[3, 0] = np.float32(3e38)  # finite input, but the update is not
    admitted = np.array([True, True, True, True, False])
    t = torch.from_numpy
    with torch.inference_mode():
        want = step(model, t(u), t(i), t(du), t(di), t(f), admitted=admitted)
    got = NumpyJodie(model).step(u, i, du, di, f, admitted=admitted)
    assert want.quarantined is not None and got.quarantined is not None
    assert got.quarantined.tolist() == want.quarantined.tolist()
    kept = got.quarantined
    np.testing.assert_array_equal(got.user[kept], u[kept])
    np.testing.assert_array_equal(got.item[kept], i[kept])
    np.testing.assert_allclose(got.user, want.user.numpy(), atol=2e-6)
    assert np.isfinite(got.user).all() and np.isfinite(got.item).all()


def test_a_model_without_the_state_head_gives_no_probability() -> None:
    model = Jodie(ModelConfig(**{**CFG.__dict__, "state_change": False})).eval()
    assert NumpyJodie(model).state_change_probability(np.zeros((2, 32), np.float32)) is None


def test_static_rows_are_the_static_embeddings_and_read_only() -> None:
    row = static_row("item", "page-7", 16)
    np.testing.assert_array_equal(row, static_embeddings("item", ["page-7"], 16)[0])
    with pytest.raises(ValueError):
        row[0] = 1.0

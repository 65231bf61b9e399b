"""Update, projection, prediction and loss on a 2-d example with hand-computed tensors."""

import math

import numpy as np
import pytest
import torch

from operators.model.config import ModelConfig
from operators.model.jodie import Jodie, squared_distances, standardise_delta
from tests.operators.conftest import tiny_config


@pytest.fixture
def model2() -> Jodie:
    cfg = ModelConfig(
        embedding_dim=2,
        user_static_dim=1,
        item_static_dim=1,
        state_change=False,
        lambda_user=2.0,
        lambda_item=1.0,
    )
    m = Jodie(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
        # user RNN input is [i(t⁻) (2), Δu (1)]
        m.user_rnn.weight_ih.copy_(torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, 0.0]]))
        m.user_rnn.weight_hh.copy_(torch.eye(2))
        # item RNN input is [u(t⁻) (2), Δi (1)]; it swaps the user's coordinates
        m.item_rnn.weight_ih.copy_(torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]))
        m.projection.weight.copy_(torch.tensor([[1.0], [2.0]]))
        # prediction input [û (2), ū (1), i_prev (2), ī_prev (1)] → [j̃_dyn (2), j̃_static (1)]
        m.prediction.weight.copy_(
            torch.tensor(
                [
                    [1.0, 0.0, 0.0, 0.0, 0.0, 1.0],
                    [0.0, 0.0, 0.0, 0.0, 1.0, 0.0],
                    [0.0, 0.0, 2.0, 0.0, 0.0, 0.0],
                ]
            )
        )
        m.prediction.bias.copy_(torch.tensor([0.0, 0.0, 1.0]))
    return m


def test_update_user(model2: Jodie) -> None:
    u = torch.tensor([[1.0, 0.0]])
    i = torch.tensor([[0.0, 1.0]])
    out = model2.update_user(u, i, torch.tensor([[0.5]]), torch.zeros(1, 0))
    # pre-activation = [0 + 2·0.5, 1] + [1, 0] = [2, 1]; tanh, then unit norm
    a, b = math.tanh(2.0), math.tanh(1.0)
    n = math.hypot(a, b)
    torch.testing.assert_close(out, torch.tensor([[a / n, b / n]]))


def test_update_item_uses_the_pre_event_user(model2: Jodie) -> None:
    u = torch.tensor([[1.0, 0.0]])
    i = torch.tensor([[0.0, 1.0]])
    out = model2.update_item(i, u, torch.tensor([[0.0]]), torch.zeros(1, 0))
    # pre-activation = swap(u) = [0, 1] (W_hh = 0); tanh(1) normalised → [0, 1]
    torch.testing.assert_close(out, torch.tensor([[0.0, 1.0]]))


def test_project(model2: Jodie) -> None:
    u = torch.tensor([[0.6, 0.8], [0.6, 0.8]])
    out = model2.project(u, torch.tensor([[0.5], [0.0]]))
    # û = u ⊙ (1 + [1, 2]·Δ)
    torch.testing.assert_close(out, torch.tensor([[0.9, 1.6], [0.6, 0.8]]))


def test_predict(model2: Jodie) -> None:
    out = model2.predict(
        torch.tensor([[0.9, 1.6]]),
        torch.tensor([[0.5]]),
        torch.tensor([[0.3, 0.4]]),
        torch.tensor([[-1.0]]),
    )
    # [û₀ + ī_prev, i_prev₁, 2·ū + 1]
    torch.testing.assert_close(out, torch.tensor([[-0.1, 0.4, 2.0]]))


def test_loss(model2: Jodie) -> None:
    loss = model2.loss(
        pred=torch.tensor([[1.0, 2.0]]),
        target=torch.tensor([[1.0, 0.0]]),
        u_new=torch.tensor([[1.0, 0.0]]),
        u_prev=torch.tensor([[0.0, 0.0]]),
        i_new=torch.tensor([[0.0, 1.0]]),
        i_prev=torch.tensor([[0.0, 1.0]]),
    )
    # MSE 4/2 = 2, plus λ_U = 2 times MSE 1/2, plus λ_I times 0
    assert float(loss) == pytest.approx(3.0)


def test_squared_distances_and_delta_standardisation() -> None:
    pred = torch.tensor([1.0, 0.0, 2.0])
    dyn = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    static = torch.tensor([[2.0], [0.0]])
    torch.testing.assert_close(squared_distances(pred, dyn, static), torch.tensor([0.0, 6.0]))
    out = standardise_delta([10.0, 30.0], mean=20.0, std=10.0)
    assert out.dtype.name == "float32" and out.tolist() == [-1.0, 1.0]


def test_state_change_head_shape_and_absence() -> None:
    with_head = Jodie(ModelConfig(embedding_dim=4, user_static_dim=2, item_static_dim=2))
    assert with_head.state_change_logits(torch.zeros(3, 4)).shape == (3, 2)
    without = Jodie(ModelConfig(embedding_dim=4, state_change=False))
    with pytest.raises(ValueError):
        without.state_change_logits(torch.zeros(1, 4))


def test_parameter_count_independent_of_vocabulary() -> None:
    m = Jodie(ModelConfig())
    sizes = {name: tuple(p.shape) for name, p in m.named_parameters()}
    # every parameter's shape is set by the embedding/static/feature sizes only
    assert all(max(s) <= 2 * 128 + 128 + 128 for s in sizes.values())


def test_many_squared_distances_are_bitwise_the_one_by_one_ones() -> None:
    """The live evaluation scores many queries at once and must rank exactly as the
    offline replay, which scores one at a time."""
    from operators.model.jodie import squared_distances, squared_distances_many

    torch.manual_seed(0)
    dyn, static, preds = torch.randn(1000, 128), torch.randn(1000, 64), torch.randn(32, 192)
    many = squared_distances_many(preds, dyn, static)
    one = torch.stack([squared_distances(p, dyn, static) for p in preds])
    assert torch.equal(many, one)


def test_a_grouped_loss_is_the_sum_of_its_t_batches_losses() -> None:
    """``sizes`` computes a span's t-batches in one call: each term's mean (the weighted
    cross-entropy's too) stays per t-batch."""
    torch.manual_seed(0)
    model = Jodie(tiny_config(state_change=True))
    sizes = np.array([3, 1, 4])
    n, d = int(sizes.sum()), 8
    pred, target = torch.randn(n, 2 * d), torch.randn(n, 2 * d)
    u_new, u_prev, i_new, i_prev = (torch.randn(n, d) for _ in range(4))
    logits, labels = torch.randn(n, 2), torch.tensor([0, 1, 0, 1, 0, 0, 1, 1])
    weight = torch.tensor([1.0, 5.0])
    grouped = model.loss(
        pred, target, u_new, u_prev, i_new, i_prev, logits, labels, weight, sizes=sizes
    )
    parts = 0.0
    for lo, hi in zip(np.r_[0, np.cumsum(sizes)[:-1]], np.cumsum(sizes), strict=True):
        sl = slice(int(lo), int(hi))
        parts += float(
            model.loss(
                pred[sl],
                target[sl],
                u_new[sl],
                u_prev[sl],
                i_new[sl],
                i_prev[sl],
                logits[sl],
                labels[sl],
                weight,
            )
        )
    assert float(grouped) == pytest.approx(parts, rel=1e-6)

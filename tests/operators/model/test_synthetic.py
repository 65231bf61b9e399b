"""The random-weights checkpoint the tests and benchmarks serve."""

from __future__ import annotations

from pathlib import Path

import torch

from operators.dataset import bundled_wikipedia, load_interactions
from operators.model.checkpoint import load_checkpoint
from operators.model.synthetic import synthetic_checkpoint


def test_states_of_the_first_rows_at_their_log_position(tmp_path: Path) -> None:
    log = load_interactions(bundled_wikipedia())
    ckpt = load_checkpoint(synthetic_checkpoint(tmp_path / "a", 30, version="a", with_seqs=True))
    assert ckpt.meta["version"] == "a"
    assert ckpt.meta["log_offsets"] == {"events": 30, "seq": 30}
    users, items = ckpt.states.users, ckpt.states.items
    assert set(users.ids) == set(log.user_ids[:30]) and set(items.ids) == set(log.item_ids[:30])
    assert ckpt.last_seq is not None
    last_user = {log.user_ids[k]: k for k in range(30)}  # each entity's last of the 30 rows
    last_item = {log.item_ids[k]: k for k in range(30)}
    assert {u: ckpt.last_seq.users[users.row(u)] for u in last_user} == last_user
    assert {i: ckpt.last_seq.items[items.row(i)] for i in last_item} == last_item
    # The history scorer's fixed terms travel with it.
    assert "scorer.bonus" in ckpt.scorer_tensors


def test_the_seed_draws_the_weights_and_nothing_else_does(tmp_path: Path) -> None:
    def weights(name: str, seed: int) -> dict[str, torch.Tensor]:
        return load_checkpoint(synthetic_checkpoint(tmp_path / name, seed=seed)).model.state_dict()

    a, again, other = weights("a", 0), weights("again", 0), weights("other", 1)
    assert all(torch.equal(a[k], again[k]) for k in a)
    assert not all(torch.equal(a[k], other[k]) for k in a)


def test_no_rows_no_states(tmp_path: Path) -> None:
    ckpt = load_checkpoint(synthetic_checkpoint(tmp_path / "empty", fixed_scorer=False))
    assert len(ckpt.states.users) == 0 and len(ckpt.states.items) == 0
    assert ckpt.last_seq is None
    assert ckpt.scorer_tensors == {}

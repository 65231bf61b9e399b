"""Catching a checkpoint up over the log: seq order whatever the arrival order, gaps held,
repeats ignored, and the result is the offline replay (``pipeline.advance``) with last seqs."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import numpy as np
import pytest

from operators.model.checkpoint import load_checkpoint
from operators.model.config import TrainConfig
from operators.protocol import catchup
from operators.protocol.catchup import CatchUp, LogEvent, log_position
from operators.training.run import advance, run_training
from tests.operators.conftest import tiny_config
from tests.operators.training.test_trainer import planted_stream


@pytest.mark.parametrize(
    "tbatch_min", [1, 10**9, 90], ids=["t-batches", "one-by-one", "one-by-one-then-t-batches"]
)
def test_any_arrival_order_gives_the_offline_replay(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tbatch_min: int
) -> None:
    monkeypatch.setattr(catchup, "TBATCH_MIN", tbatch_min)
    log = planted_stream(n_events=500, n_users=8, n_items=6)
    # Events 250-349 by users never seen: new rows in both runs below (the stores grow in
    # the first, with room left for the second).
    users = log.user_ids.astype(object)
    users[250:350] = [f"newcomer-{s}" for s in range(250, 350)]
    log = dataclasses.replace(log, user_ids=users.astype(str))
    head = 250
    config = TrainConfig(epochs=1, n_spans=20, progress=False, model=tiny_config())
    run = run_training(log.slice(0, head), config, tmp_path / "ck", seqs=np.arange(head))
    assert run.checkpoint is not None and run.states is not None
    ckpt = load_checkpoint(run.checkpoint)
    assert log_position(ckpt) == head

    target, gap = 430, 330  # runs of 80 then 100 events
    events = [
        LogEvent(s, str(log.user_ids[s]), str(log.item_ids[s]), float(log.timestamps[s]))
        for s in range(head - 20, 500)  # some already in the checkpoint, some past the target
    ]
    random.Random(3).shuffle(events)
    cu = CatchUp(ckpt)
    missing = next(e for e in events if e.seq == gap)
    for e in events:
        if e is not missing:
            cu.offer(e)
    assert cu.advance(target) == gap  # held at the gap
    cu.offer(missing)
    cu.offer(events[0])  # a repeat
    assert cu.advance(target) == target and cu.applied == target - head

    want = run.states.copy()
    advance(ckpt.model, want, log.slice(head, target))
    got = cu.checkpoint()
    assert got.meta["log_offsets"]["seq"] == target
    for side in ("users", "items"):
        mine, theirs = getattr(got.states, side), getattr(want, side)
        assert mine.ids == theirs.ids
        np.testing.assert_allclose(mine.emb.numpy(), theirs.emb.numpy(), atol=1e-6)
    assert got.last_seq is not None
    for side, column, ids in (
        ("users", got.last_seq.users, log.user_ids),
        ("items", got.last_seq.items, log.item_ids),
    ):
        store = getattr(got.states, side)
        for entity in set(ids[:target].tolist()):
            last = max(s for s in range(target) if ids[s] == entity)
            assert column[store.row(entity)] == last

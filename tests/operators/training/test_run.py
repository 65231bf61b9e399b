"""A whole training run writes a checkpoint that evaluates the same after loading; a run on
the log saves the states at its end, with every row's last seq."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from operators.evaluation.protocols import evaluate
from operators.evaluation.scorer import HistoryScorer, PlainScorer, make_scorer
from operators.model.checkpoint import load_checkpoint
from operators.model.config import TrainConfig
from operators.training.run import run_training
from tests.operators.conftest import tiny_config
from tests.operators.training.test_trainer import planted_stream


def test_run_training_fits_scorer_and_checkpoints(tmp_path: Path) -> None:
    log = planted_stream(n_events=600, n_users=8, n_items=6)
    config = TrainConfig(epochs=1, n_spans=20, progress=False, model=tiny_config())
    run = run_training(log, config, out_dir=tmp_path / "ck")
    assert run.checkpoint is not None
    meta = json.loads((run.checkpoint / "checkpoint.json").read_text())
    assert meta["log_offsets"] == {"events": 480} and meta["split"]["test"] == [540, 600]
    assert (run.checkpoint / "curves.json").is_file()
    ck = load_checkpoint(run.checkpoint)
    assert ck.last_seq is None and run.states is None and "source" not in ck.meta
    scorer = make_scorer(ck.config, ck.scorer_tensors)
    assert isinstance(scorer, HistoryScorer)
    assert set(run.scorer_tensors) == {
        f"scorer.{k}" for k in ("log_alpha", "bonus", "beta", "gamma", "delta")
    }
    bounds = {k: run.result.split.bounds(k) for k in ("train", "valid", "test")}
    fresh = evaluate(
        run.result.model,
        run.result.states.copy(),
        log,
        bounds,
        "frozen",
        "test",
        make_scorer(run.result.model.config, run.scorer_tensors),
    )
    loaded = evaluate(ck.model, ck.states, log, bounds, "frozen", "test", scorer)
    np.testing.assert_array_equal(fresh.ranks, loaded.ranks)


def test_run_on_the_log_saves_states_at_its_end(tmp_path: Path) -> None:
    log = planted_stream(n_events=600, n_users=8, n_items=6)
    # Seqs need not start at 0 nor be dense (a window of a log); rows map to them by position.
    seqs = 1000 + 3 * np.arange(600, dtype=np.int64)
    config = TrainConfig(epochs=1, n_spans=20, progress=False, model=tiny_config(scorer="plain"))
    run = run_training(log, config, out_dir=tmp_path / "ck", seqs=seqs, source={"topic": "t"})
    assert run.checkpoint is not None and run.states is not None
    ck = load_checkpoint(run.checkpoint)
    assert ck.meta["log_offsets"] == {"events": 600, "seq": 1000 + 3 * 599 + 1}
    assert ck.meta["split"]["train"] == [0, 480] and ck.meta["source"] == {"topic": "t"}

    # The frozen evaluation of the test split replays valid and test from the train-end
    # states: it must leave exactly the saved states.
    bounds = {k: run.result.split.bounds(k) for k in ("train", "valid", "test")}
    reference = run.result.states.copy()
    evaluate(run.result.model, reference, log, bounds, "frozen", "test", PlainScorer())
    for got, want, before in (
        (ck.states.users, reference.users, run.result.states.users),
        (ck.states.items, reference.items, run.result.states.items),
    ):
        assert got.ids == want.ids
        assert torch.equal(got.emb, want.emb)
        np.testing.assert_array_equal(got.last_time, want.last_time)
        np.testing.assert_array_equal(got.count, want.count)
        np.testing.assert_array_equal(got.history, want.history)
        assert not torch.equal(got.emb[: len(before)], before.emb)  # they did move
    assert int(ck.states.users.count.sum()) == 600

    assert ck.last_seq is not None
    for store, column, seqs_of_rows in (
        (ck.states.users, log.user_ids, ck.last_seq.users),
        (ck.states.items, log.item_ids, ck.last_seq.items),
    ):
        want_seq = [int(seqs[np.flatnonzero(column == i).max()]) for i in store.ids]
        np.testing.assert_array_equal(seqs_of_rows, want_seq)
        # The state's own clock agrees: its last event time is that of its last seq.
        np.testing.assert_array_equal(store.last_time, log.timestamps[(seqs_of_rows - 1000) // 3])

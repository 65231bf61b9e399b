"""A whole training run writes a checkpoint that evaluates the same after loading; a run on
the log saves the states at its end, with every row's last seq."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from operators.evaluation.protocols import evaluate
from operators.evaluation.scorer import HistoryScorer, PlainScorer, make_scorer
from operators.evaluation.served import MARGINS, ServedLists
from operators.model.checkpoint import load_checkpoint
from operators.model.config import TrainConfig
from operators.training.run import fit_scorer, run_training
from tests.operators.conftest import build_log, tiny_config
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


def returning_stream(n_events: int = 600, n_users: int = 8, n_items: int = 8, seed: int = 2):
    """Each user touches its last item again (60 %), goes back to a home item of its own
    (25 %) or anywhere: the home item gathers the user's counts, the last item comes next."""
    rng = np.random.default_rng(seed)
    home = rng.integers(n_items, size=n_users)
    last = home.copy()
    users, items = [], []
    for _ in range(n_events):
        u, r = int(rng.integers(n_users)), rng.uniform()
        last[u] = last[u] if r < 0.6 else home[u] if r < 0.85 else int(rng.integers(n_items))
        users.append(f"user{u}")
        items.append(f"item{last[u]}")
    return build_log(users, items, np.cumsum(rng.exponential(10.0, size=n_events)))


def test_the_last_item_gains_the_margin_of_the_best_served_lists_on_validation(
    tmp_path: Path,
) -> None:
    log = returning_stream()
    config = TrainConfig(epochs=1, n_spans=20, progress=False, model=tiny_config())
    run = run_training(log, config, out_dir=tmp_path / "ck")
    assert run.checkpoint is not None
    metrics = load_checkpoint(run.checkpoint).meta["metrics"]
    margin, by_margin = metrics["served_margin"], metrics["valid_served_mrr_by_margin"]
    assert list(by_margin) == [str(m) for m in MARGINS] and margin in MARGINS
    assert by_margin[str(margin)] == max(by_margin.values())
    assert all(v < by_margin[str(margin)] for m, v in by_margin.items() if float(m) < margin)
    assert margin > 0  # the likelihood fit lets the home item pass the last one too often

    # The likelihood fit of the training split, then the margin on the last item's bonus.
    split = run.result.split
    fitted = fit_scorer(run.result.model, log.slice(0, split.train_end), run.result.timespan)
    ck = load_checkpoint(run.checkpoint)
    assert set(ck.scorer_tensors) == set(fitted)
    for key, value in fitted.items():
        want = value.clone()
        if key == "scorer.bonus":
            want[0] += margin
        assert torch.equal(ck.scorer_tensors[key], want), key

    # The checkpoint's own lists on the validation split are those the margin was chosen by.
    lists = ServedLists((None,), k=10)
    bounds = {k: split.bounds(k) for k in ("train", "valid", "test")}
    scorer = make_scorer(ck.config, ck.scorer_tensors)
    evaluate(ck.model, ck.states, log, bounds, "frozen", "valid", scorer, served=lists)
    assert lists.summary()["by_horizon"][0]["mrr"] == pytest.approx(by_margin[str(margin)])


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

"""A whole training run writes a checkpoint that evaluates the same after loading."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from operators.checkpoint import load_checkpoint
from operators.config import TrainConfig
from operators.evaluate import evaluate
from operators.pipeline import run_training
from operators.scorer import HistoryScorer, make_scorer

from .conftest import tiny_config
from .test_train import planted_stream


def test_run_training_fits_scorer_and_checkpoints(tmp_path: Path) -> None:
    log = planted_stream(n_events=600, n_users=8, n_items=6)
    config = TrainConfig(epochs=1, n_spans=20, progress=False, model=tiny_config())
    run = run_training(log, config, out_dir=tmp_path / "ck")
    assert run.checkpoint is not None
    meta = json.loads((run.checkpoint / "checkpoint.json").read_text())
    assert meta["log_offsets"] == {"events": 480} and meta["split"]["test"] == [540, 600]
    assert (run.checkpoint / "curves.png").is_file()
    ck = load_checkpoint(run.checkpoint)
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

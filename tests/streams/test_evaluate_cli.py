"""`jodie evaluate --compare`: the model, plain JODIE and both baselines on the same events,
with the served lists measured, as one table and one JSON file."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from typer.testing import CliRunner

from operators.dataset import bundled_wikipedia
from streams.cli import app
from tests.streams.harness import make_checkpoint


def test_compare_prints_one_table_and_writes_every_run(tmp_path: Path) -> None:
    data = tmp_path / "head.csv"
    with gzip.open(bundled_wikipedia(), "rt") as src:
        data.write_text("".join(line for _, line in zip(range(3001), src, strict=False)))
    ckpt = make_checkpoint(tmp_path / "ckpt")
    out = tmp_path / "eval.json"
    args = ["evaluate", "--checkpoint", str(ckpt), "--data", str(data), "--compare"]
    result = CliRunner().invoke(
        app, [*args, "--horizons", "0,mean", "--k", "5", "--json", str(out)]
    )
    assert result.exit_code == 0, result.output
    runs = json.loads(out.read_text())["runs"]
    assert [r["model"] for r in runs] == ["jodie+history", "jodie+plain", "recency", "popularity"]
    assert len({r["n_events"] for r in runs}) == 1  # the same events for every method
    served = runs[0]["served"]
    assert served["k"] == 5 and [h["horizon_s"] for h in served["by_horizon"]] == [0.0, None]
    assert 0 < served["covered"] <= runs[0]["n_events"]
    assert 0.0 <= served["heuristic"]["recall"] <= 1.0
    assert "MRR / Recall@10 on the same events" in result.output
    assert "recent-then-popular" in result.output

    wrong = CliRunner().invoke(app, [*args, "--horizons", "soon"])
    assert wrong.exit_code != 0 and "--horizons" in wrong.output


def test_the_ranker_is_fitted_on_the_training_split_when_the_checkpoint_has_none(
    tmp_path: Path,
) -> None:
    data = tmp_path / "head.csv"
    with gzip.open(bundled_wikipedia(), "rt") as src:
        data.write_text("".join(line for _, line in zip(range(3001), src, strict=False)))
    ckpt = make_checkpoint(tmp_path / "ckpt")  # holds the history scorer's parameters only
    out = tmp_path / "eval.json"
    args = ["evaluate", "--checkpoint", str(ckpt), "--data", str(data), "--scorer", "ranker"]
    result = CliRunner().invoke(app, [*args, "--compare", "--no-served", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "fitting the ranker scorer on the end of the training split" in result.output
    runs = json.loads(out.read_text())["runs"]
    assert [r["model"] for r in runs] == [
        "jodie+ranker",
        "jodie+history",
        "jodie+plain",
        "recency",
        "popularity",
    ]
    assert len({r["n_events"] for r in runs}) == 1
    assert runs[0]["mrr"] != runs[2]["mrr"]  # the fitted ranker is not the plain distance

    wrong = CliRunner().invoke(app, [*args[:-1], "best"])
    assert wrong.exit_code != 0 and "--scorer" in wrong.output

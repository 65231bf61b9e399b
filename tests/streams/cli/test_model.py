"""`jodie train` from a CSV: the summary names the served margin the checkpoint carries."""

from __future__ import annotations

import gzip
from pathlib import Path

from typer.testing import CliRunner

from operators.dataset import bundled_wikipedia, load_interactions
from operators.evaluation.baselines import evaluate_baseline
from operators.model.checkpoint import load_checkpoint
from streams.cli import app


def test_train_reports_the_served_margin_of_the_last_item(tmp_path: Path) -> None:
    data = tmp_path / "head.csv"
    with gzip.open(bundled_wikipedia(), "rt") as src:
        data.write_text("".join(line for _, line in zip(range(3001), src, strict=False)))
    out = tmp_path / "ckpt"
    result = CliRunner().invoke(
        app, ["train", "--out", str(out), "--data", str(data), "--epochs", "1"]
    )
    assert result.exit_code == 0, result.output
    metrics = load_checkpoint(out).meta["metrics"]
    margin = metrics["served_margin"]
    by_margin = metrics["valid_served_mrr_by_margin"]
    line = (
        f"served margin of the last item {margin:g}: valid served MRR "
        f"{by_margin['0.0']:.4f} without it, {by_margin[str(margin)]:.4f} with it"
    )
    assert line in " ".join(result.output.split()), result.output
    # The curves figure draws the baselines on the epochs' own validation events.
    log = load_interactions(data)
    split = load_checkpoint(out).meta["split"]
    bounds = {name: tuple(split[name]) for name in ("train", "valid", "test")}
    recency = evaluate_baseline(log, bounds, "recency", "valid").summary()["mrr"]
    assert f"baselines on the same validation events: recency MRR {recency:.4f}" in " ".join(
        result.output.split()
    )
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

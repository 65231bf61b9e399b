"""streams.plots and `jodie plot`: each figure holds what a reader needs; each PNG is written."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import torch
from matplotlib.colors import to_hex
from typer.testing import CliRunner

from operators.dataset import bundled_wikipedia, load_interactions
from operators.model.checkpoint import load_checkpoint
from streams.cli import app
from streams.plots import (
    PROJECTION_GAPS,
    categories_figure,
    curves_figure,
    save_curves,
    trajectories_figure,
)
from tests.streams.harness import HISTORY, make_checkpoint

PNG = b"\x89PNG\r\n\x1a\n"


def test_curves_are_written_as_json_and_png(tmp_path: Path) -> None:
    curves = {"loss": [3.0, 2.0], "valid_mrr": [0.5, 0.6], "epoch_seconds": [1.0, 1.1]}
    json_path, png_path = save_curves(curves, tmp_path / "ck")
    assert json.loads(json_path.read_text()) == curves
    assert png_path.is_file() and png_path.read_bytes()[:8] == PNG


def test_curves_draw_the_baselines_on_an_axis_from_zero() -> None:
    curves = {"loss": [900.0, 850.0], "valid_mrr": [0.796, 0.798], "epoch_seconds": [1.0, 1.0]}
    fig = curves_figure(curves, {"recency": 0.83, "popularity": 0.04})
    loss_ax, mrr_ax = fig.axes
    assert loss_ax.get_ylim()[0] == 0.0
    assert mrr_ax.get_ylim() == (0.0, 1.0)  # 0.796 → 0.798 is not the whole height
    lines = {str(line.get_label()): line for line in mrr_ax.get_lines()}
    recency = next(line for label, line in lines.items() if label.startswith("recency"))
    popularity = next(line for label, line in lines.items() if label.startswith("popularity"))
    assert np.asarray(recency.get_ydata()).tolist() == [0.83, 0.83]
    assert np.asarray(popularity.get_ydata()).tolist() == [0.04, 0.04]
    model = next(line for label, line in lines.items() if label.startswith("JODIE"))
    assert np.asarray(model.get_ydata()).tolist() == [0.796, 0.798]
    legend = mrr_ax.get_legend()
    assert legend is not None
    assert [t.get_text() for t in legend.get_texts()][1:] == [
        "recency baseline 0.830",
        "popularity baseline 0.040",
    ]
    assert list(mrr_ax.get_xticks()) == [1, 2]  # whole epochs
    assert mrr_ax.get_title() == "Validation MRR: the model against the baselines"


def test_curves_without_baselines_do_not_claim_them() -> None:
    curves = {"loss": [900.0], "valid_mrr": [0.796], "epoch_seconds": [1.0]}
    mrr_ax = curves_figure(curves, None).axes[1]
    assert mrr_ax.get_title() == "Validation MRR"
    assert [str(line.get_label()) for line in mrr_ax.get_lines()] == [
        "JODIE, plain ranking (picks the epoch)"
    ]


def _run(name: str, mrr: float, last: float, older: float, new: float) -> dict:
    cats = {"repeat_last": (0.7, last), "repeat_older": (0.2, older), "new_for_user": (0.1, new)}
    return {
        "model": name,
        "mrr": mrr,
        "split": "test",
        "n_events": 500,
        "by_category": {c: {"share": s, "mrr": m} for c, (s, m) in cats.items()},
    }


def test_category_bars_put_the_model_next_to_the_baselines() -> None:
    runs = [
        _run("jodie+history", 0.8, 0.95, 0.4, 0.05),
        _run("recency", 0.79, 0.97, 0.3, 0.02),
        _run("popularity", 0.04, 0.03, 0.05, 0.03),
    ]
    (ax,) = categories_figure(runs).axes
    groups = ax.containers
    assert len(groups) == 3  # one bar group per run
    heights = [[round(bar.get_height(), 6) for bar in group] for group in groups]
    assert heights == [[0.8, 0.95, 0.4, 0.05], [0.79, 0.97, 0.3, 0.02], [0.04, 0.03, 0.05, 0.03]]
    ticks = [t.get_text() for t in ax.get_xticklabels()]
    assert ticks[0] == "all events" and "70% of events" in ticks[1] and "10% of events" in ticks[3]
    legend = ax.get_legend()
    assert legend is not None
    names = [t.get_text() for t in legend.get_texts()]
    assert names[0].startswith("JODIE") and names[1].startswith("recency")
    assert ax.get_ylim()[0] == 0.0


def test_trajectories_show_distinct_users_their_direction_and_projections(
    tmp_path: Path,
) -> None:
    log = load_interactions(bundled_wikipedia())
    ckpt = load_checkpoint(make_checkpoint(tmp_path / "ckpt"))  # states after HISTORY events
    window = log.slice(HISTORY, HISTORY + 1500)
    before = ckpt.states.users.emb.clone()
    fig = trajectories_figure(ckpt.model, ckpt.states, window, n_users=3)
    assert torch.equal(ckpt.states.users.emb, before)  # the replay ran on a copy
    _whole, ax = fig.axes

    def marks(gid: str) -> list:
        return [c for c in ax.collections if c.get_gid() == gid]

    ends, starts, projected = marks("end"), marks("start"), marks("projection")
    assert len(ends) == len(starts) == len(projected) == 3
    assert all(c.get_label().startswith("user ") for c in ends)  # each user in the legend
    assert len({to_hex(c.get_facecolor()[0]) for c in ends}) == 3  # a colour each
    assert all(to_hex(c.get_facecolor()[0]) == "#ffffff" for c in starts)  # hollow ○
    assert len({tuple(np.round(c.get_offsets()[0], 6)) for c in ends}) == 3
    # Where each user would be after each gap: one point per gap, and users apart after a week.
    assert all(len(c.get_offsets()) == len(PROJECTION_GAPS) for c in projected)
    week = np.array([c.get_offsets()[-1] for c in projected])
    apart = np.linalg.norm(week[:, None] - week[None, :], axis=2)[np.triu_indices(3, 1)]
    assert apart.min() > 1e-3
    # Time's direction: arrows along every path.
    assert len([t for t in ax.texts if t.get_gid() == "time-arrow"]) >= 3


def test_plot_command_writes_each_png(tmp_path: Path) -> None:
    data = tmp_path / "head.csv"
    with gzip.open(bundled_wikipedia(), "rt") as src:
        data.write_text("".join(line for _, line in zip(range(3001), src, strict=False)))
    ckpt = tmp_path / "ckpt"
    runner = CliRunner()
    trained = runner.invoke(
        app, ["train", "--epochs", "2", "--data", str(data), "--out", str(ckpt)]
    )
    assert trained.exit_code == 0, trained.output
    out = tmp_path / "figures"
    result = runner.invoke(
        app,
        [
            "plot",
            "--checkpoint",
            str(ckpt),
            "--data",
            str(data),
            "--out",
            str(out),
            "--events",
            "300",
            "--users",
            "3",
        ],
    )
    assert result.exit_code == 0, result.output
    for name in ("curves.png", "categories.png", "trajectories.png"):
        png = (out / name).read_bytes()
        assert png[:8] == PNG, name
        # A figure of these sizes with empty axes is 10-19 kB; these hold lines and labels.
        assert len(png) > 30_000, (name, len(png))
    assert json.loads((out / "curves.json").read_text())["valid_mrr"]

"""Figures: training curves against the baselines, MRR per kind of event, users' trajectories."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from operators.dataset import InteractionLog
from operators.model.events import encode
from operators.model.jodie import Jodie, standardise_delta
from operators.model.kernel import batched, run_spans
from operators.model.state import States

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: Gaps after a user's last event at which its projected position is drawn.
PROJECTION_GAPS: tuple[tuple[str, float], ...] = (
    ("1 min", 60.0),
    ("1 h", 3600.0),
    ("1 d", 86400.0),
    ("1 wk", 7 * 86400.0),
)
_CATEGORY_LABELS = {
    "all": "all events",
    "repeat_last": "same item as\nthe user's last",
    "repeat_older": "an item the user\ntouched before",
    "new_for_user": "an item new\nto the user",
}
_USER_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    _pyplot().close(fig)
    return path


# --- training curves ---------------------------------------------------------------------------


def curves_figure(
    curves: dict[str, list[float]], baselines: dict[str, float] | None = None
) -> Figure:
    """Loss and validation MRR per epoch; the baselines' validation MRR as horizontal lines.

    Both axes start at 0, so a change of 0.002 MRR looks like what it is.
    """
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    loss, mrr = curves.get("loss", []), curves.get("valid_mrr", [])
    epochs = np.arange(1, len(loss) + 1)
    ax1.plot(epochs, loss, marker="o", color="tab:blue")
    ax1.set(xlabel="epoch", ylabel="sum over t-batches", title="Training loss")
    ax1.set_ylim(0, max([*loss, 1.0]) * 1.15)
    for e, value in zip(epochs, loss, strict=True):
        ax1.annotate(
            f"{value:,.0f}",
            (e, value),
            textcoords="offset points",
            xytext=(0, 7),
            ha="center",
            fontsize="small",
        )
    epochs = np.arange(1, len(mrr) + 1)
    ax2.plot(
        epochs, mrr, marker="o", color="tab:green", label="JODIE, plain ranking (picks the epoch)"
    )
    if mrr:
        best = int(np.argmax(mrr))
        ax2.annotate(
            f"{mrr[best]:.3f}",
            (best + 1, mrr[best]),
            textcoords="offset points",
            xytext=(0, -15),  # below: the recency line often lies just above
            ha="center",
            fontsize="small",
            color="tab:green",
        )
    styles = {"recency": ("tab:gray", "--"), "popularity": ("tab:purple", ":")}
    for name, value in (baselines or {}).items():
        colour, style = styles.get(name, ("black", "-."))
        ax2.axhline(value, color=colour, linestyle=style, label=f"{name} baseline {value:.3f}")
    ax2.set(
        xlabel="epoch",
        ylabel="MRR (1 = true next item ranked first)",
        title="Validation MRR: the model against the baselines" if baselines else "Validation MRR",
    )
    ax2.set_ylim(0, 1)
    ax2.legend(loc="best", fontsize="small")  # low MRRs (sparse logs) sit at the bottom
    n_epochs = max(len(loss), len(mrr), 1)
    for ax in (ax1, ax2):
        if n_epochs <= 12:
            ax.set_xticks(range(1, n_epochs + 1))
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlim(0.5, n_epochs + 0.5)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def save_curves(
    curves: dict[str, list[float]], out_dir: Path, baselines: dict[str, float] | None = None
) -> tuple[Path, Path]:
    """Write training curves as JSON and PNG into ``out_dir`` (a checkpoint's, or any);
    ``baselines``: name → validation MRR, drawn as horizontal lines."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "curves.json"
    json_path.write_text(json.dumps(curves, indent=2))
    return json_path, _save(curves_figure(curves, baselines), out_dir / "curves.png")


# --- MRR per kind of event -----------------------------------------------------------------------


_RUN_LABELS = {
    "jodie+history": "JODIE + history scorer (served)",
    "jodie+plain": "JODIE, plain ranking",
    "recency": "recency: the user's items, latest first",
    "popularity": "popularity: most touched items",
}


def categories_figure(runs: list[dict[str, Any]]) -> Figure:
    """MRR of each run (``jodie evaluate`` summaries on the same events) overall and per kind
    of event: the user's last item again, an older item of the user's, an item new to it."""
    plt = _pyplot()
    first = runs[0]["by_category"]
    cats = ["all", *[c for c in _CATEGORY_LABELS if c in first]]
    fig, ax = plt.subplots(figsize=(11, 5))
    width = 0.8 / len(runs)
    x = np.arange(len(cats))
    colours = ["tab:green", "tab:gray", "tab:purple", "tab:olive", "tab:cyan"]
    for n, run in enumerate(runs):
        values = [run["mrr"] if c == "all" else run["by_category"][c]["mrr"] for c in cats]
        bars = ax.bar(
            x + (n - (len(runs) - 1) / 2) * width,
            values,
            width,
            label=_RUN_LABELS.get(run["model"], run["model"]),
            color=colours[n % len(colours)],
        )
        ax.bar_label(bars, fmt="%.3f", fontsize="small", padding=2)
    labels = [
        _CATEGORY_LABELS[c] + ("" if c == "all" else f"\n{first[c]['share']:.0%} of events")
        for c in cats
    ]
    ax.set_xticks(x, labels)
    ax.set_ylim(0, 1.22)  # room for the legend above the bars
    ax.set_yticks(np.linspace(0.0, 1.0, 6))
    ax.set(
        ylabel="MRR (1 = the true next item ranked first)",
        title=f"MRR by what the user did next: {runs[0]['n_events']:,} events of the "
        f"{runs[0]['split']} split, frozen weights",
    )
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small", loc="upper center", ncols=len(runs))
    fig.tight_layout()
    return fig


def save_categories(runs: list[dict[str, Any]], out_png: Path) -> Path:
    return _save(categories_figure(runs), out_png)


# --- trajectories --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Trajectory:
    """One user's dynamic embedding u(t): its state before the window (when it had one), then
    after each of its events in the window."""

    times: np.ndarray  # (T,) seconds: its last event before the window, then its events
    emb: np.ndarray  # (T, d)


def user_trajectories(
    model: Jodie, states: States, log: InteractionLog, user_ids: list[str], timespan: float
) -> dict[str, Trajectory]:
    """Replay ``log`` (no grad) from ``states`` (changed in place: pass a copy) and return each
    user's u(t), starting from its state in ``states`` (the initial state if it has none)."""
    cfg = model.config
    users = states.users
    before = {u: users.row(u) is not None for u in user_ids}
    data = batched(encode(log, states), cfg, timespan)  # adds the window's new users
    wanted = {users.row(u): u for u in user_ids}
    rows_of_interest = np.array(list(wanted), dtype=np.int64)
    record: dict[str, list[tuple[float, np.ndarray]]] = {}
    for row, u in wanted.items():
        # A user new in the window has no state before it (its row is not meaningful yet).
        record[u] = (
            [(float(users.last_time[row]), users.emb[row].numpy().copy())] if before[u] else []
        )

    def hook(sl: slice, pred: Tensor, u_new: Tensor) -> None:
        rows = data.ev.user_rows[sl]
        for h in np.flatnonzero(np.isin(rows, rows_of_interest)).tolist():
            record[wanted[int(rows[h])]].append(
                (float(data.ev.timestamps[sl][h]), u_new[h].numpy().copy())
            )

    model.eval()
    run_spans(
        model, states, data.ev, data.evt, data.tb.bounds, data.tb.span_bounds, None, on_predict=hook
    )
    out = {}
    for u, pts in record.items():
        pts.sort(key=lambda p: p[0])
        out[u] = Trajectory(np.array([p[0] for p in pts]), np.stack([p[1] for p in pts]))
    return out


def projections(model: Jodie, u: np.ndarray) -> np.ndarray:
    """û(t + Δ) of one state u (d,) for each of PROJECTION_GAPS: (G, d)."""
    cfg = model.config
    gaps = np.array([g for _, g in PROJECTION_GAPS])
    delta = standardise_delta(gaps, cfg.delta_user_mean, cfg.delta_user_std).reshape(-1, 1)
    with torch.no_grad():
        start = torch.from_numpy(np.repeat(u[None, :], len(gaps), axis=0))
        return model.project(start, torch.from_numpy(delta)).numpy()


def active_users(states: States, log: InteractionLog, pool: int, min_events: int) -> list[str]:
    """The ``pool`` most active users of ``log`` with at least ``min_events`` events there and a
    state in ``states`` (their path starts from it)."""
    ids, counts = np.unique(log.user_ids, return_counts=True)
    order = np.argsort(-counts, kind="stable")
    users = states.users
    found = [
        str(ids[k]) for k in order if counts[k] >= min_events and users.row(str(ids[k])) is not None
    ]
    return found[:pool]


def spread_out(ends: dict[str, np.ndarray], n: int) -> list[str]:
    """``n`` of ``ends``' users (ordered most active first): the first, then each next the one
    whose end state is farthest from those chosen, so the figure shows different users."""
    names = list(ends)
    emb = np.stack([ends[u] for u in names])
    chosen = [0]
    while len(chosen) < min(n, len(names)):
        dist = np.min(np.linalg.norm(emb[:, None, :] - emb[None, chosen, :], axis=2), axis=1)
        chosen.append(int(np.argmax(dist)))
    return [names[k] for k in chosen]


def trajectories_figure(
    model: Jodie,
    states: States,
    window: InteractionLog,
    n_users: int = 4,
    timespan: float = 0.0,
    pool: int = 100,
    min_events: int = 5,
) -> Figure:
    """Users' u(t) over ``window`` (the events after ``states``), drawn in the plane of the
    two main directions along which all users' states differ.

    The users: the most active of the window, then those whose states end farthest from the
    users already chosen (among the ``pool`` most active with ``min_events`` events or more).
    Each path runs light to dark with time, from ○ (its state before the window) to ★ (after
    its last event); ✚ marks where the model projects it 1 min, 1 h, 1 d and 1 wk later.
    """
    plt = _pyplot()
    known = ~np.isnan(states.users.last_time)
    population = states.users.emb.numpy()[known]
    mean = population.mean(axis=0)
    _, s, vt = np.linalg.svd(population - mean, full_matrices=False)
    basis = vt[:2].T  # (d, 2)
    explained = (s[:2] ** 2) / max(float((s**2).sum()), 1e-12)
    span = timespan or max((float(window.timestamps[-1]) - float(window.timestamps[0])) / 500, 1.0)
    candidates = active_users(states, window, pool, min_events) or [str(window.user_ids[0])]
    paths = user_trajectories(model, states.copy(), window, candidates, span)
    chosen = spread_out({u: paths[u].emb[-1] for u in candidates}, n_users)

    cloud = (population - mean) @ basis
    drawn = {u: (paths[u].emb - mean) @ basis for u in chosen}
    projected = {u: (projections(model, paths[u].emb[-1]) - mean) @ basis for u in chosen}
    fig, (whole, ax) = plt.subplots(1, 2, figsize=(15, 7), gridspec_kw={"width_ratios": [1, 1.9]})
    for axis in (whole, ax):
        axis.scatter(cloud[:, 0], cloud[:, 1], s=3, color="0.82", zorder=1)
        axis.grid(alpha=0.25)
        axis.set(
            xlabel=f"direction 1 ({explained[0]:.0%} of the spread of users' states)",
            ylabel=f"direction 2 ({explained[1]:.0%})",
        )
    for n, u in enumerate(chosen):
        colour = _USER_COLOURS[n % len(_USER_COLOURS)]
        mine = window.user_ids == u
        events, items = int(mine.sum()), len(np.unique(window.item_ids[mine]))
        label = f"user {u}: {events} events on {items} item{'s' if items != 1 else ''}"
        _draw_path(ax, drawn[u], colour, label)
        _draw_projections(ax, drawn[u][-1], projected[u], colour)
        whole.plot(drawn[u][:, 0], drawn[u][:, 1], color=colour, linewidth=1, zorder=3)
    shown = np.vstack([*drawn.values(), *projected.values()])
    low, high = shown.min(axis=0), shown.max(axis=0)
    pad = 0.08 * np.maximum(high - low, 1e-3)
    ax.set_xlim(low[0] - pad[0], high[0] + pad[0])
    ax.set_ylim(low[1] - pad[1], high[1] + pad[1])
    from matplotlib.patches import Rectangle

    whole.add_patch(
        Rectangle(
            (low[0] - pad[0], low[1] - pad[1]),
            high[0] - low[0] + 2 * pad[0],
            high[1] - low[1] + 2 * pad[1],
            fill=False,
            edgecolor="black",
            linestyle="--",
            zorder=4,
        )
    )
    whole.set_title(
        f"All {len(population):,} users' states before the window (grey);\n"
        "the box is the view on the right"
    )
    ax.set_title(
        f"{len(chosen)} users over the next {len(window):,} events: ○ before → ★ after their "
        "last event\n(light → dark with time); ✚ where the model projects them after "
        "1 min → 1 h → 1 d → 1 wk (dotted)"
    )
    ax.legend(fontsize="small", loc="best", markerscale=0.7)
    fig.tight_layout()
    return fig


def _draw_path(ax: Any, xy: np.ndarray, colour: str, label: str) -> None:
    """One user's path: segments and dots light → dark with time, arrows along it, ○ at its
    start and ★ at its end."""
    from matplotlib.collections import LineCollection
    from matplotlib.colors import LinearSegmentedColormap, to_rgb

    rgb = to_rgb(colour)
    cmap = LinearSegmentedColormap.from_list(label, [tuple(0.45 * c + 0.55 for c in rgb), rgb])
    if len(xy) > 1:
        segments = np.stack([xy[:-1], xy[1:]], axis=1)  # (T - 1, 2, 2)
        lines = LineCollection(list(segments), cmap=cmap, linewidths=1.6, zorder=3)
        lines.set_array(np.linspace(0.0, 1.0, len(segments)))
        ax.add_collection(lines)
        for k in np.unique(np.linspace(0, len(segments) - 1, 6).astype(int)):
            (x0, y0), (x1, y1) = segments[k]
            ax.annotate(
                "",
                xy=(x1, y1),
                xytext=((x0 + x1) / 2, (y0 + y1) / 2),
                arrowprops={
                    "arrowstyle": "-|>",
                    "mutation_scale": 16,
                    "color": cmap(k / max(len(segments) - 1, 1)),
                    "lw": 1.2,
                },
                zorder=4,
                gid="time-arrow",
            )
    ax.scatter(xy[:, 0], xy[:, 1], s=7, c=np.linspace(0.0, 1.0, len(xy)), cmap=cmap, zorder=4)
    ax.scatter(
        *xy[0], s=90, facecolors="white", edgecolors=colour, linewidths=2, zorder=5, gid="start"
    )
    ax.scatter(
        *xy[-1],
        gid="end",
        s=230,
        color=colour,
        edgecolors="black",
        linewidths=0.6,
        marker="*",
        zorder=6,
        label=label,
    )


def _draw_projections(ax: Any, end: np.ndarray, proj: np.ndarray, colour: str) -> None:
    """The projections after PROJECTION_GAPS, dotted from the user's last state; gaps that
    land on the same spot share one label."""
    path = np.vstack([end[None, :], proj])
    ax.plot(path[:, 0], path[:, 1], linestyle=":", color=colour, linewidth=1.2, zorder=5)
    ax.scatter(
        proj[:, 0],
        proj[:, 1],
        marker="P",
        gid="projection",
        s=55,
        color=colour,
        edgecolors="black",
        linewidths=0.4,
        zorder=6,
    )
    scale = float(np.ptp(proj, axis=0).max()) or 1.0
    groups: list[list[int]] = []
    for k in range(len(proj)):
        if groups and np.linalg.norm(proj[k] - proj[groups[-1][0]]) < 0.03 * scale:
            groups[-1].append(k)
        else:
            groups.append([k])
    for n, group in enumerate(groups):
        text = ", ".join(PROJECTION_GAPS[k][0] for k in group)
        # Alternate above and below: neighbouring gaps often land close together.
        ax.annotate(
            text,
            tuple(proj[group[-1]]),
            textcoords="offset points",
            xytext=(6, 4 if n % 2 == 0 else -11),
            fontsize="x-small",
            color=colour,
        )


def plot_trajectories(
    model: Jodie,
    states: States,
    window: InteractionLog,
    out_png: Path,
    n_users: int = 4,
    timespan: float = 0.0,
) -> Path:
    """Draw ``trajectories_figure`` into ``out_png``."""
    return _save(trajectories_figure(model, states, window, n_users, timespan), out_png)

"""Figures: training curves, and a few users' embedding trajectories in 2-D (PCA)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from operators.dataset import InteractionLog
from operators.model.events import encode
from operators.model.jodie import Jodie, standardise_delta
from operators.model.kernel import batched, run_spans
from operators.model.state import States


def user_trajectories(
    model: Jodie, log: InteractionLog, user_ids: list[str], timespan: float
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Replay ``log`` (no grad) and return, per user, event times (T,) and u(t) (T, d)."""
    cfg = model.config
    states = States.empty(
        cfg.embedding_dim, cfg.user_static_dim, cfg.item_static_dim, max(1, cfg.history_size)
    )
    data = batched(encode(log, states), cfg, timespan)
    wanted = {states.users.row(u): u for u in user_ids}
    rows_of_interest = np.array([r for r in wanted if r is not None], dtype=np.int64)
    record: dict[str, list[tuple[float, np.ndarray]]] = {u: [] for u in user_ids}

    def hook(sl: slice, pred: Tensor, u_new: Tensor) -> None:
        rows = data.ev.user_rows[sl]
        hit = np.flatnonzero(np.isin(rows, rows_of_interest))
        for h in hit.tolist():
            record[wanted[int(rows[h])]].append(
                (float(data.ev.timestamps[sl][h]), u_new[h].numpy().copy())
            )

    model.eval()
    run_spans(
        model, states, data.ev, data.evt, data.tb.bounds, data.tb.span_bounds, None, on_predict=hook
    )
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for u, pts in record.items():
        pts.sort(key=lambda p: p[0])
        out[u] = (np.array([p[0] for p in pts]), np.stack([p[1] for p in pts]))
    return out


def plot_trajectories(
    model: Jodie,
    log: InteractionLog,
    out_png: Path,
    n_users: int = 4,
    timespan: float = 0.0,
    max_events: int = 5000,
) -> Path:
    """Draw the trajectories of the ``n_users`` most active users among the first events."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    log = log.slice(0, min(len(log), max_events))
    ids, counts = np.unique(log.user_ids, return_counts=True)
    chosen = [str(u) for u in ids[np.argsort(-counts, kind="stable")[:n_users]]]
    traj = user_trajectories(model, log, chosen, timespan or (float(log.timestamps[-1]) / 500))
    stacked = np.concatenate([e for _, e in traj.values()])
    mean = stacked.mean(axis=0)
    _, _, vt = np.linalg.svd(stacked - mean, full_matrices=False)
    basis = vt[:2].T  # (d, 2)
    cfg = model.config
    fig, ax = plt.subplots(figsize=(7, 6))
    for u, (_, emb) in traj.items():
        xy = (emb - mean) @ basis
        line = ax.plot(xy[:, 0], xy[:, 1], marker=".", linewidth=0.8, label=f"user {u}")[0]
        # where the model projects the user after its last event, for growing gaps
        gaps = np.array([60.0, 3600.0, 86400.0, 7 * 86400.0])
        with torch.no_grad():
            delta = torch.from_numpy(
                standardise_delta(gaps, cfg.delta_user_mean, cfg.delta_user_std)
            ).reshape(-1, 1)
            last = torch.from_numpy(emb[-1:]).repeat(len(gaps), 1)
            proj = model.project(last, delta).numpy()
        pxy = (proj - mean) @ basis
        ax.scatter(pxy[:, 0], pxy[:, 1], marker="x", color=line.get_color())
    ax.set(
        title="User trajectories u(t) (PCA); × = projections after 1 min, 1 h, 1 d, 1 wk",
        xlabel="PC 1",
        ylabel="PC 2",
    )
    ax.legend(fontsize="small")
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png


def save_curves(curves: dict[str, list[float]], out_dir: Path) -> tuple[Path, Path]:
    """Write training curves as JSON and PNG into ``out_dir`` (a checkpoint's, or any)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "curves.json"
    json_path.write_text(json.dumps(curves, indent=2))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    epochs = np.arange(1, len(curves.get("loss", [])) + 1)
    ax1.plot(epochs, curves.get("loss", []), marker="o")
    ax1.set(xlabel="epoch", ylabel="training loss (sum over t-batches)", title="Training loss")
    ax2.plot(epochs, curves.get("valid_mrr", []), marker="o", color="tab:green")
    ax2.set(xlabel="epoch", ylabel="MRR", title="Validation MRR (frozen)")
    fig.tight_layout()
    png_path = out_dir / "curves.png"
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return json_path, png_path

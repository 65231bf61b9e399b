"""`jodie train`, `jodie evaluate` and `jodie plot`: the model commands of the CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import numpy as np
import typer

from streams.cli.common import console

if TYPE_CHECKING:
    from operators.model.config import TrainConfig
    from operators.training.run import RunResult

DataOpt = Annotated[
    Path | None, typer.Option("--data", help="JODIE CSV (plain or .gz); default: bundled Wikipedia")
]
CheckpointOpt = Annotated[
    Path, typer.Option("--checkpoint", exists=True, file_okay=False, help="checkpoint directory")
]
ScorerName = Literal["history", "ranker", "plain"]


def _data_path(data: Path | None) -> Path:
    from operators.dataset import bundled_wikipedia

    # Checked here, not by the option: a wrong combination of options is the first thing to say.
    if data is not None and not data.is_file():
        raise typer.BadParameter(f"file '{data}' does not exist", param_hint="'--data'")
    return data if data is not None else bundled_wikipedia()


def _load(path: Path) -> Any:
    from operators.dataset import load_interactions
    from operators.exceptions import BadRowError

    errors: list[BadRowError] = []
    log = load_interactions(path, errors=errors)
    if errors:
        console.print(f"[yellow]skipped {len(errors)} bad rows (first: {errors[0]})[/yellow]")
    return log


def train(
    out: Annotated[Path, typer.Option("--out", help="checkpoint directory to write")],
    data: DataOpt = None,
    from_topic: Annotated[
        bool,
        typer.Option(
            "--from-topic",
            help="train on interactions.log instead of a CSV; the checkpoint's states are "
            "then at the end of the replayed window, where serving resumes",
        ),
    ] = False,
    from_seq: Annotated[
        int | None, typer.Option(help="--from-topic: first seq to replay (inclusive)")
    ] = None,
    until_seq: Annotated[
        int | None, typer.Option(help="--from-topic: seq to stop before (exclusive)")
    ] = None,
    from_time: Annotated[
        float | None, typer.Option(help="--from-topic: first event time to replay (inclusive)")
    ] = None,
    until_time: Annotated[
        float | None, typer.Option(help="--from-topic: event time to stop before (exclusive)")
    ] = None,
    epochs: Annotated[
        int, typer.Option(min=1, help="training epochs; the best by validation MRR is kept")
    ] = 10,
    seed: Annotated[int, typer.Option(help="random seed (runs are deterministic for a seed)")] = 0,
    scorer: Annotated[
        ScorerName,
        typer.Option(
            help="candidate scorer: 'history' (JODIE + learned recency bonus), 'ranker' "
            "(JODIE + learned ranker over item, history and user features) or 'plain'"
        ),
    ] = "history",
    threads: Annotated[int, typer.Option(min=1, help="torch intra-op threads")] = 1,
) -> None:
    """Train JODIE with t-batches on the first 80% of the events and write a checkpoint.

    With --from-topic the events are the committed interactions.log in canonical order
    (optionally a window of seqs and/or event times), split 80/10/10 like a CSV.
    """
    import torch

    from operators.model.config import ModelConfig, TrainConfig
    from operators.training.run import run_training
    from streams.plots import save_curves
    from streams.progress import TrainingBar

    window_given = any(v is not None for v in (from_seq, until_seq, from_time, until_time))
    if from_topic and data is not None:
        raise typer.BadParameter("--from-topic and --data are mutually exclusive")
    if window_given and not from_topic:
        raise typer.BadParameter("--from/--until-seq and --from/--until-time need --from-topic")
    torch.set_num_threads(threads)
    config = TrainConfig(
        epochs=epochs,
        seed=seed,
        threads=threads,
        model=ModelConfig(scorer=scorer),
    )
    baselines: dict[str, float] | None = None
    if from_topic:
        run = _train_from_topic(out, config, from_seq, until_seq, from_time, until_time)
    else:
        from operators.evaluation.baselines import evaluate_baseline

        path = _data_path(data)
        log = _load(path)
        run = run_training(log, config, out_dir=out, data_path=path, progress=TrainingBar())
        split = run.result.split
        bounds = {name: split.bounds(name) for name in ("train", "valid", "test")}
        # The same validation events the epochs were scored on, for the figure's lines.
        baselines = {
            kind: evaluate_baseline(log, bounds, kind, "valid").summary()["mrr"]
            for kind in ("recency", "popularity")
        }
    res = run.result
    save_curves(res.curves, out, baselines)
    console.print(
        f"best epoch {res.best_epoch + 1}/{epochs}: valid MRR (frozen, plain) "
        f"{res.metrics['valid_mrr_frozen']:.4f}; "
        f"{np.mean(res.curves['epoch_seconds']):.1f} s/epoch; checkpoint {run.checkpoint}"
    )
    if baselines is not None:
        console.print(
            f"baselines on the same validation events: recency MRR {baselines['recency']:.4f}, "
            f"popularity {baselines['popularity']:.4f} (lines in {out / 'curves.png'})"
        )
    if "served_margin" in res.metrics:
        by_margin = res.metrics["valid_served_mrr_by_margin"]
        margin = res.metrics["served_margin"]
        console.print(
            f"served margin of the last item {margin:g}: valid served MRR "
            f"{by_margin['0.0']:.4f} without it, {by_margin[str(margin)]:.4f} with it"
        )


def _train_from_topic(
    out: Path,
    config: TrainConfig,
    from_seq: int | None,
    until_seq: int | None,
    from_time: float | None,
    until_time: float | None,
) -> RunResult:
    from operators.training.holdout import holdout_config, holdout_size
    from operators.training.run import run_training
    from streams.progress import TrainingBar
    from streams.replay import Window, replay_log
    from streams.settings import get_settings

    settings = get_settings()
    window = Window(from_seq, until_seq, from_time, until_time)
    replayed = replay_log(settings, window, progress=True)
    log, seqs = replayed.log, replayed.seqs
    if replayed.after_gap:
        console.print(
            f"[yellow]{replayed.after_gap} events after a missing seq were left out "
            "(a transaction committed while reading began); the window ends before it[/yellow]"
        )
    # Fewer events leave an empty validation split, which cannot pick an epoch.
    if len(log) < 10:
        console.print(f"[red]error:[/red] the window holds {len(log)} events; need at least 10")
        raise typer.Exit(code=2)
    console.print(
        f"replayed {len(log):,} events, seq {int(seqs[0])}..{int(seqs[-1])}, from "
        f"{replayed.read:,} read in {replayed.seconds:.1f} s ({replayed.events_per_s:,.0f} ev/s)"
    )
    source = replayed.source(settings.topic("interactions.log"), window)
    # Fit on everything but the newest JODIE_HOLDOUT_EVENTS, which pick the epoch; the
    # states then run over them to the end of the window (streams.trainer).
    fit = holdout_config(config, len(log), settings.holdout_events)
    console.print(
        f"fitting on seq {int(seqs[0])}..{int(seqs[int(fit.train_fraction * len(log)) - 1])}, "
        f"the newest {holdout_size(len(log), settings.holdout_events):,} held out"
    )
    return run_training(log, fit, out_dir=out, seqs=seqs, source=source, progress=TrainingBar())


def evaluate(
    checkpoint: Annotated[
        Path | None,
        typer.Option(
            "--checkpoint",
            exists=True,
            file_okay=False,
            help="checkpoint directory (optional for --baseline)",
        ),
    ] = None,
    data: DataOpt = None,
    protocol: Annotated[
        Literal["frozen", "paper"],
        typer.Option(help="'frozen' (weights fixed, as the stream) or 'paper' (keeps training)"),
    ] = "frozen",
    split: Annotated[Literal["valid", "test"], typer.Option(help="'valid' or 'test'")] = "test",
    limit: Annotated[
        int | None, typer.Option(min=1, help="score only the first N events of the split")
    ] = None,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="write the metrics as JSON")
    ] = None,
    export_states: Annotated[
        Path | None, typer.Option("--export-states", help="write final embeddings to this .npz")
    ] = None,
    baseline: Annotated[
        Literal["recency", "popularity"] | None,
        typer.Option(help="evaluate a baseline instead: 'recency' or 'popularity'"),
    ] = None,
    scorer: Annotated[
        ScorerName | None,
        typer.Option(
            help="override the checkpoint's scorer: 'plain', 'history' or 'ranker' (fitted "
            "on the training split now if the checkpoint holds no fitted one)"
        ),
    ] = None,
    compare: Annotated[
        bool,
        typer.Option(
            "--compare",
            help="also evaluate plain JODIE (and the history scorer, for the ranker) and both "
            "baselines on the same events; one table",
        ),
    ] = False,
    served: Annotated[
        bool,
        typer.Option(
            "--served/--no-served",
            help="frozen: also measure the lists the stream serves after each event, and a "
            "recent-then-popular heuristic's (positions of each next item)",
        ),
    ] = True,
    horizons: Annotated[
        str,
        typer.Option(
            help="served lists: horizons in seconds to compare, 'mean' = the model's mean "
            "user gap (what the stream uses unless JODIE_HORIZON_S is set)"
        ),
    ] = "0,60,3600,86400,mean",
    k: Annotated[int, typer.Option(help="served lists: their length")] = 10,
) -> None:
    """Rank the true next item for each event of a split; print MRR and Recall@10.

    Frozen, it also measures what users are served (``--served``): for each event, the
    position of its item in the list served to its user after their previous event.
    """
    from operators.model.checkpoint import load_checkpoint

    if checkpoint is None and baseline is None:
        raise typer.BadParameter("--checkpoint is required unless --baseline is given")
    if compare and checkpoint is None:
        raise typer.BadParameter("--compare needs --checkpoint")
    try:
        horizon_list = tuple(
            None if h.strip() == "mean" else float(h) for h in horizons.split(",") if h.strip()
        )
    except ValueError:
        raise typer.BadParameter(
            f"--horizons: numbers or 'mean', comma-separated: {horizons}"
        ) from None
    if not horizon_list or k < 1:
        raise typer.BadParameter("--horizons needs at least one value and --k at least 1")
    path = _data_path(data)
    ckpt = load_checkpoint(checkpoint) if checkpoint is not None else None
    if ckpt is not None and ckpt.last_seq is not None and baseline is None:
        # Its states already went through the validation and test events; replaying them
        # again on top would score a model that has seen them.
        raise typer.BadParameter(
            "this checkpoint was trained --from-topic: its states are at the end of the "
            "replayed window, past the validation and test splits (see its metrics instead)"
        )
    log = _load(path)
    bounds = _bounds(ckpt, log, path)
    runs: list[dict[str, Any]] = []
    if baseline is not None:
        runs.append(_baseline(log, bounds, baseline, split, limit, protocol))
    else:
        assert ckpt is not None
        wanted = ckpt.config.scorer if scorer is None else scorer
        extra = ["history"] if compare and wanted == "ranker" else []
        names = [wanted, *extra, *(["plain"] if compare and wanted != "plain" else [])]
        tensors, states = _prepare(ckpt, log, bounds, names)
        for n, name in enumerate(names):
            # The replay changes the states it runs on: each run from a fresh load.
            run_ckpt = ckpt if n == 0 else load_checkpoint(checkpoint)  # type: ignore[arg-type]
            run_ckpt.scorer_tensors = tensors
            if states is not None:
                run_ckpt.states = states.copy()
            lists = None
            if served and protocol == "frozen" and n == 0:
                from operators.evaluation.served import ServedLists

                lists = ServedLists(horizon_list, k)
            runs.append(_model_run(run_ckpt, log, bounds, protocol, split, name, limit, lists))
            if n == 0 and export_states is not None:
                _export(export_states, run_ckpt.states)
        if compare:
            for kind in ("recency", "popularity"):
                runs.append(_baseline(log, bounds, kind, split, limit, protocol))
    for summary in runs:
        _print(summary)
    if compare:
        _print_table(runs)
    if json_out is not None:
        out: Any = runs[0] if len(runs) == 1 else {"runs": runs}
        json_out.write_text(json.dumps(out, indent=2))


def _prepare(
    ckpt: Any, log: Any, bounds: dict[str, tuple[int, int]], names: list[str]
) -> tuple[dict[str, Any], Any]:
    """Scorer parameters for every run in ``names`` and, for a checkpoint saved before the
    ranker's user state existed, states rebuilt for it; both from the training split only."""
    from operators.evaluation.scorer import fitted
    from operators.training.run import fit_scorer, rebuilt_states

    tensors = dict(ckpt.scorer_tensors)
    train_log = log.slice(*bounds["train"])
    timespan = float(ckpt.meta.get("timespan", 0.0))
    states = None
    if "ranker" in names and ckpt.states.users.missing:
        console.print(
            "this checkpoint predates the ranker's user state "
            f"({', '.join(ckpt.states.users.missing)}): replaying the training split"
        )
        states = rebuilt_states(ckpt.model, train_log, timespan)
    for name in names:
        if not fitted(ckpt.config.with_(scorer=name), tensors):
            console.print(f"fitting the {name} scorer on the end of the training split")
            tensors.update(fit_scorer(ckpt.model, train_log, timespan, name))  # type: ignore[arg-type]
    return tensors, states


def _bounds(ckpt: Any, log: Any, path: Path) -> dict[str, tuple[int, int]]:
    """The checkpoint's own split of this file, or the configured fractions of it."""
    from operators.dataset import file_fingerprint
    from operators.model.config import TrainConfig
    from operators.training.trainer import Split

    stored = ckpt.meta.get("split") if ckpt is not None else None
    if ckpt is not None:
        fingerprint = ckpt.meta.get("data_fingerprint")
        if fingerprint and fingerprint != file_fingerprint(path):
            console.print(
                "[yellow]warning: the data differs from the checkpoint's training file[/yellow]"
            )
    if stored and stored["test"][1] == len(log):
        return {key: (int(v[0]), int(v[1])) for key, v in stored.items()}
    tc = ckpt.train_config if ckpt is not None else TrainConfig()
    sp = Split.of(len(log), tc.train_fraction, tc.valid_fraction)
    return {key: sp.bounds(key) for key in ("train", "valid", "test")}


def _baseline(
    log: Any,
    bounds: dict[str, tuple[int, int]],
    kind: str,
    split: str,
    limit: int | None,
    protocol: str,
) -> dict[str, Any]:
    from operators.evaluation.baselines import evaluate_baseline

    result = evaluate_baseline(log, bounds, kind, split, limit)  # type: ignore[arg-type]
    result.protocol = protocol
    return {**result.summary(), "model": kind}


def _model_run(
    ckpt: Any,
    log: Any,
    bounds: dict[str, tuple[int, int]],
    protocol: str,
    split: str,
    scorer: str,
    limit: int | None,
    lists: Any,
) -> dict[str, Any]:
    import torch

    from operators.evaluation.protocols import evaluate as run_eval
    from operators.evaluation.scorer import make_scorer

    torch.set_num_threads(1)
    config = ckpt.config.with_(scorer=scorer)
    result = run_eval(
        ckpt.model,
        ckpt.states,
        log,
        bounds,
        protocol,  # type: ignore[arg-type]
        split,  # type: ignore[arg-type]
        make_scorer(config, ckpt.scorer_tensors),
        limit,
        ckpt.train_config,
        float(ckpt.meta.get("timespan", 0.0)),
        served=lists,
    )
    return {**result.summary(), "model": f"jodie+{config.scorer}"}


def _export(path: Path, states: Any) -> None:
    np.savez(
        path,
        user_ids=np.asarray(states.users.ids, dtype=str),
        user_embeddings=states.users.emb.numpy().astype(np.float32),
        item_ids=np.asarray(states.items.ids, dtype=str),
        item_embeddings=states.items.emb.numpy().astype(np.float32),
    )


def _print(summary: dict[str, Any]) -> None:
    head = (
        f"{summary['model']} {summary['protocol']} {summary['split']}: "
        f"MRR {summary['mrr']:.4f}  Recall@10 {summary['recall_at_10']:.4f}  "
        f"events {summary['n_events']}"
    )
    if "state_change_auc" in summary:
        head += f"  state-change AUC {summary['state_change_auc']:.4f}"
    typer.echo(head)
    for name, row in summary.get("by_category", {}).items():
        typer.echo(
            f"  {name:<13} share {row['share']:.3f}  MRR {row['mrr']:.4f}  "
            f"Recall@10 {row['recall_at_10']:.4f}"
        )
    served = summary.get("served")
    if served:
        k = served["k"]
        typer.echo(
            f"  served lists (k={k}; the list after the user's previous event, "
            f"{served['covered']} events with one):"
        )
        for row in served["by_horizon"]:
            h = "mean gap" if row["horizon_s"] is None else f"{row['horizon_s']:g} s"
            typer.echo(
                f"    model, horizon {h:<9} served Recall@{k} {row['recall']:.4f}  "
                f"served MRR {row['mrr']:.4f}"
            )
        row = served["heuristic"]
        typer.echo(
            f"    recent-then-popular     served Recall@{k} {row['recall']:.4f}  "
            f"served MRR {row['mrr']:.4f}"
        )


def _print_table(runs: list[dict[str, Any]]) -> None:
    """MRR / Recall@10 of each run, overall and per category, side by side."""
    cats = list(dict.fromkeys(c for r in runs for c in r.get("by_category", {})))
    width = max(len(r["model"]) for r in runs)
    head = f"{'':<{width}}  {'all':>15}" + "".join(f"  {c:>15}" for c in cats)
    typer.echo("\nMRR / Recall@10 on the same events")
    shares = runs[0].get("by_category", {})
    typer.echo(head)
    typer.echo(
        f"{'share':<{width}}  {1.0:>15.3f}"
        + "".join(f"  {shares.get(c, {}).get('share', 0.0):>15.3f}" for c in cats)
    )
    for r in runs:
        cells = [f"{r['mrr']:.4f} / {r['recall_at_10']:.4f}"]
        for c in cats:
            row = r.get("by_category", {}).get(c)
            cells.append("-" if row is None else f"{row['mrr']:.4f} / {row['recall_at_10']:.4f}")
        typer.echo(f"{r['model']:<{width}}" + "".join(f"  {cell:>15}" for cell in cells))


def plot(
    checkpoint: CheckpointOpt,
    out: Annotated[Path, typer.Option("--out", help="directory for the PNG files")],
    data: DataOpt = None,
    users: Annotated[int, typer.Option(min=1, help="how many users' trajectories to draw")] = 4,
    events: Annotated[
        int, typer.Option(min=1, help="trajectories: events after the training split to follow")
    ] = 5000,
    limit: Annotated[
        int | None, typer.Option(min=1, help="categories: score only the first N test events")
    ] = None,
) -> None:
    """curves.png (training curves against the baselines), categories.png (test MRR per kind
    of event, the model against the baselines) and trajectories.png (users' u(t), 2-D)."""
    import torch

    from operators.evaluation.baselines import evaluate_baseline
    from operators.model.checkpoint import load_checkpoint
    from streams.plots import plot_trajectories, save_categories, save_curves

    torch.set_num_threads(1)  # small per-event batches: more threads only contend
    ckpt = load_checkpoint(checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    curves = ckpt.meta.get("curves") or {}
    if ckpt.last_seq is not None:
        _, curves_png = save_curves(curves, out)
        console.print(
            "[yellow]trained --from-topic: its states are past any file's splits, so only "
            "the curves are drawn (no baselines, categories or trajectories)[/yellow]"
        )
        typer.echo(f"wrote {curves_png}")
        return
    path = _data_path(data)
    log = _load(path)
    bounds = _bounds(ckpt, log, path)
    baselines = {
        kind: evaluate_baseline(log, bounds, kind, "valid").summary()["mrr"]
        for kind in ("recency", "popularity")
    }
    _, curves_png = save_curves(curves, out, baselines)
    start = bounds["train"][1]
    traj_png = plot_trajectories(
        ckpt.model,
        ckpt.states,
        log.slice(start, min(len(log), start + events)),
        out / "trajectories.png",
        n_users=users,
        timespan=float(ckpt.meta.get("timespan", 0.0)),
    )
    console.print("scoring the test split (model and baselines) for categories.png ...")
    runs = [
        _model_run(ckpt, log, bounds, "frozen", "test", ckpt.config.scorer, limit, None),
        *(
            _baseline(log, bounds, kind, "test", limit, "frozen")
            for kind in ("recency", "popularity")
        ),
    ]
    cats_png = save_categories(runs, out / "categories.png")
    typer.echo(f"wrote {curves_png}, {cats_png} and {traj_png}")

"""The pipeline's processes and what they show: router, trainer, worker, recommendations,
metrics."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from streams.cli.common import ModelName, _fail, _registry_call, console, need_topics, out
from streams.settings import get_settings


def router(
    until_idle: Annotated[
        float | None, typer.Option(help="Stop after this many seconds without new events.")
    ] = None,
    grace: Annotated[
        float, typer.Option(help="Seconds a caught-up partition must stay quiet to count as idle.")
    ] = 0.5,
    features: Annotated[
        int | None,
        typer.Option(
            help="Feature length to enforce without --model (default: the first event's); "
            "with --model, the served version's is enforced instead."
        ),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            help="Stamp every event with the epoch of this model's promoted version, "
            "switching JODIE_SWITCH_DELAY_S after each promotion (workers run --model too)."
        ),
    ] = None,
) -> None:
    """Validate, deduplicate and order client events into interactions.log (exactly once)."""
    from streams.router import Router

    def ready() -> None:
        console.print("router ready", highlight=False)

    stats = Router(get_settings(), n_features=features, grace_s=grace, model=model).run(
        until_idle_s=until_idle, on_ready=ready
    )
    out.print(json.dumps(stats.__dict__))


def trainer(
    every_events: Annotated[
        int, typer.Option(help="Retrain after about this many new events in the log.")
    ] = 20_000,
    every_seconds: Annotated[
        float | None, typer.Option(help="Also retrain this often when anything new arrived.")
    ] = None,
    margin: Annotated[
        float,
        typer.Option(
            help="Promote when the hold-out MRR is at least the serving version's minus this."
        ),
    ] = 0.0,
    epochs: Annotated[int, typer.Option(min=1, help="Training epochs per run.")] = 10,
    once: Annotated[bool, typer.Option(help="Train once now and exit.")] = False,
    name: ModelName = "jodie",
) -> None:
    """Retrain from interactions.log on a schedule; announce every run, promote the good ones."""
    import logging

    from operators.model.config import TrainConfig
    from streams.trainer import run_trainer, train_once

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    settings, config = get_settings(), TrainConfig(epochs=epochs)
    if once:
        run = _registry_call(lambda: train_once(settings, config, name, margin))
        holdout = {
            "candidate": None if run.candidate is None else vars(run.candidate),
            "serving": None if run.serving is None else vars(run.serving),
        }
        out.print(
            json.dumps({"announced": run.record, "promoted": run.promoted, "holdout": holdout})
        )
        return
    run_trainer(settings, config, name, every_events, every_seconds, margin)


def worker(
    checkpoint: Annotated[
        Path | None, typer.Option(help="Checkpoint directory to serve (or --model).")
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            help="Serve this model's promoted versions (verified), each from the start of its "
            "epoch, switching when the router does (run it with the same --model)."
        ),
    ] = None,
    worker_id: Annotated[int, typer.Option("--id", help="Worker number: state dir and port.")] = 0,
    loglevel: Annotated[str, typer.Option(help="critical|error|warning|info|debug")] = "info",
) -> None:
    """A streaming worker: user and item sides, RocksDB tables, recommendations, exactly once."""
    from jodie_errors import JodieError
    from streams.worker import run_worker

    if (checkpoint is None) == (model is None):
        raise typer.BadParameter("give exactly one of --checkpoint and --model")
    try:
        run_worker(get_settings(), worker_id, checkpoint, loglevel=loglevel, model=model)
    except JodieError as exc:
        raise _fail(exc) from exc


def recommendations(
    follow: Annotated[bool, typer.Option(help="Keep waiting for new ones.")] = False,
    user: Annotated[str | None, typer.Option(help="Only this user's.")] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="Stop after this many.")] = None,
    top: Annotated[int, typer.Option(min=1, help="Candidates to print per recommendation.")] = 5,
    summary: Annotated[
        bool, typer.Option(help="Print only counts, duplicates and the live MRR / Recall@10.")
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print each recommendation whole, one JSON a line.")
    ] = False,
) -> None:
    """Print recommendations as a read_committed consumer sees them: after each event, the
    items ranked best first, each with its score (the served ranker's: higher is better,
    comparable within one list)."""
    from streams.tail import summarise, tail

    need_topics("recommendations", *(["evaluations"] if summary else []))
    if summary:
        settings = get_settings()
        recs = tail(settings, "recommendations", user=user, limit=limit)
        evaluations = tail(settings, "evaluations", user=user, limit=limit)
        out.print(json.dumps(summarise(recs, evaluations)))
        return
    from schemas import recommendation_vectors
    from streams.client import Client

    shown = 0
    for rec in Client().recommendations(user, follow, from_beginning=True, limit=limit):
        shown += 1
        if as_json:
            projected, predicted = recommendation_vectors(rec)
            plain = {k: v for k, v in rec.items() if not k.endswith("_f32")}
            plain.update(projected_user=projected.tolist(), predicted_item=predicted.tolist())
            out.print(json.dumps(plain))
            continue
        if shown == 1:
            console.print(
                "after each event of a user: the model version, then items best first as "
                "ITEM (score); the score is the served ranker's, higher is better, comparable "
                "within one list",
                highlight=False,
            )
        items = "  ".join(f"{c['item_id']} ({c['score']:.3f})" for c in rec["candidates"][:top])
        p = rec["state_change_probability"]
        extra = f"  p(state change) {p:.3f}" if p is not None else ""
        out.print(
            f"user {rec['user_id']}  after {rec['event_id']}  model {rec['model_version']}"
            f"  →  {items}{extra}"
        )
    if user is not None and not shown:
        raise typer.BadParameter(
            f"no recommendation for user {user!r} in {get_settings().topic('recommendations')} "
            "(user ids as in the first column of the CSV)",
            param_hint="--user",
        )


def metrics(
    workers: Annotated[int, typer.Option(help="Worker ids 0..N-1 to ask.")] = 1,
    as_json: Annotated[bool, typer.Option("--json", help="Print each worker's page.")] = False,
) -> None:
    """The running workers' /metrics.json: events applied, events/s, lag, live MRR / Recall@10
    (null until measured). Prometheus scrapes /metrics on the same ports."""
    import urllib.request

    from jodie_errors import JodieError
    from streams.app.epochs import label

    settings = get_settings()
    pages, silent = [], []
    for n in range(workers):
        url = f"http://127.0.0.1:{settings.web_port + n}/metrics.json"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                pages.append(json.loads(response.read()))
        except OSError as exc:
            silent.append(f"worker {n}: no answer at {url} ({exc})")
    if not pages:
        first, last = settings.web_port, settings.web_port + workers - 1
        ports = f"port {first}" if workers == 1 else f"ports {first}-{last}"
        raise _fail(
            JodieError(
                f"no worker answers on 127.0.0.1 {ports} (/metrics.json); start one with "
                "`jodie worker --model NAME` (worker N serves on JODIE_WEB_PORT + N)"
            )
        )
    for line in silent:  # some answered: say which did not, then report the others
        console.print(line, highlight=False, soft_wrap=True)
    if as_json:
        _print_json(pages)
        return
    events = sum(p["user_events"] for p in pages)
    online = [p["online"] for p in pages if p["online"]["events"]]
    total = sum(o["events"] for o in online)
    mrr = sum(o["mrr"] * o["events"] for o in online) / total if total else None
    r10 = sum(o["recall_at_10"] * o["events"] for o in online) / total if total else None
    _print_json(
        {
            "workers": len(pages),
            "events": events,
            "evaluated": total,
            "evaluation_pending": sum(p["evaluation"].get("pending", 0) for p in pages),
            "events_per_s": round(sum(p["events_per_s"] for p in pages), 1),
            "lag": sum(max(0, p["lag"]) for p in pages),
            "mrr": mrr,
            "recall_at_10": r10,
            "served": _served(pages),
            "model_versions": sorted({p["model_version"] for p in pages if p["model_version"]}),
            "epochs": sorted(
                {label((e["version"], e["since"])) for p in pages for e in p["epochs"]}
            ),
        }
    )


def _print_json(value: Any) -> None:
    # Strict JSON (null for what is not measured yet) on one line, never wrapped.
    from streams.runtime.http import dumps

    out.print(dumps(value), soft_wrap=True, highlight=False, markup=False)


def _served(pages: list[dict[str, Any]]) -> dict[str, Any]:
    """The workers' served-list figures, weighted by their events (each user is measured by
    the worker that owns it)."""
    parts = [p["served"] for p in pages if (p.get("served") or {}).get("events")]
    n = sum(s["events"] for s in parts)
    if not n:
        return {"events": 0}

    def mean(get: Any) -> float:
        return sum(get(s) * s["events"] for s in parts) / n

    return {
        "events": n,
        "recall": mean(lambda s: s["recall"]),
        "mrr": mean(lambda s: s["mrr"]),
        "heuristic": {
            "recall": mean(lambda s: s["heuristic"]["recall"]),
            "mrr": mean(lambda s: s["heuristic"]["mrr"]),
        },
    }

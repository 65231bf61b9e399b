"""The `jodie` command line: local broker, topics, producing, and (below) the model commands."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from schemas.exceptions import JodieError
from streams.settings import get_settings

app = typer.Typer(
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False, help=__doc__
)
broker_app = typer.Typer(no_args_is_help=True, help="The local single-node Apache Kafka (KRaft).")
topics_app = typer.Typer(no_args_is_help=True, help="The topics declared in deploy/topics.toml.")
app.add_typer(broker_app, name="broker")
app.add_typer(topics_app, name="topics")

console = Console(stderr=True)
out = Console()


def _fail(exc: JodieError) -> typer.Exit:
    console.print(f"[red]error:[/red] {exc}")
    return typer.Exit(code=2)


@broker_app.command("up")
def broker_up(
    foreground: Annotated[
        bool, typer.Option(help="Run in this process (for Procfile/systemd).")
    ] = False,
) -> None:
    """Fetch Kafka (cached), format storage once, start in the background, wait until ready."""
    from deploy.kafka import broker

    cfg = broker.BrokerConfig.from_settings(get_settings())
    began = time.monotonic()
    try:
        status, started = broker.up(cfg, foreground=foreground)
    except JodieError as exc:
        raise _fail(exc) from exc
    verb = "started" if started else "already running"
    console.print(
        f"broker {verb}: pid {status.pid}, {status.bootstrap}, data in {status.home} "
        f"({time.monotonic() - began:.1f} s)"
    )


@broker_app.command("down")
def broker_down(
    purge: Annotated[
        bool, typer.Option(help="Also delete the broker's data (a clean start).")
    ] = False,
) -> None:
    """Stop the local broker by its pid; nothing is left running."""
    from deploy.kafka import broker

    cfg = broker.BrokerConfig.from_settings(get_settings())
    was_running = broker.down(cfg, purge=purge)
    console.print(
        ("broker stopped" if was_running else "broker was not running")
        + (", data purged" if purge else "")
    )


@broker_app.command("status")
def broker_status() -> None:
    """Say whether the local broker runs and answers metadata requests (exit 1 if not)."""
    from deploy.kafka import broker

    status = broker.status(broker.BrokerConfig.from_settings(get_settings()))
    out.print(
        json.dumps(
            {
                "running": status.running,
                "ready": status.ready,
                "pid": status.pid,
                "bootstrap": status.bootstrap,
                "home": str(status.home),
                "detail": status.detail,
            }
        )
    )
    if not status.ready:
        raise typer.Exit(code=1)


@topics_app.command("apply")
def topics_apply() -> None:
    """Create missing topics; report drift of existing ones (exit 1 on drift)."""
    from streams.runtime.clients import admin
    from streams.topics import apply_topics, declared_topics

    settings = get_settings()
    reports = apply_topics(admin(settings), declared_topics(settings), settings.replication_factor)
    table = Table("topic", "status", "drift")
    for r in reports:
        table.add_row(r.name, r.action, "; ".join(r.drift))
    out.print(table)
    if any(r.action == "drift" for r in reports):
        raise typer.Exit(code=1)


@topics_app.command("delete")
def topics_delete(
    yes: Annotated[
        bool, typer.Option("--yes", help="Really delete (all data in them is lost).")
    ] = False,
) -> None:
    """Delete every declared topic (with the current JODIE_TOPIC_PREFIX)."""
    from streams.runtime.clients import admin
    from streams.topics import declared_topics, delete_topics

    if not yes:
        console.print("refusing without --yes")
        raise typer.Exit(code=1)
    settings = get_settings()
    names = [s.name for s in declared_topics(settings)]
    delete_topics(admin(settings), names)
    console.print(f"deleted {len(names)} topics")


@broker_app.command("wait")
def broker_wait(
    timeout: Annotated[float, typer.Option(help="Seconds to wait at most.")] = 120.0,
) -> None:
    """Wait until the brokers at JODIE_BOOTSTRAP answer metadata requests (exit 1 on timeout)."""
    from deploy.kafka.broker import probe

    deadline = time.monotonic() + timeout
    while not probe(get_settings(), timeout_s=1.0):
        if time.monotonic() > deadline:
            console.print("broker not ready")
            raise typer.Exit(code=1)
        time.sleep(0.5)


@topics_app.command("show")
def topics_show(
    topic: Annotated[
        str, typer.Argument(help="Logical topic name, e.g. interactions.")
    ] = "interactions",
    sample: Annotated[int, typer.Option(help="Decode and print this many messages.")] = 3,
    count: Annotated[
        bool, typer.Option(help="Read the whole topic and count distinct event ids.")
    ] = False,
) -> None:
    """Message counts per partition and a few decoded messages of a topic."""
    from streams.codecs import make_codec
    from streams.peek import decode_all, partition_counts
    from streams.runtime.clients import committed_reader

    settings = get_settings()
    name = settings.topic(topic)
    consumer = committed_reader(settings, group_id="jodie-topics-show")
    try:
        counts = partition_counts(consumer, name)
    finally:
        consumer.close()
    total = sum(c.messages for c in counts)
    out.print(
        f"{name}: {total} offsets in {len(counts)} partitions "
        + ", ".join(f"p{c.partition}={c.messages}" for c in counts)
    )
    schema = {
        "interactions": "interaction",
        "interactions.log": "interaction",
        "recommendations": "recommendation",
        "models": "model_announcement",
    }.get(topic)
    if schema is None:
        return
    codec = make_codec(settings, schema, name)
    for record in decode_all(settings, name, codec, limit=sample):
        out.print_json(json.dumps(record))
    if count:
        ids = [r.get("event_id") for r in decode_all(settings, name, codec)]
        out.print(json.dumps({"messages": len(ids), "distinct_event_ids": len(set(ids))}))


@app.command("produce")
def produce(
    path: Annotated[
        Path | None, typer.Argument(help="JODIE CSV (plain or .gz); default: bundled Wikipedia.")
    ] = None,
    rate: Annotated[
        float | None, typer.Option(help="Events per second (default: as fast as possible).")
    ] = None,
    limit: Annotated[int | None, typer.Option(help="Send at most this many events.")] = None,
    start: Annotated[int, typer.Option(help="Skip this many valid rows first (resume).")] = 0,
    after: Annotated[
        Path | None,
        typer.Option(help="Start after the events this checkpoint was trained on (sets --start)."),
    ] = None,
    strict: Annotated[
        bool, typer.Option(help="Stop at the first bad row instead of reporting it.")
    ] = False,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write the summary here.")
    ] = None,
) -> None:
    """Produce Avro Interactions to `interactions`, keyed by user id, with deterministic ids."""
    from operators.dataset import bundled_wikipedia
    from streams.codecs import make_codec
    from streams.produce import produce_file
    from streams.runtime.clients import idempotent_producer

    settings = get_settings()
    source = path or bundled_wikipedia()
    if after is not None:
        from operators.model.checkpoint import read_meta

        try:
            offsets = read_meta(after).get("log_offsets", {})
        except JodieError as exc:
            raise _fail(exc) from exc
        if "seq" in offsets:
            # Replayed from interactions.log: what follows it is already in the log, and its
            # row count says nothing about a file's rows.
            raise _fail(
                JodieError(
                    f"{after} was trained from interactions.log (up to seq {offsets['seq']}); "
                    "--after takes a checkpoint trained from a file"
                )
            )
        start = int(offsets["events"])
    topic = settings.topic("interactions")
    codec = make_codec(settings, "interaction", topic)
    producer = idempotent_producer(settings)
    columns = (
        TextColumn("[bold]producing"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[rate]}"),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("produce", total=limit, rate="")
        began = time.monotonic()

        def on_progress(n: int) -> None:
            progress.update(
                task, completed=n, rate=f"{n / max(time.monotonic() - began, 1e-9):,.0f} ev/s"
            )

        try:
            summary = produce_file(
                source,
                producer,
                codec,
                topic,
                start=start,
                limit=limit,
                rate=rate,
                strict=strict,
                flush_every=settings.produce_batch,
                on_progress=on_progress,
            )
        except JodieError as exc:
            raise _fail(exc) from exc
    for bad in summary.bad_rows[:20]:
        console.print(f"[yellow]bad row[/yellow] {source}:{bad.line}: {bad.reason_text}")
    if len(summary.bad_rows) > 20:
        console.print(f"[yellow]... and {len(summary.bad_rows) - 20} more bad rows[/yellow]")
    result = {
        "topic": topic,
        "events": summary.events,
        "seconds": round(summary.seconds, 3),
        "events_per_s": round(summary.events_per_s, 1),
        "bad_rows": len(summary.bad_rows),
        "source_tag": summary.source_tag,
    }
    out.print(json.dumps(result))
    if json_out is not None:
        json_out.write_text(json.dumps(result, indent=2))


@app.command("router")
def router(
    until_idle: Annotated[
        float | None, typer.Option(help="Stop after this many seconds without new events.")
    ] = None,
    grace: Annotated[
        float, typer.Option(help="Seconds a caught-up partition must stay quiet to count as idle.")
    ] = 0.5,
    features: Annotated[
        int | None, typer.Option(help="Feature length to enforce (default: the first event's).")
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


models_app = typer.Typer(
    no_args_is_help=True,
    help="Checkpoints announced on the `models` topic: list, promote, roll back.",
)
app.add_typer(models_app, name="models")
ModelName = Annotated[str, typer.Option("--name", help="Model name (the registry key).")]


def _registry(name: str) -> Any:
    from streams.models import Registry

    return Registry(get_settings(), name)


def _registry_call(call: Callable[[], Any]) -> Any:
    try:
        return call()
    except JodieError as exc:
        raise _fail(exc) from exc


@models_app.command("announce")
def models_announce(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint directory to announce.")],
    version: Annotated[str | None, typer.Option(help="Version name (default v<N>).")] = None,
    promote: Annotated[bool, typer.Option(help="Also make it the serving version.")] = False,
    unless_serving: Annotated[
        bool,
        typer.Option(
            help="Do nothing when a version is already promoted (a first deployment's bootstrap)."
        ),
    ] = False,
    name: ModelName = "jodie",
) -> None:
    """Copy a verified checkpoint into JODIE_MODEL_STORE and announce it on `models`."""
    registry = _registry(name)
    if unless_serving:
        serving = _registry_call(registry.serving)
        if serving is not None:
            out.print(json.dumps(serving))
            return
    record = _registry_call(lambda: registry.announce(checkpoint, version))
    if promote:
        record = _registry_call(lambda: registry.promote(record["version"]))
    out.print(json.dumps(record))


@models_app.command("list")
def models_list(name: ModelName = "jodie") -> None:
    """Every announced version, oldest first; the serving one is marked."""
    registry = _registry(name)
    serving = _registry_call(registry.serving)
    for r in _registry_call(registry.versions):
        mark = "*" if serving is not None and serving["version"] == r["version"] else " "
        mrr = r["metrics"].get("valid_mrr_frozen")
        out.print(
            f"{mark} {r['version']}  log_seq {r['log_seq']}  "
            f"valid MRR {mrr if mrr is None else round(mrr, 4)}  {r['uri']}",
            highlight=False,
        )


@models_app.command("show")
def models_show(
    version: Annotated[str, typer.Argument(help="The version to show.")], name: ModelName = "jodie"
) -> None:
    """One version's announcement (JSON)."""
    registry = _registry(name)
    out.print(json.dumps(_registry_call(lambda: registry.show(version))))


@models_app.command("promote")
def models_promote(
    version: Annotated[str, typer.Argument(help="The version to serve.")], name: ModelName = "jodie"
) -> None:
    """Make a version the serving one (its checkpoint's digest is checked first)."""
    registry = _registry(name)
    out.print(json.dumps(_registry_call(lambda: registry.promote(version))))


@models_app.command("rollback")
def models_rollback(name: ModelName = "jodie") -> None:
    """Serve again the version that served before the current one."""
    registry = _registry(name)
    out.print(json.dumps(_registry_call(registry.rollback)))


@app.command("trainer")
def trainer(
    every_events: Annotated[
        int, typer.Option(help="Retrain after about this many new events in the log.")
    ] = 20_000,
    every_seconds: Annotated[
        float | None, typer.Option(help="Also retrain this often when anything new arrived.")
    ] = None,
    margin: Annotated[
        float,
        typer.Option(help="Promote unless validation MRR is worse than the serving one by more."),
    ] = 0.01,
    epochs: Annotated[int, typer.Option(help="Training epochs per run.")] = 10,
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
        out.print(json.dumps({"announced": run.record, "promoted": run.promoted}))
        return
    run_trainer(settings, config, name, every_events, every_seconds, margin)


state_app = typer.Typer(no_args_is_help=True, help="The workers' state, read from Kafka.")
app.add_typer(state_app, name="state")


@app.command("worker")
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
    from streams.worker import run_worker

    if (checkpoint is None) == (model is None):
        raise typer.BadParameter("give exactly one of --checkpoint and --model")
    run_worker(get_settings(), worker_id, checkpoint, loglevel=loglevel, model=model)


@app.command("recommendations")
def recommendations(
    follow: Annotated[bool, typer.Option(help="Keep waiting for new ones.")] = False,
    user: Annotated[str | None, typer.Option(help="Only this user's.")] = None,
    limit: Annotated[int | None, typer.Option(help="Stop after this many.")] = None,
    top: Annotated[int, typer.Option(help="Candidates to print per recommendation.")] = 5,
    summary: Annotated[
        bool, typer.Option(help="Print only counts, duplicates and the live MRR / Recall@10.")
    ] = False,
) -> None:
    """Print recommendations as a read_committed consumer sees them."""
    from streams.tail import summarise, tail_recommendations

    if summary:
        recs = tail_recommendations(get_settings(), user=user, limit=limit)
        out.print(json.dumps(summarise(recs)))
        return
    for rec in tail_recommendations(get_settings(), follow=follow, user=user, limit=limit):
        items = " ".join(f"{c['item_id']}:{c['score']:.3f}" for c in rec["candidates"][:top])
        p = rec["state_change_probability"]
        extra = f" p(change)={p:.3f}" if p is not None else ""
        out.print(
            f"user {rec['user_id']} after {rec['event_id']} [{rec['model_version']}]"
            f" → {items}{extra}",
            highlight=False,
            markup=False,  # the version is in brackets, which rich would read as a style
            soft_wrap=True,  # one line per recommendation, whatever the terminal width
        )


@app.command("metrics")
def metrics(
    workers: Annotated[int, typer.Option(help="Worker ids 0..N-1 to ask.")] = 1,
    as_json: Annotated[bool, typer.Option("--json", help="Print each worker's page.")] = False,
) -> None:
    """The running workers' /metrics: events applied, events/s, lag, live MRR / Recall@10."""
    import urllib.request

    from streams.app.epochs import label

    settings = get_settings()
    pages = []
    for n in range(workers):
        url = f"http://127.0.0.1:{settings.web_port + n}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                pages.append(json.loads(response.read()))
        except OSError as exc:
            console.print(f"worker {n}: no answer at {url} ({exc})", highlight=False)
    if as_json:
        out.print(json.dumps(pages))
        return
    events = sum(p["user_events"] for p in pages)
    online = [p["online"] for p in pages if p["online"]["events"]]
    total = sum(o["events"] for o in online)
    mrr = sum(o["mrr"] * o["events"] for o in online) / total if total else float("nan")
    r10 = sum(o["recall_at_10"] * o["events"] for o in online) / total if total else float("nan")
    out.print(
        json.dumps(
            {
                "workers": len(pages),
                "events": events,
                "events_per_s": round(sum(p["events_per_s"] for p in pages), 1),
                "lag": sum(max(0, p["lag"]) for p in pages),
                "mrr": mrr,
                "recall_at_10": r10,
                "model_versions": sorted({p["model_version"] for p in pages if p["model_version"]}),
                "epochs": sorted(
                    {label((e["version"], e["since"])) for p in pages for e in p["epochs"]}
                ),
            }
        )
    )


@state_app.command("export")
def state_export(
    out_path: Annotated[Path, typer.Option("--out", help="The .npz file to write.")],
    checkpoint: Annotated[
        Path | None, typer.Option(help="The checkpoint the workers serve (or --model).")
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(help="Workers run --model NAME: the states of its latest epoch."),
    ] = None,
) -> None:
    """Current embeddings from the tables' changelogs, in the `evaluate --export-states` layout."""
    from streams.state_export import export_states

    if (checkpoint is None) == (model is None):
        raise typer.BadParameter("give exactly one of --checkpoint and --model")
    counts = _registry_call(lambda: export_states(get_settings(), checkpoint, out_path, model))
    out.print(json.dumps({"out": str(out_path), **counts}))


# --- model commands (train / evaluate / plot) are registered below ---------------------

# Model commands (train / evaluate / plot) live in streams/cli_model.py.
from streams import cli_model as _cli_model  # noqa: E402

app.command("train")(_cli_model.train)
app.command("evaluate")(_cli_model.evaluate)
app.command("plot")(_cli_model.plot)

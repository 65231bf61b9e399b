"""The trainer process: retrain from interactions.log when enough new events arrived, announce
each run as a new version, and promote it unless it validates worse than the serving one.

Each run replays the whole committed log (`jodie train --from-topic`), trains, writes the
checkpoint (states at the log position O where the replay stopped), announces it on `models`
with its metrics, and compares its validation MRR (frozen protocol) with the serving
version's: it is promoted when ``new ≥ serving − margin``. A version that is not promoted
stays announced; `jodie models promote` can still serve it.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from operators.model.config import TrainConfig
from operators.training.run import run_training
from streams.models import Registry
from streams.peek import partition_counts
from streams.plots import save_curves
from streams.replay import Window, replay_log
from streams.runtime.clients import committed_reader
from streams.settings import Settings

_log = logging.getLogger("jodie.trainer")

MRR_KEY = "valid_mrr_frozen"


@dataclass(frozen=True)
class TrainerRun:
    record: dict[str, Any]  # the announcement
    promoted: bool
    serving_mrr: float | None  # what it was compared with (None: nothing served)


def log_size(settings: Settings) -> int:
    """Offsets in interactions.log (its events, plus one transaction marker per partition and
    router commit): cheap to read, and grows with the events."""
    consumer = committed_reader(settings, group_id="jodie-trainer-probe")
    try:
        return sum(
            c.messages for c in partition_counts(consumer, settings.topic("interactions.log"))
        )
    finally:
        consumer.close()


def train_once(
    settings: Settings,
    config: TrainConfig,
    name: str = "jodie",
    margin: float = 0.01,
    out_dir: Path | None = None,
    window: Window | None = None,
) -> TrainerRun:
    """One retraining: replay (all of the log, or ``window``), train, announce, promote unless
    worse by more than ``margin``."""
    replayed = replay_log(settings, window)
    if len(replayed.log) < 10:
        raise ValueError(f"interactions.log holds {len(replayed.log)} events; need at least 10")
    seqs = replayed.seqs
    source = replayed.source(settings.topic("interactions.log"), window)
    with tempfile.TemporaryDirectory(prefix="jodie-trainer-") as tmp:
        out = out_dir or Path(tmp) / "checkpoint"
        run = run_training(replayed.log, config, out_dir=out, seqs=seqs, source=source)
        save_curves(run.result.curves, out)
        registry = Registry(settings, name)
        record = registry.announce(out)  # copied into the model store
    new = run.result.metrics[MRR_KEY]
    serving = registry.serving()
    old = None if serving is None else serving["metrics"].get(MRR_KEY)
    promoted = old is None or new >= old - margin
    if promoted:
        registry.promote(record["version"])
    _log.info(
        "trained %s on %d events (to seq %d): valid MRR %.4f vs serving %s: %s",
        record["version"],
        len(replayed.log),
        record["log_seq"],
        new,
        "none" if old is None else f"{old:.4f}",
        "promoted" if promoted else f"not promoted (worse by more than {margin})",
    )
    return TrainerRun(record, promoted, old)


def due(grown: int, elapsed_s: float, every_events: int, every_seconds: float | None) -> bool:
    """Whether to retrain, given the log's growth and the time since the last run."""
    if grown >= every_events:
        return True
    return every_seconds is not None and grown > 0 and elapsed_s >= every_seconds


def run_trainer(
    settings: Settings,
    config: TrainConfig,
    name: str = "jodie",
    every_events: int = 20_000,
    every_seconds: float | None = None,
    margin: float = 0.01,
    poll_s: float = 10.0,
    max_runs: int | None = None,
) -> list[TrainerRun]:
    """Retrain whenever the log grew by ``every_events`` offsets since the last run (about
    that many events: transaction markers count too), or when ``every_seconds`` passed and
    it grew at all. The first run comes as soon as the log holds ``every_events``."""
    runs: list[TrainerRun] = []
    last_size, last_time = 0, time.monotonic()
    while max_runs is None or len(runs) < max_runs:
        size = log_size(settings)
        if due(size - last_size, time.monotonic() - last_time, every_events, every_seconds):
            runs.append(train_once(settings, config, name, margin))
            last_size, last_time = size, time.monotonic()
            continue
        time.sleep(poll_s)
    return runs

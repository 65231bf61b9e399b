"""The trainer process: retrain from interactions.log when enough new events arrived, announce
each run as a new version, and promote it only if it beats the serving one on the same events.

Each run replays the committed log (`jodie train --from-topic`) and fits on every event but a
short recent **hold-out** (``JODIE_HOLDOUT_EVENTS``, at most a fifth of the log; it also picks
the best epoch), then runs the best weights over the hold-out so the checkpoint's states are
at the log position O where the replay stopped, writes the checkpoint and announces it on
`models`. Then both the candidate and the serving version are scored on the hold-out
(``operators.training.holdout``): frozen protocol, each with its own default ranker (what it
would serve), the serving version from its checkpoint caught up over the log to the
hold-out's start exactly as a worker catches up. The candidate is promoted when its hold-out
MRR ≥ the serving version's − ``margin`` (0 by default: at least as good). A version that is
not promoted stays announced; `jodie models promote` can still serve it.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from operators.dataset import InteractionLog
from operators.evaluation.scorer import make_scorer
from operators.model.checkpoint import load_checkpoint
from operators.model.config import TrainConfig
from operators.protocol.catchup import log_position
from operators.training.holdout import (
    HoldoutScore,
    advanced,
    caught_up,
    holdout_config,
    holdout_score,
)
from operators.training.run import RunResult, run_training
from streams.models import Registry, verified
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
    serving_mrr: float | None  # the serving version's hold-out MRR (None: nothing served)
    candidate: HoldoutScore | None = None  # the candidate's, on the same events
    serving: HoldoutScore | None = None


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
    margin: float = 0.0,
    out_dir: Path | None = None,
    window: Window | None = None,
) -> TrainerRun:
    """One retraining: replay (all of the log, or ``window``), fit up to the hold-out,
    announce, and promote if the candidate's hold-out MRR ≥ the serving version's − ``margin``
    (see the module doc)."""
    replayed = replay_log(settings, window)
    log, seqs = replayed.log, replayed.seqs
    if len(log) < 10:
        raise ValueError(f"interactions.log holds {len(log)} events; need at least 10")
    source = replayed.source(settings.topic("interactions.log"), window)
    fit = holdout_config(config, len(log), settings.holdout_events)
    registry = Registry(settings, name)
    with tempfile.TemporaryDirectory(prefix="jodie-trainer-") as tmp:
        out = out_dir or Path(tmp) / "checkpoint"
        run = run_training(log, fit, out_dir=out, seqs=seqs, source=source)
        save_curves(run.result.curves, out)
        record = registry.announce(out)  # copied into the model store
    serving = registry.serving()
    candidate = old = None
    if serving is not None:
        candidate, old = _judge(run, serving, settings, log, seqs)
    promoted = old is None or candidate is None or candidate.mrr >= old.mrr - margin
    if promoted:
        registry.promote(record["version"])
    _log.info(
        "trained %s on %d events (to seq %d), hold-out from seq %s: MRR %s vs serving %s: %s",
        record["version"],
        len(log),
        record["log_seq"],
        "-" if candidate is None else candidate.first_seq,
        "-" if candidate is None else f"{candidate.mrr:.4f}",
        "none" if old is None else f"{old.mrr:.4f}",
        "promoted" if promoted else "not promoted (worse on the hold-out)",
    )
    return TrainerRun(record, promoted, None if old is None else old.mrr, candidate, old)


def _judge(
    run: RunResult,
    serving: dict[str, Any],
    settings: Settings,
    log: InteractionLog,
    seqs: np.ndarray,
) -> tuple[HoldoutScore, HoldoutScore]:
    """The candidate's and the serving version's scores on the same hold-out events."""
    result = run.result
    start = result.split.train_end
    ckpt = load_checkpoint(verified(serving, settings))
    # Judge only events neither has seen: after the serving version's own log position.
    first = max(start, int(np.searchsorted(seqs, log_position(ckpt))))
    if first >= len(log):
        raise ValueError(
            "the serving version's states are past the whole hold-out; retrain on a longer "
            "window (or lower JODIE_HOLDOUT_EVENTS)"
        )
    first_seq = int(seqs[first])
    window = log.slice(first, len(log))
    mine = advanced(result.model, result.states, log.slice(start, first))
    candidate = holdout_score(
        result.model,
        mine,
        make_scorer(result.model.config, run.scorer_tensors),
        window,
        first_seq,
    )
    theirs = caught_up(ckpt, log, seqs, first_seq)
    old = holdout_score(
        ckpt.model, theirs, make_scorer(ckpt.config, ckpt.scorer_tensors), window, first_seq
    )
    return candidate, old


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
    margin: float = 0.0,
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

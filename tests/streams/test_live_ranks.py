"""Live ranks equal offline ranks, event by event, with two workers on the real broker.

The workers rank each event's item against every item's state at the event, which they
reconstruct from seq-tagged item vectors (operators.evaluation.live), with the checkpoint's
default ranker (the history scorer: distance, history, counts, popularity and trend; or the
learned ranker); the
offline figure is the frozen protocol (`jodie evaluate --protocol frozen`) over the same events
from the same checkpoint. Ranks are compared per event, not as means.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from operators.dataset import bundled_wikipedia, load_interactions
from operators.evaluation.protocols import frozen_replay
from operators.evaluation.scorer import UserContext, make_scorer
from operators.model.checkpoint import load_checkpoint
from operators.model.config import ScorerName
from operators.model.online import OnlineJodie
from streams.settings import Settings
from streams.tail import tail
from tests.streams.harness import (
    make_checkpoint,
    route,
    start_worker,
    stop,
    wait_for,
    wait_until_assigned,
)

pytestmark = pytest.mark.kafka

HISTORY = 1500
STREAM = 3000


def _offline_ranks(checkpoint: Path) -> dict[int, int]:
    ckpt = load_checkpoint(checkpoint)
    log = load_interactions(bundled_wikipedia()).slice(HISTORY, HISTORY + STREAM)
    ranker = make_scorer(ckpt.config, ckpt.scorer_tensors)
    ranks, _ = frozen_replay(ckpt.model.eval(), ckpt.states, log, ranker)
    # `jodie produce` names each event "<file tag>:<its line in the file>"
    return {int(line): int(r) for line, r in zip(log.lines.tolist(), ranks.tolist(), strict=True)}


@pytest.mark.parametrize("scorer", ["history", "ranker"])
def test_two_workers_rank_each_event_as_the_frozen_replay(
    kafka: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, scorer: ScorerName
) -> None:
    """With the history scorer, and with the learned ranker, which also reads each user's
    history times, habits and event count from its row and each item's last event time."""
    monkeypatch.setenv("JODIE_EVALUATE_EVERY", "1")  # the workers evaluate every event
    checkpoint = make_checkpoint(tmp_path / "ck", history=HISTORY, scorer=scorer)
    workers = [start_worker(kafka, checkpoint, n, tmp_path) for n in (0, 1)]
    try:
        wait_until_assigned(tmp_path, (0, 1), timeout_s=120)
        route(kafka, HISTORY, STREAM)
        recs = wait_for(kafka, STREAM, timeout_s=300)
        evaluations = _wait_for_evaluations(kafka, STREAM, timeout_s=60)
    finally:
        for w in workers:
            stop(w)
    assert len(recs) == STREAM, (tmp_path / "worker-1.log").read_text()[-3000:]
    counts = Counter(e["event_id"] for e in evaluations)
    assert len(counts) == STREAM and counts.most_common(1)[0][1] == 1
    offline = _offline_ranks(checkpoint)
    live = {int(e["event_id"].rsplit(":", 1)[1]): int(e["rank"]) for e in evaluations}
    assert set(live) == set(offline)
    differ = {k: (live[k], offline[k]) for k in live if live[k] != offline[k]}
    print(f"\nper-event ranks: {STREAM - len(differ)} of {STREAM} identical", differ)
    assert len(differ) <= STREAM // 1000, differ  # ≥ 99.9 % identical
    # The rest: the live query runs the kernel on batches of events where the offline replay
    # runs it one event at a time, and BLAS may sum in another order, so a score can differ
    # in its last bit (states agree to ~1e-7; the exactness tests bound them at 1e-4). A rank
    # can only change where another item's score ties the true item's to a few ulps — shown
    # here from the offline replay's own scores for every event whose rank differs.
    ties = _near_ties(checkpoint, set(differ))
    for line, (a, b) in differ.items():
        assert abs(a - b) <= ties[line], (line, a, b, ties[line])


def _near_ties(checkpoint: Path, lines: set[int]) -> dict[int, int]:
    """For the events at these file lines: how many other items score within 4 float32 ulps
    of the true item in the frozen replay."""
    ckpt = load_checkpoint(checkpoint)
    online = OnlineJodie(ckpt.model.eval(), ckpt.states)
    ranker = make_scorer(ckpt.config, ckpt.scorer_tensors)
    log = load_interactions(bundled_wikipedia()).slice(HISTORY, HISTORY + STREAM)
    out = {}
    for k in range(len(log)):
        user, item, t = str(log.user_ids[k]), str(log.item_ids[k]), float(log.timestamps[k])
        line = int(log.lines[k])
        if line in lines:
            q = online.query(user, t)
            items = online.states.items
            ctx = UserContext(
                q.history, q.history_counts, q.history_times, q.habits, q.events, q.last_time, t
            )
            scores = ranker.scores(
                q.pred[0],
                items.emb,
                items.static,
                items.count,
                items.trend_at(t),
                ctx,
                items.last_time,
            )
            true = float(scores[items.row(item)])
            ulp = abs(float(np.spacing(np.float32(true))))
            out[line] = int(((scores - true).abs() <= 4 * ulp).sum()) - 1
        online.observe(user, item, t)
    return out


def _wait_for_evaluations(kafka: Settings, n: int, timeout_s: float) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    got: list[dict] = []
    while time.monotonic() < deadline:
        got = list(tail(kafka, "evaluations", idle_timeout_s=2.0))
        if len(got) >= n:
            break
        time.sleep(1.0)
    return got

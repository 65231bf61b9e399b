"""What the pipeline tests share: a small checkpoint, the sequential reference, worker processes.

A small checkpoint (random weights, states from replaying the first HISTORY events of the
bundled Wikipedia file) is served; later events go through produce → router → workers. The
reference is the sequential replay (`OnlineJodie`, what `jodie evaluate --protocol frozen`
runs) of the same events from the same checkpoint.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Literal

import numpy as np

from operators.dataset import bundled_wikipedia, load_interactions
from operators.evaluation.scorer import UserContext, make_scorer
from operators.model.checkpoint import load_checkpoint
from operators.model.config import ScorerName
from operators.model.online import OnlineJodie
from operators.model.state import trend_at
from operators.model.synthetic import WIKIPEDIA_DELTAS, synthetic_checkpoint

# Re-exported: the tests import them from here.
from streams.children import free_port as free_port
from streams.children import spawn
from streams.children import stop as stop
from streams.produce import produce_rows
from streams.router import Router
from streams.settings import Settings
from streams.state_export import collect
from streams.tail import tail

HISTORY = 1500  # events the checkpoint has seen
STREAM = 400  # events streamed after it


def make_checkpoint(
    out: Path,
    history: int = HISTORY,
    version: str = "test-v1",
    with_seqs: bool = False,
    seed: int = 0,
    scorer: ScorerName = "history",
) -> Path:
    """A checkpoint of random weights whose states have seen the first ``history`` rows of
    the bundled file (operators.model.synthetic); ``with_seqs``: at that log position;
    ``scorer``: its default ranker, with fixed non-zero terms."""
    config = replace(WIKIPEDIA_DELTAS, scorer=scorer)
    return synthetic_checkpoint(
        out, history, version=version, seed=seed, with_seqs=with_seqs, config=config
    )


def reference(checkpoint: Path, rows: Sequence[int]) -> OnlineJodie:
    """The sequential replay of the given rows of the bundled file, from the checkpoint."""
    ckpt = load_checkpoint(checkpoint)
    online = OnlineJodie(ckpt.model, ckpt.states)
    log = load_interactions(bundled_wikipedia())
    for k in rows:
        online.observe(log.user_ids[k], log.item_ids[k], float(log.timestamps[k]))
    return online


def route(
    settings: Settings, start: int = HISTORY, limit: int = STREAM, model: str | None = None
) -> None:
    """Produce rows [start, start + limit) of the bundled file and run the router over them
    (stamping the epochs of registry model ``model`` when given)."""
    produce_rows(settings, start=start, limit=limit)
    stats = Router(settings, grace_s=0.2, model=model).run(until_idle_s=1.0, max_seconds=120)
    assert stats.sequenced == limit


def start_worker(
    settings: Settings,
    checkpoint: Path | None,
    worker_id: int,
    tmp: Path,
    model: str = "",
    env: Mapping[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """A worker process serving ``checkpoint``, or registry model ``model``'s versions;
    ``env``: further JODIE_* variables (a secured broker's login)."""
    env = {
        **os.environ,
        "JODIE_TOPIC_PREFIX": settings.topic_prefix,
        "JODIE_STATE_DIR": str(tmp / "state"),
        "JODIE_WEB_PORT": str(16066 + 10 * worker_id),
        **(env or {}),
    }
    args = [
        "worker",
        *(["--model", model] if checkpoint is None else ["--checkpoint", str(checkpoint)]),
        *("--id", str(worker_id)),
    ]
    return spawn(f"worker-{worker_id}", args, tmp, env, append=True).proc


def wait_for(
    settings: Settings,
    n: int,
    timeout_s: float,
    topic: Literal["recommendations", "evaluations"] = "recommendations",
) -> list[dict]:
    """Committed recommendations (or evaluations), polled until there are ``n`` (or the time
    is up)."""
    deadline = time.monotonic() + timeout_s
    recs: list[dict] = []
    while time.monotonic() < deadline:
        recs = list(tail(settings, topic, idle_timeout_s=2.0))
        if len(recs) >= n:
            return recs
        time.sleep(1.0)
    return recs


def assert_equal_to_reference(settings: Settings, checkpoint: Path, online: OnlineJodie) -> float:
    """`jodie state export` (read from the changelogs) equals the replay's states, ≤ 1e-4;
    returns the largest difference."""
    got = collect(settings, checkpoint)
    worst = 0.0
    for side, store in (("user", online.states.users), ("item", online.states.items)):
        ids = got[f"{side}_ids"].tolist()
        known = [i for i in store.ids if not np.isnan(store.last_time[store.row(i)])]
        assert sorted(ids) == sorted(known)
        want = np.stack([store.emb[store.row(i)].numpy() for i in ids])
        diff = float(np.abs(got[f"{side}_embeddings"] - want).max())
        assert diff <= 1e-4
        worst = max(worst, diff)
    return worst


def offline_ranking(checkpoint: Path, online: OnlineJodie, user: str, t: float) -> dict[str, float]:
    """Every known item's score for ``user`` at time ``t`` by the checkpoint's ranker, from
    the sequential replay's states (``OnlineJodie.query``, as `jodie evaluate` ranks)."""
    ckpt = load_checkpoint(checkpoint)
    scorer = make_scorer(ckpt.config, ckpt.scorer_tensors)
    q = online.query(user, t)
    items = online.states.items
    scores = scorer.scores(
        q.pred[0],
        items.emb,
        items.static,
        items.count.astype(np.float64),
        trend_at(items.trend, items.last_time, t),
        UserContext(
            q.history, q.history_counts, q.history_times, q.habits, q.events, q.last_time, t
        ),
        items.last_time,
    ).numpy()
    return {
        item: float(scores[row])
        for row, item in enumerate(items.ids)
        if not np.isnan(items.last_time[row])
    }


def assert_ranked_as_offline(
    got: Sequence[tuple[str, float]], offline: Mapping[str, float], tol: float = 1e-3
) -> None:
    """A served top k (item, score) is the offline top k: each item's score is its offline
    score, and the scores are the k best offline scores (items tied within ``tol`` may come
    in either order)."""
    best = sorted(offline.values(), reverse=True)[: len(got)]
    assert 0 < len(got) <= len(offline)
    for (item, score), want in zip(got, best, strict=True):
        assert abs(score - offline[item]) <= tol, (item, score, offline[item])
        assert abs(score - want) <= tol, (item, score, want)


def wait_until_assigned(tmp: Path, worker_ids: Sequence[int], timeout_s: float) -> None:
    """Until each worker's log says it holds partitions (its last "assigned" line)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        owned = []
        for n in worker_ids:
            log = tmp / f"worker-{n}.log"
            text = log.read_text() if log.exists() else ""
            lines = [x for x in text.splitlines() if " assigned [" in x]
            owned.append(bool(lines) and "assigned []" not in lines[-1])
        if all(owned):
            return
        time.sleep(0.5)
    raise AssertionError(f"workers {list(worker_ids)} did not all get partitions")

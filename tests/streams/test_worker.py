"""Streaming workers on the real broker: exact states and one recommendation per event.

A small checkpoint (random weights, states from replaying the first events of Wikipedia) is
served; the next events go through produce → router → Faust worker. The reference is the
sequential replay (`OnlineJodie`, what `jodie evaluate --protocol frozen` runs) of the same
events from the same checkpoint.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from operators.checkpoint import load_checkpoint, save_checkpoint
from operators.config import ModelConfig, TrainConfig
from operators.dataset import bundled_wikipedia, load_interactions
from operators.model import Jodie
from operators.online import OnlineJodie
from operators.state import States
from schemas import INTERACTION
from streams.codecs import make_codec
from streams.kafka import idempotent_producer
from streams.produce import produce_file
from streams.router import Router
from streams.settings import Settings
from streams.state_export import collect
from streams.tail import tail_recommendations

pytestmark = pytest.mark.kafka

HISTORY = 1500  # events the checkpoint has seen
STREAM = 400  # events streamed after it


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    log = load_interactions(bundled_wikipedia())
    torch.manual_seed(0)
    cfg = ModelConfig(
        delta_user_mean=20_000.0,
        delta_user_std=50_000.0,
        delta_item_mean=3_000.0,
        delta_item_std=10_000.0,
    )
    model = Jodie(cfg)
    states = States.empty(
        cfg.embedding_dim, cfg.user_static_dim, cfg.item_static_dim, cfg.history_size
    )
    online = OnlineJodie(model, states)
    for k in range(HISTORY):
        online.observe(log.user_ids[k], log.item_ids[k], float(log.timestamps[k]))
    out = tmp_path_factory.mktemp("ckpt") / "v1"
    save_checkpoint(out, model, online.states, TrainConfig(model=cfg), meta={"version": "test-v1"})
    return out


def _reference(checkpoint: Path) -> OnlineJodie:
    ckpt = load_checkpoint(checkpoint)
    online = OnlineJodie(ckpt.model, ckpt.states)
    log = load_interactions(bundled_wikipedia())
    for k in range(HISTORY, HISTORY + STREAM):
        online.observe(log.user_ids[k], log.item_ids[k], float(log.timestamps[k]))
    return online


def _route(settings: Settings) -> None:
    topic = settings.topic("interactions")
    produce_file(
        bundled_wikipedia(),
        idempotent_producer(settings),
        make_codec(settings, INTERACTION, topic),
        topic,
        start=HISTORY,
        limit=STREAM,
    )
    stats = Router(settings, grace_s=0.2).run(until_idle_s=1.0, max_seconds=120)
    assert stats.sequenced == STREAM


def _start_worker(
    settings: Settings, checkpoint: Path, worker_id: int, tmp: Path
) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "JODIE_TOPIC_PREFIX": settings.topic_prefix,
        "JODIE_STATE_DIR": str(tmp / "state"),
        "JODIE_WEB_PORT": str(16066 + 10 * worker_id),
    }
    log = (tmp / f"worker-{worker_id}.log").open("ab")
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "streams",
            "worker",
            "--checkpoint",
            str(checkpoint),
            "--id",
            str(worker_id),
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _wait_for(settings: Settings, n: int, timeout_s: float) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    recs: list[dict] = []
    while time.monotonic() < deadline:
        recs = list(tail_recommendations(settings, idle_timeout_s=2.0))
        if len(recs) >= n:
            return recs
        time.sleep(1.0)
    return recs


def _assert_equal_to_reference(settings: Settings, checkpoint: Path) -> None:
    online = _reference(checkpoint)
    got = collect(settings, checkpoint)
    for side, store in (("user", online.states.users), ("item", online.states.items)):
        ids = got[f"{side}_ids"].tolist()
        known = [i for i in store.ids if not np.isnan(store.last_time[store.row(i)])]
        assert sorted(ids) == sorted(known)
        want = np.stack([store.emb[store.row(i)].numpy() for i in ids])
        assert float(np.abs(got[f"{side}_embeddings"] - want).max()) <= 1e-4


def test_one_worker_computes_the_sequential_replay(
    kafka: Settings, checkpoint: Path, tmp_path: Path
) -> None:
    _route(kafka)
    worker = _start_worker(kafka, checkpoint, 0, tmp_path)
    try:
        recs = _wait_for(kafka, STREAM, timeout_s=240)
    finally:
        _stop(worker)
    assert len(recs) == STREAM, (tmp_path / "worker-0.log").read_text()[-3000:]
    assert Counter(r["event_id"] for r in recs).most_common(1)[0][1] == 1
    assert {r["model_version"] for r in recs} == {"test-v1"}
    assert all(len(r["candidates"]) == kafka.candidates for r in recs)
    _assert_equal_to_reference(kafka, checkpoint)

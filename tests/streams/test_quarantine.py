"""A worker quarantines what it cannot apply and keeps going (produce → router → worker).

The router only knows the feature count the stream starts with when it serves no registry
model; a worker serving a checkpoint that takes another count cannot apply those events.
Before quarantine its RNN call raised and the worker exited on every restart; now each such
event goes to `interactions.dlq` as ``quarantined`` (detail ``feature_length``), gets no
recommendation, and the states are those of the offline replay of the same log.
"""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from operators.dataset import bundled_wikipedia, load_interactions
from operators.model.checkpoint import load_checkpoint
from operators.model.online import OnlineJodie
from schemas import INTERACTION
from streams.codecs import make_codec
from streams.produce import source_tag
from streams.router import Router
from streams.settings import Settings
from streams.tail import tail
from tests.streams.harness import (
    HISTORY,
    assert_equal_to_reference,
    make_checkpoint,
    start_worker,
    stop,
)
from tests.streams.test_bad_input import _produce, _read_dlq

pytestmark = pytest.mark.kafka

N = 40


def test_events_the_served_model_cannot_take_are_quarantined_not_fatal(
    kafka: Settings, tmp_path: Path
) -> None:
    checkpoint = make_checkpoint(tmp_path / "ckpt")  # a model without features
    log = load_interactions(bundled_wikipedia())
    tag = source_tag(bundled_wikipedia())
    codec = make_codec(kafka, INTERACTION, kafka.topic("interactions"))
    features = [(0.25, -0.5) for _ in range(N)]
    rows = range(HISTORY, HISTORY + N)
    messages = [
        (
            str(log.user_ids[k]).encode(),
            codec.encode(
                {
                    "event_id": f"{tag}:{k:010d}",
                    "user_id": str(log.user_ids[k]),
                    "item_id": str(log.item_ids[k]),
                    "timestamp": float(log.timestamps[k]),
                    "features": list(f),
                    "state_label": None,
                }
            ),
        )
        for k, f in zip(rows, features, strict=True)
    ]
    _produce(kafka, messages)
    stats = Router(kafka, grace_s=0.2).run(until_idle_s=1.0, max_seconds=120)
    assert stats.sequenced == N  # the router took the stream's own feature count

    worker = start_worker(kafka, checkpoint, 0, tmp_path)
    try:
        deadline = time.monotonic() + 120
        dlq = []
        while time.monotonic() < deadline and len(dlq) < N:
            assert worker.poll() is None, (tmp_path / "worker-0.log").read_text()[-3000:]
            dlq = [m for m in _read_dlq(kafka) if m.headers.get("reason") == b"quarantined"]
            time.sleep(1.0)
        with urllib.request.urlopen("http://127.0.0.1:16066/metrics.json", timeout=5) as resp:
            metrics = json.load(resp)
        assert worker.poll() is None  # alive after every event of the stream
    finally:
        stop(worker)
    assert len(dlq) == N
    assert {m.headers["detail"] for m in dlq} == {b"feature_length"}
    ids = sorted(codec.decode(m.value)["event_id"] for m in dlq)
    assert ids == sorted(f"{tag}:{k:010d}" for k in rows)  # each once, re-sendable as is
    assert metrics["quarantined"] == {"feature_length": N}
    assert list(tail(kafka, "recommendations", idle_timeout_s=2.0)) == []
    # The offline replay of the same log quarantines the same events: equal states.
    ckpt = load_checkpoint(checkpoint)
    online = OnlineJodie(ckpt.model, ckpt.states)
    for k, f in zip(rows, features, strict=True):
        online.observe(
            str(log.user_ids[k]), str(log.item_ids[k]), float(log.timestamps[k]), np.array(f)
        )
    assert_equal_to_reference(kafka, checkpoint, online)

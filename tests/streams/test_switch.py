"""Switching model versions under a running pipeline, on the real broker.

Half of Wikipedia is routed before any model exists. v1 is trained from the log's first 30 %
and promoted: two workers (``--model``) serve it from the next event on, its states caught up
over the rest of the log. v2 is trained over the first 50 % and promoted: the workers catch it
up while v1 serves, and the router's next events are v2's. Then a rollback to v1, with one
worker killed and restarted around it. At each stage the states `jodie state export --model`
reads from the changelogs equal an offline replay of the whole log with that version's
weights, and every event after the first promotion has exactly one recommendation, by the
version its epoch names.
"""

from __future__ import annotations

import json
import signal
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from operators.dataset import bundled_wikipedia, load_interactions
from operators.model.checkpoint import load_checkpoint
from operators.model.config import ModelConfig, TrainConfig
from operators.training.run import advance
from streams.models import Registry, verified
from streams.replay import Window, replay_log
from streams.router import read_log
from streams.settings import Settings
from streams.state_export import collect_epoch
from streams.trainer import train_once
from tests.streams.harness import route, start_worker, stop, wait_for

pytestmark = pytest.mark.kafka

TINY = TrainConfig(
    epochs=1,
    model=ModelConfig(embedding_dim=16, user_static_dim=8, item_static_dim=8, scorer="plain"),
)
N = len(load_interactions(bundled_wikipedia()))
HALF, V1_END = N // 2, int(N * 0.3)
STEP = 600  # events routed per stage


def _assert_states_are_offline_replay(settings: Settings, version: str, since: int) -> None:
    """The latest epoch is (version, since) and its states are the version's checkpoint
    advanced over every later event of the log with its weights (≤ 1e-4)."""
    epoch, got = collect_epoch(settings, "jodie")
    assert epoch == (version, since)
    ckpt = load_checkpoint(verified(Registry(settings).show(version), settings))
    start = int(ckpt.meta["log_offsets"]["seq"])
    later = replay_log(settings, Window(from_seq=start))
    want = ckpt.states.copy()
    advance(ckpt.model, want, later.log)
    for side, store in (("user", want.users), ("item", want.items)):
        ids = got[f"{side}_ids"].tolist()
        known = [i for i in store.ids if not np.isnan(store.last_time[store.row(i)])]
        assert sorted(ids) == sorted(known)
        rows = [store.row(i) for i in ids]
        diff = np.abs(got[f"{side}_embeddings"] - store.emb[rows].numpy()).max()
        assert float(diff) <= 1e-4, (side, float(diff))


def _metrics(worker_id: int, timeout_s: float = 10.0) -> dict[str, Any]:
    """A worker's /metrics.json page (the harness sets JODIE_WEB_PORT 16066 + 10 N for worker N,
    which serves on that port + N)."""
    url = f"http://127.0.0.1:{16066 + 11 * worker_id}/metrics.json"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                page: dict[str, Any] = json.loads(response.read())
                return page
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def test_versions_switch_and_roll_back_under_the_stream(
    kafka: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JODIE_MODEL_STORE", str(tmp_path / "store"))
    monkeypatch.setenv("JODIE_SWITCH_DELAY_S", "0")  # each route() below starts its epoch
    settings = Settings()
    registry = Registry(settings)
    route(settings, 0, HALF, model="jodie")  # no version yet: unstamped
    workers = [start_worker(settings, None, n, tmp_path, model="jodie") for n in range(2)]
    logs = [tmp_path / f"worker-{n}.log" for n in range(2)]
    try:
        v1 = train_once(settings, TINY, window=Window(until_seq=V1_END), margin=1.0)
        assert v1.promoted and v1.record["version"] == "v1"
        assert v1.record["log_seq"] == V1_END
        route(settings, HALF, STEP, model="jodie")  # v1 from seq HALF on
        recs = wait_for(settings, STEP, timeout_s=240)
        assert len(recs) == STEP, logs[0].read_text()[-3000:]
        _assert_states_are_offline_replay(settings, "v1", HALF)

        v2 = train_once(settings, TINY, window=Window(until_seq=HALF), margin=1.0)
        assert v2.promoted and v2.record["version"] == "v2"
        time.sleep(3.0)  # the workers see the promotion and catch v2 up while v1 serves
        route(settings, HALF + STEP, STEP, model="jodie")
        recs = wait_for(settings, 2 * STEP, timeout_s=240)
        assert len(recs) == 2 * STEP, logs[1].read_text()[-3000:]
        _assert_states_are_offline_replay(settings, "v2", HALF + STEP)

        registry.rollback()
        assert registry.serving()["version"] == "v1"  # type: ignore[index]
        workers[1].send_signal(signal.SIGKILL)  # a worker dies around the switch ...
        workers[1].wait(timeout=30)
        route(settings, HALF + 2 * STEP, STEP // 2, model="jodie")
        workers[1] = start_worker(settings, None, 1, tmp_path, model="jodie")  # ... and returns
        _metrics(1, timeout_s=60)
        time.sleep(8.0)  # it rejoins the group and takes back its partitions
        route(settings, HALF + 2 * STEP + STEP // 2, STEP - STEP // 2, model="jodie")
        recs = wait_for(settings, 3 * STEP, timeout_s=300)
        assert len(recs) == 3 * STEP, logs[1].read_text()[-3000:]
        _assert_states_are_offline_replay(settings, "v1", HALF + 2 * STEP)
        # The returned worker prepared the epoch it found stamped, from its start.
        served = [(e["version"], e["since"]) for e in _metrics(1)["epochs"]]
        assert ("v1", HALF + 2 * STEP) in served, served
    finally:
        for w in workers:
            stop(w)

    # One recommendation per event from the first promotion on, by the epoch's version.
    seq_of = {e.event.event_id: e.seq for e in read_log(settings)}
    assert len(recs) == len({r["event_id"] for r in recs}) == 3 * STEP
    want = {"v1": (HALF, HALF + STEP), "v2": (HALF + STEP, HALF + 2 * STEP)}
    for r in recs:
        seq = seq_of[r["event_id"]]
        low, high = want[r["model_version"]]
        assert low <= seq < high or (r["model_version"] == "v1" and seq >= HALF + 2 * STEP)
    assert sorted(seq_of[r["event_id"]] for r in recs) == list(range(HALF, HALF + 3 * STEP))

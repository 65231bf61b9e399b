"""Retired epochs leave memory, RocksDB and the changelogs, on the real broker.

The log's first events are routed before any version exists; v1 is promoted and serves the
next ones, then v2 (other weights) serves the rest. A worker running in this process serves
both; once v2 serves and every v1 event is applied, the worker retires v1: its serving
(weights, candidate index, live evaluation) is garbage, no vector waits for it, no v1 row is
cached or in RocksDB, every v1 key of the changelogs ends in a tombstone and a store
restored from them holds none. v2's states still equal the offline replay, and every event
has one recommendation, by its epoch's version.
"""

from __future__ import annotations

import gc
import threading
import time
import weakref
from pathlib import Path

import numpy as np
import pytest

from operators.model.checkpoint import load_checkpoint
from operators.training.run import advance
from streams.app.epochs import Epoch, epoch_of, split_row_key
from streams.models import Registry
from streams.peek import read_messages
from streams.replay import Window, replay_log
from streams.router import read_log
from streams.runtime.loop import Record
from streams.runtime.store import Table
from streams.settings import Settings
from streams.state_export import collect_epoch
from streams.topics import changelog_topic
from streams.worker import Worker
from tests.streams.harness import make_checkpoint, route, wait_for

pytestmark = pytest.mark.kafka

START, STEP = 200, 200  # events before v1; events per epoch
V1: Epoch = ("v1", START)
V2: Epoch = ("v2", START + STEP)


def _changelog_rows(settings: Settings, root: Path) -> dict[str, list[bytes]]:
    """The row keys a store restored from each table's changelog holds."""
    keys: dict[str, list[bytes]] = {}
    for name in ("user-state", "item-state"):
        table: Table[bytes] = Table(
            settings,
            name,
            changelog_topic(settings, name),
            root,
            decode=lambda _key, raw: raw,
            encode=lambda _key, row: row,
            initial=lambda _key: b"",
        )
        try:
            for p in range(settings.partitions):
                table.assign(p)
            keys[name] = [k for p in table.partitions for k, _v in table.scan(p, None, 1 << 30)]
        finally:
            table.close()
    return keys


def _wait(condition: object, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s} s: {what}")
        time.sleep(0.2)


def test_a_retired_epoch_leaves_memory_rocksdb_and_the_changelogs(
    kafka: Settings, tmp_path: Path
) -> None:
    settings = kafka.model_copy(
        update={
            "model_store": tmp_path / "store",
            "state_dir": tmp_path / "state",
            "switch_delay_s": 0.0,  # each route() below starts the promoted version's epoch
            "retire_chunk": 50,  # several sweeps' worth of transactions
            "retire_interval_s": 0.5,
        }
    )
    registry = Registry(settings)
    route(settings, 0, START, model="jodie")  # unstamped: no version yet
    v1 = make_checkpoint(tmp_path / "v1", history=START, version="v1", with_seqs=True, seed=1)
    registry.promote(registry.announce(v1)["version"])
    worker = Worker(settings, 0, model="jodie")
    runner = threading.Thread(target=worker.run, kwargs={"max_seconds": 400}, daemon=True)
    runner.start()
    try:
        route(settings, START, STEP, model="jodie")  # v1's epoch
        assert len(wait_for(settings, STEP, timeout_s=180)) == STEP
        serving_v1 = weakref.ref(worker.processor.servings[V1])
        v2 = make_checkpoint(
            tmp_path / "v2", history=START + STEP, version="v2", with_seqs=True, seed=2
        )
        registry.promote(registry.announce(v2)["version"])
        route(settings, START + STEP, STEP, model="jodie")  # v2's epoch
        recs = wait_for(settings, 2 * STEP, timeout_s=180)
        assert len(recs) == 2 * STEP

        tables = worker.tables_by_side.values()
        _wait(
            lambda: V1 not in worker.processor.servings and not any(t.deleting() for t in tables),
            60,
            "v1 retired and its tombstones committed",
        )
        assert list(worker.processor.servings) == [V2]
        assert worker.retirement.retired == [V1]
        assert worker.retirement.deleted > 0
        feeds = worker._feeds
        assert feeds is not None and V1 not in feeds.waiting
        for table in tables:
            assert all(split_row_key(key)[1] != V1 for _p, key in table.rows)
            stored = [k for p in list(table.partitions) for k, _v in table.scan(p, None, 1 << 30)]
            assert stored and all(split_row_key(k)[1] == V2 for k in stored)
        gc.collect()
        assert serving_v1() is None  # its index and live evaluation with it
        retired_at = [e for e in worker.stats.epochs if (e["version"], e["since"]) == V1]
        assert retired_at and "retired_at" in retired_at[0]
    finally:
        worker.stop()
        runner.join(timeout=60)
    assert not runner.is_alive()

    # v1's inbox messages read again (as after a producer is replaced, streams.runtime.loop):
    # each finds its epoch's rows deleted and is skipped, and v1 is not prepared anew (its
    # events would apply a second time, from v1's start).
    again = [
        Record(topic, m.partition, m.offset, m.key, m.value)
        for topic in (settings.topic("user-inbox"), settings.topic("item-inbox"))
        for m in read_messages(settings, topic)
        if m.value is not None and m.key is not None
    ]
    v1_messages = [r for r in again if epoch_of(worker.processor.read(r.value or b"")) == V1]
    assert v1_messages
    assert worker.prepare(v1_messages).messages == []
    assert worker.stats.cleared == len(v1_messages)
    assert list(worker.processor.servings) == [V2]

    # The changelogs: every v1 key ends in a tombstone; a restore brings back v2's rows only.
    for name in ("user-state", "item-state"):
        latest: dict[bytes, bytes | None] = {}
        for m in read_messages(settings, changelog_topic(settings, name)):
            assert m.key is not None
            latest[m.key] = m.value
        old = [v for k, v in latest.items() if split_row_key(k)[1] == V1]
        assert old and all(v is None for v in old), name
    restored = _changelog_rows(settings, tmp_path / "restore")
    for name, keys in restored.items():
        assert keys and {split_row_key(k)[1] for k in keys} == {V2}, name

    # v2's states: its checkpoint advanced over the log from its start with its weights.
    epoch, got = collect_epoch(settings, "jodie")
    assert epoch == V2
    ckpt = load_checkpoint(v2)
    want = ckpt.states.copy()
    advance(ckpt.model, want, replay_log(settings, Window(from_seq=START + STEP)).log)
    for side, store in (("user", want.users), ("item", want.items)):
        ids = got[f"{side}_ids"].tolist()
        known = [i for i in store.ids if not np.isnan(store.last_time[store.row(i)])]
        assert sorted(ids) == sorted(known)
        rows = [store.row(i) for i in ids]
        assert float(np.abs(got[f"{side}_embeddings"] - store.emb[rows].numpy()).max()) <= 1e-4

    # One recommendation per stamped event, by its epoch's version.
    seq_of = {e.event.event_id: e.seq for e in read_log(settings)}
    assert len({r["event_id"] for r in recs}) == len(recs) == 2 * STEP
    for r in recs:
        seq = seq_of[r["event_id"]]
        assert r["model_version"] == ("v1" if seq < START + STEP else "v2"), (seq, r)

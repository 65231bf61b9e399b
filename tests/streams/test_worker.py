"""Streaming workers on the real broker: exact states and one recommendation per event."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from operators.dataset import bundled_wikipedia
from schemas import INTERACTION
from streams.children import child_pids
from streams.codecs import make_codec
from streams.peek import read_all
from streams.produce import produce_file
from streams.router import Router
from streams.runtime.clients import idempotent_producer
from streams.runtime.kafka import partition_for
from streams.settings import Settings
from tests.streams.harness import (
    HISTORY,
    STREAM,
    assert_equal_to_reference,
    make_checkpoint,
    reference,
    route,
    start_worker,
    stop,
    wait_for,
    wait_until_assigned,
)

pytestmark = pytest.mark.kafka


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "v1")


def test_one_worker_computes_the_sequential_replay(
    kafka: Settings, checkpoint: Path, tmp_path: Path
) -> None:
    route(kafka)
    # Workers hand pre-states to rows they own in memory; that needs the producer's partitioner.
    for topic in ("user-inbox", "item-inbox"):
        placed = [(k, p) for k, _v, p, _o in read_all(kafka, kafka.topic(topic)) if k]
        assert len(placed) == STREAM
        assert all(p == partition_for(k, kafka.partitions) for k, p in placed)
    worker = start_worker(kafka, checkpoint, 0, tmp_path)
    try:
        recs = wait_for(kafka, STREAM, timeout_s=240)
    finally:
        stop(worker)
    assert len(recs) == STREAM, (tmp_path / "worker-0.log").read_text()[-3000:]
    assert Counter(r["event_id"] for r in recs).most_common(1)[0][1] == 1
    assert {r["model_version"] for r in recs} == {"test-v1"}
    assert all(len(r["candidates"]) == kafka.candidates for r in recs)
    assert_equal_to_reference(
        kafka, checkpoint, reference(checkpoint, range(HISTORY, HISTORY + STREAM))
    )


def test_a_stopped_worker_commits_the_ranks_still_on_their_way(
    kafka: Settings, checkpoint: Path, tmp_path: Path
) -> None:
    """Ranks come from the worker's ranking process a transaction after their
    recommendations (streams.app.evaluation). That process is held (SIGSTOP) while the
    stream is served, so every rank is still on its way when the worker is told to stop; it
    resumes while the worker waits: every event's evaluation is committed all the same."""
    env = {"JODIE_EVALUATE_EVERY": "1", "JODIE_EVALUATE_APART": "true"}
    worker = start_worker(kafka, checkpoint, 0, tmp_path, env=env)
    ranking: list[int] = []
    try:
        wait_until_assigned(tmp_path, (0,), timeout_s=120)
        ranking = child_pids(worker.pid)
        assert len(ranking) == 1, ranking
        os.kill(ranking[0], signal.SIGSTOP)
        route(kafka)
        recs = wait_for(kafka, STREAM, timeout_s=240)
        assert len(recs) == STREAM, (tmp_path / "worker-0.log").read_text()[-3000:]
        assert wait_for(kafka, 1, timeout_s=2, topic="evaluations") == []
        worker.send_signal(signal.SIGTERM)
        time.sleep(1.0)  # the worker is waiting for the ranks now
        assert worker.poll() is None
        os.kill(ranking[0], signal.SIGCONT)
        worker.wait(60)
    finally:
        for pid in ranking:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        stop(worker)
    evaluations = wait_for(kafka, STREAM, timeout_s=30, topic="evaluations")
    assert len(evaluations) == STREAM, _stopped(tmp_path / "worker-0.log")
    assert {e["event_id"] for e in evaluations} == {r["event_id"] for r in recs}
    assert _stopped(tmp_path / "worker-0.log")["evaluation"]["pending"] == 0


def _stopped(log: Path) -> dict:
    """A worker's last stats line (empty if it logged none)."""
    lines = [line for line in log.read_text().splitlines() if "stopped {" in line]
    return json.loads(lines[-1].split("stopped ", 1)[1]) if lines else {}


def _processed(log: Path) -> int:
    """Inbox messages a worker processed, from its last stats line."""
    return int(_stopped(log).get("messages", 0))


def test_two_workers_on_four_partitions_compute_the_sequential_replay(
    kafka: Settings, checkpoint: Path, tmp_path: Path
) -> None:
    assert kafka.partitions == 4
    workers = [start_worker(kafka, checkpoint, n, tmp_path) for n in (0, 1)]
    try:
        # Both members hold partitions before the events come, so the exchange crosses
        # processes (a lone early worker would take everything in memory).
        wait_until_assigned(tmp_path, (0, 1), timeout_s=120)
        route(kafka)
        recs = wait_for(kafka, STREAM, timeout_s=240)
    finally:
        for w in workers:
            stop(w)
    logs = [tmp_path / f"worker-{n}.log" for n in (0, 1)]
    assert len(recs) == STREAM, logs[1].read_text()[-3000:]
    assert Counter(r["event_id"] for r in recs).most_common(1)[0][1] == 1
    # Both workers took part: the exchange crossed processes.
    assert all(_processed(log) > 0 for log in logs), [log.read_text()[-2000:] for log in logs]
    # Each took pre-states from the other through Kafka, every one of them timed.
    hops = [_stopped(log)["pre_states"] for log in logs]
    assert all(h["taken"] > 0 and 0 <= h["age_ms_p50"] <= h["age_ms_max"] for h in hops), hops
    assert_equal_to_reference(
        kafka, checkpoint, reference(checkpoint, range(HISTORY, HISTORY + STREAM))
    )


def test_a_worker_killed_mid_stream_resumes_exactly(
    kafka: Settings, checkpoint: Path, tmp_path: Path
) -> None:
    half = STREAM // 2
    workers = [start_worker(kafka, checkpoint, n, tmp_path) for n in (0, 1)]
    # The router stops once idle: long enough to outlast the wait for the first half's
    # recommendations (on a loaded host, seconds) before the second half flows.
    router = threading.Thread(
        target=Router(kafka, grace_s=0.2).run, kwargs={"until_idle_s": 30.0, "max_seconds": 180}
    )
    try:
        wait_until_assigned(tmp_path, (0, 1), timeout_s=120)
        router.start()
        # Events arrive live, the second half slowly, so the kill lands while they flow.
        topic = kafka.topic("interactions")
        codec = make_codec(kafka, INTERACTION, topic)
        producer = idempotent_producer(kafka)
        produce_file(bundled_wikipedia(), producer, codec, topic, start=HISTORY, limit=half)
        assert len(wait_for(kafka, half // 2, timeout_s=240)) >= half // 2
        feeder = threading.Thread(
            target=produce_file,
            args=(bundled_wikipedia(), producer, codec, topic),
            kwargs={"start": HISTORY + half, "limit": STREAM - half, "rate": 100.0},
        )
        feeder.start()
        time.sleep(1.0)
        workers[1].send_signal(signal.SIGKILL)
        workers[1].wait(timeout=10)
        before_restart = len(wait_for(kafka, 0, timeout_s=10))
        feeder.join(timeout=60)
        workers[1] = start_worker(kafka, checkpoint, 1, tmp_path)
        recs = wait_for(kafka, STREAM, timeout_s=240)
    finally:
        for w in workers:
            stop(w)
        router.join(timeout=190)
    assert before_restart < STREAM  # the kill happened mid-stream
    assert len(recs) == STREAM, (tmp_path / "worker-1.log").read_text()[-3000:]
    counts = Counter(r["event_id"] for r in recs)
    assert len(counts) == STREAM and counts.most_common(1)[0][1] == 1
    assert_equal_to_reference(
        kafka, checkpoint, reference(checkpoint, range(HISTORY, HISTORY + STREAM))
    )


def test_a_checkpoint_at_a_log_position_skips_what_it_holds(
    kafka: Settings, tmp_path: Path
) -> None:
    """A checkpoint replayed from interactions.log (entities' last seqs recorded) is served
    on a log that also holds the events before it: those are skipped, the rest applied."""
    ckpt = make_checkpoint(tmp_path / "at-seq", with_seqs=True)
    route(kafka, 0, HISTORY + STREAM)  # the whole history, as in a running pipeline
    worker = start_worker(kafka, ckpt, 0, tmp_path)
    try:
        recs = wait_for(kafka, STREAM, timeout_s=240)
        time.sleep(3.0)  # anything beyond STREAM would be a defect: give it time to show
        recs = wait_for(kafka, STREAM, timeout_s=30)
    finally:
        stop(worker)
    assert len(recs) == STREAM, (tmp_path / "worker-0.log").read_text()[-3000:]
    assert Counter(r["event_id"] for r in recs).most_common(1)[0][1] == 1
    assert_equal_to_reference(kafka, ckpt, reference(ckpt, range(HISTORY, HISTORY + STREAM)))

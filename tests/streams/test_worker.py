"""Streaming workers on the real broker: exact states and one recommendation per event."""

from __future__ import annotations

import json
import signal
from collections import Counter
from pathlib import Path

import pytest

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
)

pytestmark = pytest.mark.kafka


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "v1")


def test_one_worker_computes_the_sequential_replay(
    kafka: Settings, checkpoint: Path, tmp_path: Path
) -> None:
    route(kafka)
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


def _processed(log: Path) -> int:
    """Inbox messages a worker processed, from its last stats line."""
    lines = [line for line in log.read_text().splitlines() if "stopped {" in line]
    return int(json.loads(lines[-1].split("stopped ", 1)[1])["messages"]) if lines else 0


def test_two_workers_on_four_partitions_compute_the_sequential_replay(
    kafka: Settings, checkpoint: Path, tmp_path: Path
) -> None:
    assert kafka.partitions == 4
    route(kafka)
    workers = [start_worker(kafka, checkpoint, n, tmp_path) for n in (0, 1)]
    try:
        recs = wait_for(kafka, STREAM, timeout_s=240)
    finally:
        for w in workers:
            stop(w)
    logs = [tmp_path / f"worker-{n}.log" for n in (0, 1)]
    assert len(recs) == STREAM, logs[1].read_text()[-3000:]
    assert Counter(r["event_id"] for r in recs).most_common(1)[0][1] == 1
    # Both workers took part: the exchange crossed processes.
    assert all(_processed(log) > 0 for log in logs), [log.read_text()[-2000:] for log in logs]
    assert_equal_to_reference(
        kafka, checkpoint, reference(checkpoint, range(HISTORY, HISTORY + STREAM))
    )


def test_a_worker_killed_mid_stream_resumes_exactly(
    kafka: Settings, checkpoint: Path, tmp_path: Path
) -> None:
    half = STREAM // 2
    route(kafka, HISTORY, half)
    workers = [start_worker(kafka, checkpoint, n, tmp_path) for n in (0, 1)]
    try:
        assert len(wait_for(kafka, half // 2, timeout_s=240)) >= half // 2
        route(kafka, HISTORY + half, STREAM - half)
        workers[1].send_signal(signal.SIGKILL)  # while the second half is in flight
        workers[1].wait(timeout=10)
        workers[1] = start_worker(kafka, checkpoint, 1, tmp_path)
        recs = wait_for(kafka, STREAM, timeout_s=240)
    finally:
        for w in workers:
            stop(w)
    assert len(recs) == STREAM, (tmp_path / "worker-1.log").read_text()[-3000:]
    counts = Counter(r["event_id"] for r in recs)
    assert len(counts) == STREAM and counts.most_common(1)[0][1] == 1
    assert_equal_to_reference(
        kafka, checkpoint, reference(checkpoint, range(HISTORY, HISTORY + STREAM))
    )

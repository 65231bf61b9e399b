"""`jodie produce` against the real broker: every field back, none lost, none twice."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from operators.dataset import iter_rows
from schemas import INTERACTION
from streams.codecs import make_codec
from streams.peek import partition_counts, read_all
from streams.produce import event_id, lap_tag, produce_file, source_tag
from streams.runtime.clients import idempotent_producer
from streams.settings import Settings

pytestmark = pytest.mark.kafka

N_ROWS = 600


def _csv(tmp_path: Path, bad_lines: dict[int, str] | None = None) -> Path:
    """N_ROWS events of 37 users and 11 items with 3 features; optional bad lines spliced in."""
    lines = ["user_id,item_id,timestamp,state_label,features"]
    for r in range(N_ROWS):
        lines.append(
            f"user{r % 37},item{(r * 7) % 11},{r * 1.5},{int(r % 97 == 0)},{r},{-r / 3},0.5"
        )
    for at, text in sorted((bad_lines or {}).items()):
        lines.insert(at - 1, text)
    path = tmp_path / "events.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def _read_back(settings: Settings) -> list[tuple[bytes | None, bytes, dict]]:
    topic = settings.topic("interactions")
    codec = make_codec(settings, INTERACTION, topic)
    return [(k, v, codec.decode(v)) for k, v, _p, _o in read_all(settings, topic)]


def test_produce_round_trip_and_rerun(kafka: Settings, tmp_path: Path) -> None:
    path = _csv(tmp_path)
    topic = kafka.topic("interactions")
    codec = make_codec(kafka, INTERACTION, topic)
    summary = produce_file(path, idempotent_producer(kafka), codec, topic)
    assert summary.events == N_ROWS and not summary.bad_rows

    got = _read_back(kafka)
    assert len(got) == N_ROWS
    tag = source_tag(path)
    expected = {event_id(tag, row.line): row for row in iter_rows(path)}
    by_id = {rec["event_id"]: (key, rec) for key, _v, rec in got}
    assert set(by_id) == set(expected)  # none lost, none duplicated (sizes equal above)
    assert sorted(expected) == [event_id(tag, row.line) for row in iter_rows(path)]
    for eid, (key, rec) in by_id.items():
        row = expected[eid]
        assert key == row.user_id.encode()
        assert rec["user_id"] == row.user_id and rec["item_id"] == row.item_id
        assert rec["timestamp"] == row.timestamp
        assert rec["state_label"] == row.state_label
        assert rec["features"] == pytest.approx(list(row.features), rel=1e-6)
    # Each user's events are in one partition, in file order: what per-user ordering needs.
    per_user: dict[str, list[float]] = {}
    for _k, _v, rec in got:
        per_user.setdefault(rec["user_id"], []).append(rec["timestamp"])
    assert all(ts == sorted(ts) for ts in per_user.values())

    # The documented re-run story: a second run re-sends byte-identical events under the
    # same ids, so deduplicating by event_id restores exactly the first run.
    produce_file(path, idempotent_producer(kafka), codec, topic)
    twice = _read_back(kafka)
    assert len(twice) == 2 * N_ROWS
    copies: dict[str, set[bytes]] = {}
    for _k, value, rec in twice:
        copies.setdefault(rec["event_id"], set()).add(value)
    assert set(copies) == set(expected)
    assert all(len(values) == 1 for values in copies.values())
    assert Counter(rec["event_id"] for _k, _v, rec in twice) == Counter(2 * list(expected))


def test_start_and_limit_resume_without_gaps(kafka: Settings, tmp_path: Path) -> None:
    path = _csv(tmp_path)
    topic = kafka.topic("interactions")
    codec = make_codec(kafka, INTERACTION, topic)
    first = produce_file(path, idempotent_producer(kafka), codec, topic, limit=250)
    second = produce_file(path, idempotent_producer(kafka), codec, topic, start=250)
    assert (first.events, second.events) == (250, N_ROWS - 250)
    ids = [rec["event_id"] for _k, _v, rec in _read_back(kafka)]
    assert len(ids) == len(set(ids)) == N_ROWS


def test_bad_rows_reported_and_skipped(kafka: Settings, tmp_path: Path) -> None:
    path = _csv(
        tmp_path,
        {
            5: "userX,itemY,not-a-time,0,1,2,3",
            9: "userX,itemY,4.0,0,1,2",
            12: "userX,itemY,4.0,0,nan,2,3",
        },
    )
    topic = kafka.topic("interactions")
    codec = make_codec(kafka, INTERACTION, topic)
    summary = produce_file(path, idempotent_producer(kafka), codec, topic)
    assert summary.events == N_ROWS
    assert [(b.line, b.reason_text) for b in summary.bad_rows] == [
        (5, "timestamp 'not-a-time' is not a number"),
        (9, "expected 3 features, got 2"),
        (12, "a feature is NaN or infinite"),
    ]
    assert len(_read_back(kafka)) == N_ROWS


def test_cli_produces_the_whole_bundled_file(kafka: Settings, tmp_path: Path) -> None:
    env = {**os.environ, "JODIE_TOPIC_PREFIX": kafka.topic_prefix}
    out = tmp_path / "summary.json"
    proc = subprocess.run(
        [sys.executable, "-m", "streams", "produce", "--json", str(out)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(out.read_text())
    assert summary["events"] == 157_474 and summary["bad_rows"] == 0
    from streams.runtime.clients import committed_reader

    consumer = committed_reader(kafka, group_id="test-count")
    try:
        counts = partition_counts(consumer, kafka.topic("interactions"))
    finally:
        consumer.close()
    # No transactions on this topic, so offsets are messages: all of them, once.
    assert sum(c.messages for c in counts) == 157_474
    assert all(c.messages > 0 for c in counts)


def test_after_starts_past_a_file_checkpoint_and_refuses_a_log_one(
    kafka: Settings, tmp_path: Path
) -> None:
    from operators.dataset import bundled_wikipedia
    from tests.streams.harness import make_checkpoint

    env = {**os.environ, "JODIE_TOPIC_PREFIX": kafka.topic_prefix}
    run = [sys.executable, "-m", "streams", "produce", "--limit", "5", "--after"]
    from_file = make_checkpoint(tmp_path / "file", history=40)
    meta = json.loads((from_file / "checkpoint.json").read_text())
    assert "seq" not in meta["log_offsets"]  # as `jodie train --data` writes it
    done = subprocess.run([*run, str(from_file)], env=env, capture_output=True, check=False)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    codec = make_codec(kafka, INTERACTION, kafka.topic("interactions"))
    got = sorted(
        codec.decode(v)["event_id"]
        for _k, v, _p, _o in read_all(kafka, kafka.topic("interactions"))
    )
    tag = source_tag(bundled_wikipedia())
    lines = [row.line for row in iter_rows(bundled_wikipedia())][40:45]
    assert got == [event_id(tag, line) for line in lines]

    from_log = make_checkpoint(tmp_path / "log", history=40, with_seqs=True)
    refused = subprocess.run([*run, str(from_log)], env=env, capture_output=True, check=False)
    assert refused.returncode != 0 and b"interactions.log" in refused.stderr


def test_laps_resend_the_rows_as_new_events_later_in_time(kafka: Settings, tmp_path: Path) -> None:
    path = _csv(tmp_path)
    topic = kafka.topic("interactions")
    codec = make_codec(kafka, INTERACTION, topic)
    summary = produce_file(
        path, idempotent_producer(kafka), codec, topic, start=100, limit=200, laps=3
    )
    assert (summary.events, summary.laps) == (600, 3)

    rows = list(iter_rows(path))[100:300]
    span = rows[-1].timestamp - rows[0].timestamp
    shift = span + span / (len(rows) - 1)  # the rows' span plus their mean gap
    tag = source_tag(path)
    expected = {
        event_id(lap_tag(tag, lap), row.line): (row, lap * shift)
        for lap in range(3)
        for row in rows
    }
    assert len(expected) == 600  # every pass under ids of its own
    got = {rec["event_id"]: rec for _k, _v, rec in _read_back(kafka)}
    assert set(got) == set(expected)
    for eid, (row, moved) in expected.items():
        rec = got[eid]
        assert (rec["user_id"], rec["item_id"]) == (row.user_id, row.item_id)
        assert rec["timestamp"] == pytest.approx(row.timestamp + moved)
    # Every pass lies after the one before, so each user's and each item's events keep
    # going forward in time (the router rejects an entity's event older than its last).
    per_lap = [
        [got[event_id(lap_tag(tag, lap), r.line)]["timestamp"] for r in rows] for lap in range(3)
    ]
    assert all(min(per_lap[n]) > max(per_lap[n - 1]) for n in (1, 2))


def test_cli_loop_keeps_producing_until_stopped(kafka: Settings) -> None:
    from streams.runtime.clients import committed_reader

    env = {**os.environ, "JODIE_TOPIC_PREFIX": kafka.topic_prefix}
    proc = subprocess.Popen(
        [sys.executable, "-m", "streams", "produce", "--loop", "--limit", "40"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    consumer = committed_reader(kafka, group_id="test-loop-count")
    try:
        seen = 0
        for _ in range(600):  # 3 passes of 40 events; bounded wait
            seen = sum(c.messages for c in partition_counts(consumer, kafka.topic("interactions")))
            if seen >= 120 or proc.poll() is not None:
                break
            time.sleep(0.2)
        still_running = proc.poll() is None
    finally:
        consumer.close()
        proc.terminate()
        proc.wait(timeout=30)
    assert still_running, "the looping producer stopped by itself"
    assert seen >= 120

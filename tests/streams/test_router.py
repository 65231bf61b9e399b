"""The router on the real broker: canonical order, links, DLQ with reasons, exactly once."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import KafkaError, KafkaException, TopicPartition

from operators.dataset import iter_rows
from operators.protocol.sequencer import Sequencer
from schemas import INTERACTION, Codec, load_schema
from schemas.codec import INBOX_MESSAGE
from streams.codecs import make_codec
from streams.exceptions import ReadError
from streams.peek import partition_counts, read_all
from streams.produce import event_id, produce_file, source_tag, to_record
from streams.router import (
    DLQ_COPY_BYTES,
    DLQ_DETAIL_CHARS,
    Router,
    read_log,
    read_positions,
    restore_sequencer,
)
from streams.runtime.clients import committed_reader, idempotent_producer
from streams.settings import Settings

pytestmark = pytest.mark.kafka

N = 400


def _csv(tmp_path: Path, n: int = N) -> Path:
    lines = ["user_id,item_id,timestamp,state_label,f1,f2"]
    lines += [f"u{r % 23},i{(r * 5) % 13},{10.0 + r},0,{r % 3},{r % 5}" for r in range(n)]
    path = tmp_path / "events.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def _assert_canonical(settings: Settings, path: Path) -> None:
    """The log holds every row once, in file order, with exact user and item links."""
    log = read_log(settings)
    tag = source_tag(path)
    rows = list(iter_rows(path))
    assert [e.seq for e in log] == list(range(len(rows)))
    assert [e.event.event_id for e in log] == [event_id(tag, r.line) for r in rows]
    last_user: dict[str, int] = {}
    last_item: dict[str, int] = {}
    for e in log:
        assert e.prev_user_seq == last_user.get(e.event.user_id, -1)
        assert e.prev_item_seq == last_item.get(e.event.item_id, -1)
        last_user[e.event.user_id] = e.seq
        last_item[e.event.item_id] = e.seq


def test_bad_input_goes_to_the_dlq_and_the_rest_flows(kafka: Settings, tmp_path: Path) -> None:
    path = _csv(tmp_path)
    topic = kafka.topic("interactions")
    codec = make_codec(kafka, INTERACTION, topic)
    produce_file(path, idempotent_producer(kafka), codec, topic)

    v2 = copy.deepcopy(load_schema(INTERACTION))
    v2["fields"].append({"name": "extra", "type": ["null", "string"], "default": None})
    good = {
        "event_id": "x",
        "user_id": "bad",
        "item_id": "i0",
        "timestamp": 50.0,
        "features": [1.0, 2.0],
        "state_label": 0,
    }
    bad: list[tuple[str, bytes, bytes]] = [
        ("malformed", b"u0", b"\x00not avro at all"),
        ("unknown_schema", b"u1", Codec(v2).encode({**good, "event_id": "bad-1", "extra": None})),
        ("missing_id", b"", codec.encode({**good, "event_id": "bad-2", "user_id": ""})),
        (
            "bad_features",
            b"bad",
            codec.encode({**good, "event_id": "bad-3", "features": [float("nan"), 1.0]}),
        ),
        ("feature_length", b"bad", codec.encode({**good, "event_id": "bad-4", "features": [1.0]})),
        # u5's last event is at t = 10 + 394; this one claims t = 12.
        (
            "time_backwards",
            b"u5",
            codec.encode({**good, "event_id": "bad-5", "user_id": "u5", "timestamp": 12.0}),
        ),
    ]
    producer = idempotent_producer(kafka)
    for _reason, key, value in bad:
        producer.produce(topic, key=key, value=value)
    producer.flush()
    # A whole re-run of the file: every event is a duplicate and must not be applied again;
    # each re-send goes to the DLQ as such.
    produce_file(path, idempotent_producer(kafka), codec, topic)

    stats = Router(kafka, grace_s=0.2).run(until_idle_s=2.0, max_seconds=120)
    assert stats.sequenced == N and stats.duplicates == N and stats.rejected == len(bad) + N
    assert stats.rejected_by_reason["duplicate"] == N
    _assert_canonical(kafka, path)

    dlq = list(read_all(kafka, kafka.topic("interactions.dlq")))
    assert len(dlq) == len(bad) + N
    got = {value: (key or b"") for key, value, _p, _o in dlq}
    for _reason, key, value in bad:
        assert got[value] == key  # the original bytes and key, untouched
    resent = {codec.encode(to_record(r, source_tag(path))) for r in iter_rows(path)}
    assert {value for _k, value, _p, _o in dlq} - {v for _r, _k, v in bad} == resent
    reasons = _dlq_reasons(kafka)
    assert sorted(reasons) == sorted([r for r, _k, _v in bad] + ["duplicate"] * N)


def _dlq_reasons(settings: Settings) -> list[str]:
    from confluent_kafka import TopicPartition

    from streams.runtime.clients import committed_reader

    consumer = committed_reader(settings, group_id=f"dlq-{os.getpid()}-{time.time_ns()}")
    topic = settings.topic("interactions.dlq")
    consumer.assign([TopicPartition(topic, 0, 0)])
    reasons: list[str] = []
    deadline = time.monotonic() + 30
    try:
        while time.monotonic() < deadline:
            msg = consumer.poll(1.0)
            if msg is None:
                break
            if msg.error() is not None:
                break  # partition EOF
            headers = dict(msg.headers() or [])
            assert headers["detail"] and headers["source"].startswith(
                topic.replace(".dlq", "").encode()
            )
            reasons.append(headers["reason"].decode())
    finally:
        consumer.close()
    return reasons


@pytest.fixture
def kafka_3_inputs(broker: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    """Fresh topics with ``interactions`` (and its log) in three partitions, which the router
    merges by time: one by default, more where producers need them."""
    from streams.topics import scratch_topics

    monkeypatch.setenv("JODIE_INPUT_PARTITIONS", "3")
    with scratch_topics("t") as settings:
        yield settings


def test_router_killed_mid_stream_restarts_without_loss_or_repeat(
    kafka_3_inputs: Settings, tmp_path: Path
) -> None:
    """Killed between or inside transactions while merging three input partitions."""
    kafka = kafka_3_inputs
    n = 6000
    path = _csv(tmp_path, n)
    topic = kafka.topic("interactions")
    env = {**os.environ, "JODIE_TOPIC_PREFIX": kafka.topic_prefix}
    cmd = [sys.executable, "-m", "streams", "router", "--until-idle", "3", "--grace", "0.2"]
    first = subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    assert first.stderr is not None
    assert "router ready" in first.stderr.readline()  # bounded: the process prints or exits
    # Events keep arriving while the router runs, so it is killed between or inside
    # transactions, whichever comes.
    codec = make_codec(kafka, INTERACTION, topic)
    sender = threading.Thread(
        target=produce_file,
        args=(path, idempotent_producer(kafka), codec, topic),
        kwargs={"rate": 500.0, "flush_every": 100},
    )
    sender.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and first.poll() is None:
        if len(read_log(kafka)) >= 300:
            break
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=30)
    partial = len(read_log(kafka))
    assert 0 < partial < n
    sender.join(timeout=120)
    ends = _ends(kafka)
    assert len(ends) == 3 and min(ends.values()) > 0  # events keyed by user spread over all
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert second.returncode == 0, second.stderr[-2000:]
    _assert_canonical(kafka, path)  # every event exactly once, same numbering as a clean run


def _produce_rows(settings: Settings, path: Path, start: int, limit: int) -> None:
    topic = settings.topic("interactions")
    codec = make_codec(settings, INTERACTION, topic)
    produce_file(path, idempotent_producer(settings), codec, topic, start=start, limit=limit)


def _set_group_offsets(settings: Settings, offsets: dict[int, int]) -> None:
    consumer = committed_reader(settings, group_id=f"{settings.topic_prefix}jodie-router")
    topic = settings.topic("interactions")
    try:
        consumer.commit(
            offsets=[TopicPartition(topic, p, o) for p, o in offsets.items()], asynchronous=False
        )
    finally:
        consumer.close()


def _ends(settings: Settings) -> dict[int, int]:
    topic = settings.topic("interactions")
    consumer = committed_reader(settings, group_id="jodie-inspect-ends")
    try:
        return {c.partition: c.high for c in partition_counts(consumer, topic)}
    finally:
        consumer.close()


def test_a_restarted_router_resumes_from_its_positions_not_the_groups_offsets(
    kafka: Settings, tmp_path: Path
) -> None:
    """The positions committed with the output (interactions.positions) are where a router
    resumes: the consumer group's offsets, committed outside the transactions for lag
    monitors, are never read back once positions exist, so offsets that lag behind (here:
    reset to 0) route nothing twice."""
    path = _csv(tmp_path)
    half = N // 2
    _produce_rows(kafka, path, 0, half)
    stats = Router(kafka, grace_s=0.2).run(until_idle_s=1.0, max_seconds=120)
    assert stats.sequenced == half
    ends = _ends(kafka)
    assert read_positions(kafka) == ends
    _set_group_offsets(kafka, dict.fromkeys(ends, 0))
    _produce_rows(kafka, path, half, N - half)
    stats = Router(kafka, grace_s=0.2).run(until_idle_s=1.0, max_seconds=120)
    assert (stats.sequenced, stats.duplicates, stats.rejected) == (N - half, 0, 0)
    _assert_canonical(kafka, path)
    assert read_positions(kafka) == _ends(kafka)


def test_a_router_without_positions_yet_resumes_from_the_groups_offsets(
    kafka: Settings, tmp_path: Path
) -> None:
    """A pipeline whose router committed its input offsets to the consumer group (before
    interactions.positions) resumes where the group is, then writes positions."""
    path = _csv(tmp_path)
    _produce_rows(kafka, path, 0, 100)
    _set_group_offsets(kafka, _ends(kafka))  # as the earlier router left them
    _produce_rows(kafka, path, 100, 50)
    stats = Router(kafka, grace_s=0.2).run(until_idle_s=1.0, max_seconds=120)
    assert (stats.sequenced, stats.rejected) == (50, 0)
    assert [e.event.event_id for e in read_log(kafka)] == [
        event_id(source_tag(path), r.line) for r in list(iter_rows(path))[100:150]
    ]
    assert read_positions(kafka) == _ends(kafka)


def test_a_message_too_large_to_copy_whole_reaches_the_dlq_cut(kafka: Settings) -> None:
    """The broker takes messages up to about 1 MiB from clients whose limit allows it, more
    than the router's producer may send: the DLQ gets the start of such a message (and of a
    decoding error quoting a huge field) instead of the router stopping at it for good."""
    topic = kafka.topic("interactions")
    codec = make_codec(kafka, INTERACTION, topic)
    event = {
        "event_id": "e" * 1_040_000,  # bad_id, and past the router's producer limit
        "user_id": "u",
        "item_id": "i",
        "timestamp": 1.0,
        "features": [],
        "state_label": None,
    }
    huge = codec.encode(event)
    placeholder = "p" * 500_000
    # Fits whole, but the decoding error quotes every byte of the field (2 MB escaped).
    bad_utf8 = codec.encode({**event, "event_id": placeholder})
    bad_utf8 = bad_utf8.replace(placeholder.encode(), b"\xff" * len(placeholder))
    fine = codec.encode({**event, "event_id": "ok", "timestamp": 2.0})
    producer = idempotent_producer(kafka, **{"message.max.bytes": 1_048_000})
    for value in (huge, bad_utf8, fine):
        producer.produce(topic, key=b"u", value=value)
    assert producer.flush(30) == 0

    stats = Router(kafka, grace_s=0.2).run(until_idle_s=1.0, max_seconds=120)
    assert (stats.sequenced, stats.rejected_by_reason) == (1, {"bad_id": 1, "malformed": 1})
    assert [e.event.event_id for e in read_log(kafka)] == ["ok"]
    consumer_dlq = list(read_all(kafka, kafka.topic("interactions.dlq")))
    assert [v for _k, v, _p, _o in consumer_dlq] == [huge[: DLQ_COPY_BYTES - 1], bad_utf8]
    headers = _dlq_headers(kafka)
    assert headers[0]["truncated"] == f"key 1 value {len(huge)}".encode()
    assert "truncated" not in headers[1]
    assert len(headers[1]["detail"].decode()) <= DLQ_DETAIL_CHARS + 1


def test_a_restore_short_of_the_logs_end_is_an_error_not_a_fresh_start(
    kafka: Settings, tmp_path: Path
) -> None:
    """A router restarting while the broker is slow to answer fetches (it just restarted
    itself) must not take what came in time for the whole log: restored from part of it, it
    gave seqs already taken to new events and started chains anew for the entities it missed
    (seen after a broker restart mid-stream). An idle timeout too short for any fetch to
    arrive stands for that broker here."""
    path = _csv(tmp_path, 60)
    topic = kafka.topic("interactions")
    produce_file(path, idempotent_producer(kafka), make_codec(kafka, INTERACTION, topic), topic)
    Router(kafka, grace_s=0.2).run(until_idle_s=1.0, max_seconds=120)

    def fresh() -> Sequencer:
        return Sequencer(range(4), None, clock=time.time)

    whole = fresh()
    assert restore_sequencer(kafka, whole)[0] == 60
    with pytest.raises(ReadError, match="not at their end"):
        restore_sequencer(kafka, fresh(), idle_timeout_s=1e-6)


def _dlq_headers(settings: Settings) -> list[dict[str, bytes]]:
    from confluent_kafka import TopicPartition

    from streams.runtime.clients import committed_reader

    consumer = committed_reader(settings, group_id=f"dlq-{os.getpid()}-{time.time_ns()}")
    consumer.assign([TopicPartition(settings.topic("interactions.dlq"), 0, 0)])
    out: list[dict[str, bytes]] = []
    try:
        while (msg := consumer.poll(5.0)) is not None and msg.error() is None:
            out.append(dict(msg.headers() or []))
    finally:
        consumer.close()
    return out


class _TimedRouter(Router):
    """A router that notes when each of its transactions committed, and how many events."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.commits: list[tuple[float, int]] = []

    def _commit(self, *args: object, **kwargs: object) -> None:
        super()._commit(*args, **kwargs)  # type: ignore[arg-type]
        self.commits.append((time.monotonic(), len(args[2])))  # type: ignore[arg-type]


def test_a_commit_interval_spaces_the_transactions_and_loses_nothing(
    kafka: Settings, tmp_path: Path
) -> None:
    """Events sequenced within the interval after a commit wait and commit together: every
    two transactions are at least the interval apart (unless a full batch commits at once),
    and the log is the same canonical sequence."""
    interval = 0.5
    settings = kafka.model_copy(update={"router_commit_interval_s": interval})
    path = _csv(tmp_path)

    def trickle() -> None:  # 20 events every 0.05 s: about 20 sends per interval
        for start in range(0, N, 20):
            _produce_rows(settings, path, start, 20)
            time.sleep(0.05)

    sender = threading.Thread(target=trickle)
    sender.start()
    router = _TimedRouter(settings, grace_s=0.2, batch=2000)
    stats = router.run(until_idle_s=2.0, max_seconds=120)
    sender.join()
    assert stats.sequenced == N and stats.rejected == 0
    _assert_canonical(settings, path)
    assert sum(n for _t, n in router.commits) == N
    gaps = [b[0] - a[0] for a, b in zip(router.commits, router.commits[1:], strict=False)]
    assert len(router.commits) >= 2, router.commits
    assert min(gaps) >= interval, gaps


def test_group_offsets_past_the_topics_end_are_an_earlier_topics_and_ignored(
    kafka: Settings, tmp_path: Path
) -> None:
    """Without positions the router reads the group's offsets; one past a partition's end
    was left by a topic of the same name deleted before (its group kept): the router reads
    that partition from its beginning instead of waiting past its end."""
    path = _csv(tmp_path)
    _produce_rows(kafka, path, 0, 50)
    _set_group_offsets(kafka, dict.fromkeys(_ends(kafka), 31_495))
    stats = Router(kafka, grace_s=0.2).run(until_idle_s=1.0, max_seconds=120)
    assert (stats.sequenced, stats.rejected) == (50, 0)
    assert [e.event.event_id for e in read_log(kafka)] == [
        event_id(source_tag(path), r.line) for r in list(iter_rows(path))[:50]
    ]


class _FailingOnce(Router):
    """A router whose second transaction fails as a broker failure makes it, once committed."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.commits = 0

    def _commit(self, *args: object, **kwargs: object) -> None:
        super()._commit(*args, **kwargs)  # type: ignore[arg-type]
        self.commits += 1
        if self.commits == 2:
            raise KafkaException(KafkaError(KafkaError._TIMED_OUT, "the broker went away"))


def _inbox_seqs(settings: Settings, side: str) -> list[int]:
    """The event seqs of every committed message of an inbox, in reading order."""
    codec = Codec(INBOX_MESSAGE)
    seqs = []
    for _key, value, _p, _o in read_all(settings, settings.topic(side)):
        event = codec.decode(value)["event"]
        if event is not None:
            seqs.append(int(event["seq"]))
    return seqs


def test_a_router_starting_over_sends_the_latest_events_inbox_messages_again(
    kafka: Settings, tmp_path: Path
) -> None:
    """A router that starts over after a failure sends the inbox messages of the log's latest
    events again (two batches' worth): a commit the broker completed without all of its
    markers can leave a batch's log records committed and its inbox messages aborted, and
    nothing else would send them. The log stays the canonical sequence, and each inbox holds
    every event, the re-sent ones twice (the workers ignore repeats)."""
    path = _csv(tmp_path)
    _produce_rows(kafka, path, 0, 150)
    router = _FailingOnce(kafka, grace_s=0.2, batch=50)
    finished = threading.Event()

    def more() -> None:  # the rest once the failure happened
        while router.stats.restarts == 0 and not finished.is_set():
            time.sleep(0.05)
        _produce_rows(kafka, path, 150, N - 150)

    sender = threading.Thread(target=more)
    sender.start()
    try:
        stats = router.run(until_idle_s=2.0, max_seconds=120)
    finally:
        finished.set()
        sender.join()
    assert stats.restarts == 1  # (the failed batch committed, uncounted: the log tells)
    _assert_canonical(kafka, path)
    logged = len(read_log(kafka))
    assert logged == N
    for side in ("user-inbox", "item-inbox"):
        seqs = _inbox_seqs(kafka, side)
        counts = Counter(seqs)
        assert set(counts) == set(range(N)), side
        again = sorted(s for s, n in counts.items() if n == 2)
        assert max(counts.values()) == 2 and again, side
        # The latest events committed before the failure, at most two batches of them.
        assert again == list(range(again[0], again[-1] + 1)) and len(again) <= 100, again
        assert stats.resent == len(again)

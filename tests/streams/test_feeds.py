"""The workers' feeds: the log's tail (never offset 0) into co-occurrence, bounded read-ahead."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from operators.protocol.sequencer import Interaction, SequencedEvent
from operators.retrieval.cooccurrence import CooccurrenceCandidates
from schemas.codec import SEQUENCED_INTERACTION
from streams.app.processor import SEQ_HEADER, STATS_HEADERS, Processor, WorkerStats
from streams.app.serving import Serving
from streams.codecs import make_codec
from streams.feeds import Feeds, _deliver
from streams.router import to_log_record
from streams.runtime.clients import idempotent_producer
from streams.settings import Settings
from tests.streams.harness import make_checkpoint


def write_log(settings: Settings, n: int) -> None:
    topic = settings.topic("interactions.log")
    codec = make_codec(settings, SEQUENCED_INTERACTION, topic)
    producer = idempotent_producer(settings)
    for seq in range(n):
        event = Interaction(f"e{seq}", f"u{seq}", f"i{seq}", float(seq), (), None)
        record = to_log_record(SequencedEvent(seq, -1, -1, None, None, event))
        producer.produce(topic, key=f"e{seq}".encode(), value=codec.encode(record))
    producer.flush(30)


def observed(cooc: CooccurrenceCandidates) -> set[int]:
    return {int(item[1:]) for item in cooc._audience}


def poll_until(feeds: Feeds, applied_seq: int, done: object, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not done() and time.monotonic() < deadline:  # type: ignore[operator]
        feeds.poll(applied_seq)
        time.sleep(0.05)


def test_a_starting_worker_reads_only_the_logs_tail(kafka: Settings) -> None:
    write_log(kafka, 400)
    # No exact tier: the co-occurrence candidates serve from the start, so the log is read.
    settings = kafka.model_copy(update={"feed_warmup": 100, "index_exact_below": 0})
    cooc = CooccurrenceCandidates()
    feeds = Feeds(settings, Processor(settings, None, WorkerStats()), cooc)
    try:
        poll_until(feeds, 10_000, lambda: len(observed(cooc)) >= 100)
        time.sleep(0.5)
        feeds.poll(10_000)
        seen = observed(cooc)
        # The last 100 over the partitions, from each one's end: nothing from the log's start.
        assert len(seen) == 100 and min(seen) >= 400 - 100 * kafka.partitions
    finally:
        feeds.close()


def test_the_log_is_read_only_once_an_index_nears_the_approximate_tier(
    kafka: Settings, tmp_path: Path
) -> None:
    write_log(kafka, 400)
    serving = Serving.load(kafka, make_checkpoint(tmp_path / "v1", version="v1"))
    items = len(serving.index)
    for exact_below, reads in ((10 * items, False), (items, True)):
        settings = kafka.model_copy(update={"feed_warmup": 100, "index_exact_below": exact_below})
        cooc = CooccurrenceCandidates()
        processor = Processor(settings, serving, WorkerStats())
        feeds = Feeds(settings, processor, cooc)
        try:
            poll_until(feeds, 10_000, lambda: len(observed(cooc)) >= 100, timeout_s=5.0)  # noqa: B023
            # Far below the tier nothing of the log is read; at four fifths of it, the tail.
            assert feeds.reading_log is reads
            assert len(observed(cooc)) == (100 if reads else 0)
        finally:
            feeds.close()


def test_events_ahead_of_the_applied_seq_are_held_up_to_a_bound(kafka: Settings) -> None:
    n = 9_000  # more than the bound and one poll's messages (5,000)
    write_log(kafka, n)
    # A warm-up past the log: all of it (partitions hold unequal shares of the last n).
    settings = kafka.model_copy(
        update={"feed_warmup": 10 * n, "feed_ahead": 50, "index_exact_below": 0}
    )
    cooc = CooccurrenceCandidates(max_items=n)
    feeds = Feeds(settings, Processor(settings, None, WorkerStats()), cooc)
    try:
        poll_until(feeds, -1, lambda: feeds.held() >= 50)
        for _ in range(20):  # stopped: no more is read while nothing is applied
            feeds.poll(-1)
            time.sleep(0.05)
        assert 50 <= feeds.held() <= 50 + 5_000 and not observed(cooc)
        # The worker catches up: everything is observed in the end, nothing skipped.
        poll_until(feeds, n, lambda: len(observed(cooc)) == n, timeout_s=60)
        assert observed(cooc) == set(range(n)) and feeds.held() == 0
    finally:
        feeds.close()


def test_a_vector_read_back_never_sets_an_item_back(tmp_path: Path) -> None:
    """An item's vectors are ordered by its event count: the index keeps the one after the
    most events, whichever comes last (a worker reads its own vectors back after it indexed
    later ones)."""
    serving = Serving.load(Settings(), make_checkpoint(tmp_path / "ck"))
    item = serving.index.top(0, 1)[0]
    vector, attrs = serving.index.get(item)  # type: ignore[misc]
    count, t = float(attrs[0]), float(attrs[2])
    newer, older = vector + 1.0, vector - 1.0
    _deliver(serving, [(-1, item, newer, (count + 2, 1.0, t + 2))])
    _deliver(serving, [(-1, item, older, (count + 1, 1.0, t + 1))])
    held, held_attrs = serving.index.get(item)  # type: ignore[misc]
    assert np.array_equal(held, newer) and held_attrs[0] == count + 2
    _deliver(serving, [(-1, item, older, (0.0, 0.0, float("nan")))])  # no count: goes in
    assert np.array_equal(serving.index.get(item)[0], older)  # type: ignore[index]


def test_a_worker_leaves_its_own_vectors_aside_and_takes_the_others(
    kafka: Settings, tmp_path: Path
) -> None:
    """What this process wrote to item-vectors it applied as it wrote it; a vector of another
    process (another worker, or this worker's previous run) goes to the index."""
    serving = Serving.load(kafka, make_checkpoint(tmp_path / "ck"))
    processor = Processor(kafka, serving, WorkerStats())
    other = Processor(kafka, None, WorkerStats())
    assert processor.origin != other.origin
    mine, theirs = serving.index.top(0, 2)
    held = {item: serving.index.get(item) for item in (mine, theirs)}
    topic = kafka.topic("item-vectors")
    producer = idempotent_producer(kafka)
    for item, origin in ((mine, processor.origin), (theirs, other.origin)):
        vector, attrs = held[item]  # type: ignore[misc]
        stats = (float(attrs[0]) + 1, 1.0, float(attrs[2]) + 1)
        headers = [(name, repr(v).encode()) for name, v in zip(STATS_HEADERS, stats, strict=True)]
        producer.produce(
            topic,
            key=item.encode(),
            value=(vector + 1.0).astype("<f4").tobytes(),
            headers=[(SEQ_HEADER, b"-1"), *headers, origin],
        )
    producer.flush(30)
    count = {item: float(held[item][1][0]) for item in held}  # type: ignore[index]
    feeds = Feeds(kafka, processor, None)
    try:
        poll_until(feeds, 0, lambda: serving.index.get(theirs)[1][0] > count[theirs])  # type: ignore[index]
        feeds.poll(0)
    finally:
        feeds.close()
    vector, attrs = serving.index.get(theirs)  # type: ignore[misc]
    assert attrs[0] == count[theirs] + 1
    assert np.array_equal(vector, held[theirs][0] + 1.0)  # type: ignore[index]
    vector, attrs = serving.index.get(mine)  # type: ignore[misc]
    assert attrs[0] == count[mine] and np.array_equal(vector, held[mine][0])  # type: ignore[index]

"""streams.app.evaluation: the live evaluation in a process of its own ranks as inline."""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import time

import numpy as np
import pytest

from operators.evaluation.live import LiveRanks, Query
from operators.evaluation.protocols import frozen_replay
from operators.evaluation.scorer import PlainScorer
from operators.protocol.sides import CheckpointStates
from streams.app.evaluation import RanksApart
from tests.operators.conftest import build_log
from tests.operators.evaluation.test_live import _AsCheckpoint, _setup, _stream_outputs

#: Seconds a test waits for the child's ranks (its start imports torch).
WAIT_S = 60.0


def _collect(apart: RanksApart, want: int) -> dict[int, tuple[int, int]]:
    """Call ``ready`` until ``want`` ranks came back (or the wait runs out)."""
    got: dict[int, tuple[int, int]] = {}
    deadline = time.monotonic() + WAIT_S
    while len(got) < want and time.monotonic() < deadline:
        for r in apart.ready():
            assert r.query.seq not in got, "a rank came back twice"
            got[r.query.seq] = (r.rank, r.n_items)
        time.sleep(0.01)
    return got


def _fixture(seed: int = 1, n_events: int = 300) -> tuple[LiveRanks, list[Query], list, list[int]]:
    model, states, events = _setup(seed=seed, n_events=n_events)
    checkpoint = states.copy()
    log = build_log(
        [e.user_id for e in events], [e.item_id for e in events], [e.timestamp for e in events]
    )
    offline, _ = frozen_replay(model, states.copy(), log, PlainScorer())
    queries, vectors = _stream_outputs(model, checkpoint.copy(), events)
    ids, start_vectors = CheckpointStates(_AsCheckpoint(checkpoint)).item_vectors()  # type: ignore[arg-type]
    live = LiveRanks(model, 0, list(ids), start_vectors.copy())
    return live, queries, vectors, offline.tolist()


def test_ranks_apart_equal_the_frozen_replay_whatever_the_arrival_order() -> None:
    live, queries, vectors, offline = _fixture()
    apart = RanksApart(live)
    try:
        inputs: list[tuple[str, object]] = [("q", q) for q in queries]
        inputs += [("v", v) for v in vectors]
        random.Random(0).shuffle(inputs)
        got: dict[int, tuple[int, int]] = {}
        for k, (kind, body) in enumerate(inputs):
            if kind == "q":
                apart.add(body)  # type: ignore[arg-type]
            else:
                apart.item_vector(*body)  # type: ignore[misc]
            if k % 37 == 0:  # batches of the processing's kind: ready() once in a while
                got.update((r.query.seq, (r.rank, r.n_items)) for r in apart.ready())
        got.update(_collect(apart, len(queries) - len(got)))
        assert [got[k][0] for k in range(len(queries))] == offline
        assert apart.pending() == 0 and apart.unranked == 0
        assert apart.watermark == len(queries)
    finally:
        apart.close()
    assert apart._proc.returncode == 0


def test_ranks_apart_carry_each_querys_ids() -> None:
    live, queries, vectors, _ = _fixture(seed=3, n_events=90)
    apart = RanksApart(live)
    try:
        _hand_in(apart, vectors, queries)
        got = []
        deadline = time.monotonic() + WAIT_S
        while len(got) < len(queries) and time.monotonic() < deadline:
            got += apart.ready()
            time.sleep(0.01)
        assert sorted(
            (r.query.seq, r.query.event_id, r.query.user_id, r.query.item_id) for r in got
        ) == [(q.seq, q.event_id, q.user_id, q.item_id) for q in queries]
    finally:
        apart.close()


def test_only_the_sample_is_sent_and_counted() -> None:
    live, queries, vectors, offline = _fixture(seed=4, n_events=120)
    live.every = 3
    apart = RanksApart(live)
    try:
        assert [apart.samples(q.seq) for q in queries[:4]] == [True, False, False, True]
        _hand_in(apart, vectors, queries)
        sampled = [q.seq for q in queries if q.seq % 3 == 0]
        got = _collect(apart, len(sampled))
        assert sorted(got) == sampled
        assert [got[s][0] for s in sampled] == [offline[s] for s in sampled]
    finally:
        apart.close()


def test_a_batch_that_fails_is_logged_and_the_next_ones_are_ranked(
    caplog: pytest.LogCaptureFixture,
) -> None:
    live, queries, vectors, offline = _fixture(seed=5, n_events=90)
    apart = RanksApart(live)
    try:
        for v in vectors:
            apart.item_vector(*v)
        bad = queries[0]._replace(pre_state=np.zeros(3, np.float32))  # not the model's size
        apart.add(bad)
        with caplog.at_level(logging.WARNING, logger="streams.app.evaluation"):
            deadline = time.monotonic() + WAIT_S
            while apart.pending() and time.monotonic() < deadline:
                assert apart.ready() == []
                time.sleep(0.01)
        assert any("was not ranked" in r.getMessage() for r in caplog.records)
        assert apart.unranked == 1
        for q in queries[1:]:
            apart.add(q)
        got = _collect(apart, len(queries) - 1)
        assert [got[q.seq][0] for q in queries[1:]] == offline[1:]
    finally:
        apart.close()


def test_a_killed_ranking_process_counts_what_it_would_rank_as_unranked(
    caplog: pytest.LogCaptureFixture,
) -> None:
    live, queries, vectors, _ = _fixture(seed=6, n_events=90)
    apart = RanksApart(live)
    try:
        for v in vectors:
            apart.item_vector(*v)
        half = len(queries) // 2
        for q in queries[:half]:
            apart.add(q)
        assert len(_collect(apart, half)) == half
        os.kill(apart._proc.pid, signal.SIGKILL)
        apart._proc.wait(WAIT_S)
        with caplog.at_level(logging.ERROR, logger="streams.app.evaluation"):
            deadline = time.monotonic() + WAIT_S
            rest = queries[half:]
            for q in rest:
                apart.add(q)
                assert apart.ready() == []  # no exception: the worker keeps serving
            while apart.unranked < len(rest) and time.monotonic() < deadline:
                assert apart.ready() == []
                time.sleep(0.01)
        assert apart.unranked == len(rest) and apart.pending() == 0
        assert sum("ranking process stopped" in r.getMessage() for r in caplog.records) == 1
    finally:
        apart.close()


def test_starts_only_from_a_fresh_live_evaluation() -> None:
    live, queries, _, _ = _fixture(seed=7, n_events=30)
    live.add(queries[0])
    with pytest.raises(ValueError, match="no input"):
        RanksApart(live)


def _hand_in(apart: RanksApart, vectors: list, queries: list[Query]) -> None:
    """Every item vector, then every query, as a worker's batches hand them over."""
    for v in vectors:
        apart.item_vector(*v)
    for q in queries:
        apart.add(q)


def _started(seed: int, n_events: int) -> tuple[RanksApart, list[Query], list, list[int]]:
    """A ranking child with its first rank back: proof that it has its spec."""
    live, queries, vectors, offline = _fixture(seed=seed, n_events=n_events)
    apart = RanksApart(live)
    try:
        for v in vectors:
            apart.item_vector(*v)
        apart.add(queries[0])
        assert _collect(apart, 1)[0][0] == offline[0]
    except BaseException:
        apart.close()
        raise
    return apart, queries, vectors, offline


def _flood(apart: RanksApart, queries: list[Query], rows: int, dim: int) -> None:
    """20 batches of ``rows`` item vectors and a query (``queries[1:21]``) each, to a child
    that takes nothing: nothing comes back, and nothing waits for it."""
    padding = np.zeros((rows, dim), np.float32)
    for k in range(20):
        for row in padding:
            apart.item_vector(10**6 + k, "i0", row)
        apart.add(queries[1 + k])
        assert apart.ready() == []


def test_a_child_kept_from_running_never_holds_the_processing_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Stopped (SIGSTOP), the child takes nothing: past the backlog bound the queries are
    counted as unranked at once, the item vectors still queued; resumed, it ranks the
    queries sent after."""
    import streams.app.evaluation as evaluation

    apart, queries, vectors, offline = _started(seed=8, n_events=300)
    try:
        # Everything was taken; the spec (the weights, every item) is not in the backlog.
        assert apart._queued_bytes - apart._sent_bytes == 0
        monkeypatch.setattr(evaluation, "MAX_BACKLOG_BYTES", 1 << 20)
        os.kill(apart._proc.pid, signal.SIGSTOP)
        stopped = time.monotonic()
        # ~190 KB a batch (16 floats a row): past the socket's buffers and the bound.
        _flood(apart, queries, 2000, vectors[0][2].shape[0])
        assert time.monotonic() - stopped < 10  # never blocked on the stopped child
        assert apart.unranked > 0  # the queries past the bound
        dropped = apart.unranked
        os.kill(apart._proc.pid, signal.SIGCONT)
        assert len(_collect(apart, 20 - dropped)) == 20 - dropped  # those sent before the bound
        for q in queries[21:]:
            apart.add(q)
        got = _collect(apart, len(queries) - 21)
        assert [got[q.seq][0] for q in queries[21:]] == offline[21:]
        assert apart.unranked == dropped
    finally:
        os.kill(apart._proc.pid, signal.SIGCONT)
        apart.close()


def test_a_child_stopped_for_good_is_given_up_and_its_backlog_let_go(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Stopped (SIGSTOP) and never resumed, the child would let the item vectors queued for
    it grow without end: past the second bound it is killed, counted as a child that died,
    and what waited for it is dropped."""
    import streams.app.evaluation as evaluation

    apart, queries, vectors, _ = _started(seed=11, n_events=60)
    try:
        monkeypatch.setattr(evaluation, "MAX_BACKLOG_BYTES", 1 << 20)
        monkeypatch.setattr(evaluation, "GIVE_UP_BYTES", 8 << 20)
        os.kill(apart._proc.pid, signal.SIGSTOP)
        with caplog.at_level(logging.WARNING, logger="streams.app.evaluation"):
            # ~1.9 MB a batch: 38 MB, past both bounds.
            _flood(apart, queries, 20000, vectors[0][2].shape[0])
            deadline = time.monotonic() + WAIT_S
            while apart.pending() and time.monotonic() < deadline:
                assert apart.ready() == []
                time.sleep(0.01)
        assert apart._proc.poll() == -signal.SIGKILL
        assert apart.pending() == 0 and apart.unranked == 20
        assert apart._outbox.empty()
        messages = [r.getMessage() for r in caplog.records]
        assert sum("has taken nothing" in m for m in messages) == 1
        assert sum("ranking process stopped" in m for m in messages) == 1
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(apart._proc.pid, signal.SIGCONT)
        apart.close()


def test_finish_returns_every_rank_on_its_way() -> None:
    """One call, no ``ready`` before it: what was handed in is sent, and the ranks of all of
    it (the child's start included) are waited for."""
    live, queries, vectors, offline = _fixture(seed=9)
    apart = RanksApart(live)
    try:
        _hand_in(apart, vectors, queries)
        got = {r.query.seq: r.rank for r in apart.finish(WAIT_S)}
        assert [got[q.seq] for q in queries] == offline
        assert apart.pending() == 0 and apart.unranked == 0
    finally:
        apart.close()


def test_finish_waits_no_longer_than_its_timeout() -> None:
    """A stopped child (SIGSTOP) never answers: ``finish`` returns what came back, and what
    did not stays pending (the worker reports it, then stops)."""
    apart, queries, _, _ = _started(seed=10, n_events=60)
    try:
        os.kill(apart._proc.pid, signal.SIGSTOP)
        for q in queries[1:]:
            apart.add(q)
        began = time.monotonic()
        assert apart.finish(0.5) == []
        assert 0.5 <= time.monotonic() - began < 5
        assert apart.pending() == len(queries) - 1
    finally:
        os.kill(apart._proc.pid, signal.SIGCONT)
        apart.close()

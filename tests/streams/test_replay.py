"""Replaying interactions.log on the real broker, and `jodie train --from-topic` from it."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from confluent_kafka import TopicPartition
from typer.testing import CliRunner

from operators.dataset import InteractionLog, bundled_wikipedia, load_interactions
from operators.evaluation.protocols import evaluate
from operators.evaluation.scorer import PlainScorer
from operators.exceptions import DataError
from operators.model.checkpoint import load_checkpoint
from operators.model.events import encode
from operators.model.kernel import batched, replay
from operators.model.state import States
from schemas import INTERACTION, SEQUENCED_INTERACTION
from streams.cli import app
from streams.codecs import make_codec
from streams.produce import produce_file
from streams.replay import LogColumns, Window, replay_log, to_log
from streams.router import Router
from streams.runtime.clients import committed_reader, idempotent_producer
from streams.runtime.kafka import watermarks
from streams.settings import Settings, get_settings

N = 3000  # rows of the bundled file streamed through the router


def _route(settings: Settings, path: Path, limit: int | None = None) -> None:
    topic = settings.topic("interactions")
    summary = produce_file(
        path,
        idempotent_producer(settings),
        make_codec(settings, INTERACTION, topic),
        topic,
        limit=limit,
    )
    stats = Router(settings, grace_s=0.2).run(until_idle_s=1.0, max_seconds=120)
    assert stats.sequenced == summary.events and stats.rejected == 0


def _assert_same_rows(got: InteractionLog, want: InteractionLog) -> None:
    assert got.user_ids.tolist() == want.user_ids.tolist()
    assert got.item_ids.tolist() == want.item_ids.tolist()
    np.testing.assert_array_equal(got.timestamps, want.timestamps)
    np.testing.assert_array_equal(got.state_labels, want.state_labels)
    assert got.features.dtype == want.features.dtype == np.float32
    np.testing.assert_array_equal(got.features, want.features)


@pytest.fixture
def cli_settings(kafka: Settings) -> Iterator[Settings]:
    """The CLI reads the process-wide settings once; make it read this test's topic prefix."""
    get_settings.cache_clear()
    yield kafka
    get_settings.cache_clear()


@pytest.mark.kafka
def test_replay_equals_the_csv_and_windows_select_rows(kafka: Settings) -> None:
    _route(kafka, bundled_wikipedia(), N)
    csv = load_interactions(bundled_wikipedia()).slice(0, N)

    whole = replay_log(kafka)
    assert whole.read == N and whole.after_gap == 0 and whole.next_seq == N
    np.testing.assert_array_equal(whole.seqs, np.arange(N))
    _assert_same_rows(whole.log, csv)

    part = replay_log(kafka, Window(from_seq=500, until_seq=1200))
    np.testing.assert_array_equal(part.seqs, np.arange(500, 1200))
    _assert_same_rows(part.log, csv.slice(500, 1200))
    assert part.next_seq == 1200
    assert part.read == 1200  # each partition stopped at its first seq past the window

    t0, t1 = float(csv.timestamps[700]), float(csv.timestamps[2100])
    timed = replay_log(kafka, Window(from_time=t0, until_time=t1))
    rows = np.flatnonzero((csv.timestamps >= t0) & (csv.timestamps < t1))
    assert 0 < rows[0] <= 700 and rows[-1] < 2100
    np.testing.assert_array_equal(timed.seqs, rows)
    _assert_same_rows(timed.log, csv.slice(int(rows[0]), int(rows[-1]) + 1))

    both = replay_log(kafka, Window(from_seq=1000, until_time=t1))
    np.testing.assert_array_equal(both.seqs, rows[rows >= 1000])

    # Reading each partition from the recorded resume offsets gives exactly the later events.
    assert _seqs_from(kafka, part.resume) == list(range(1200, N))
    assert _seqs_from(kafka, whole.resume) == []
    assert part.source("t", None)["partition_offsets"] == {
        str(p): o for p, o in sorted(part.resume.items())
    }


def _seqs_from(settings: Settings, offsets: dict[int, int]) -> list[int]:
    """Seqs of interactions.log read from ``offsets`` to each partition's end."""
    topic = settings.topic("interactions.log")
    codec = make_codec(settings, SEQUENCED_INTERACTION, topic)
    consumer = committed_reader(settings, group_id=f"t-{uuid.uuid4().hex[:8]}")
    ends = {p: watermarks(consumer, TopicPartition(topic, p))[1] for p in offsets}
    consumer.assign([TopicPartition(topic, p, o) for p, o in offsets.items()])
    pending = {p for p in offsets if offsets[p] < ends[p]}
    seqs: list[int] = []
    deadline = time.monotonic() + 30
    try:
        while pending and time.monotonic() < deadline:
            for msg in consumer.consume(1000, 1.0):
                p = msg.partition() or 0
                if msg.error() is not None:
                    pending.discard(p)  # end of partition
                    continue
                if (msg.offset() or 0) >= ends[p] - 1:
                    pending.discard(p)
                seqs.append(int(codec.decode(msg.value())["seq"]))
    finally:
        consumer.close()
    assert not pending
    return sorted(seqs)


@pytest.mark.kafka
def test_replay_keeps_features_and_labels(kafka: Settings, tmp_path: Path) -> None:
    lines = ["user_id,item_id,timestamp,state_label,f1,f2"]
    lines += [f"u{r % 7},i{r % 5},{r // 3},{int(r % 11 == 0)},{r / 7},{-r / 3}" for r in range(300)]
    path = tmp_path / "features.csv"
    path.write_text("\n".join(lines) + "\n")
    _route(kafka, path)
    got = replay_log(kafka)
    csv = load_interactions(path)
    assert csv.n_features == 2 and csv.state_labels.sum() > 0
    _assert_same_rows(got.log, csv)


@pytest.mark.kafka
def test_train_from_topic_checkpoints_the_states_at_the_end(
    cli_settings: Settings, tmp_path: Path
) -> None:
    _route(cli_settings, bundled_wikipedia(), N)
    out = tmp_path / "ck"
    args = ["train", "--out", str(out), "--from-topic", "--from-seq", "100", "--until-seq"]
    args += ["2600", "--epochs", "1", "--scorer", "plain"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    ck = load_checkpoint(out)
    assert ck.meta["log_offsets"] == {"events": 2500, "seq": 2600}
    # Fitted on all but the newest events (JODIE_HOLDOUT_EVENTS, at most a fifth: 500 of
    # 2,500), which pick the epoch; no test split.
    assert ck.meta["split"] == {"train": [0, 2000], "valid": [2000, 2500], "test": [2500, 2500]}
    assert ck.meta["source"]["seqs"] == [100, 2600]
    window = load_interactions(bundled_wikipedia()).slice(100, 2600)  # seq = row here

    # Rebuild the train-end states from the checkpoint alone (the trainer's last step is a
    # no-grad t-batch replay of the training split with the kept weights), then run the
    # frozen evaluation through valid + test: that must be exactly what was saved.
    mcfg = ck.config
    states = States.empty(
        mcfg.embedding_dim, mcfg.user_static_dim, mcfg.item_static_dim, mcfg.history_size
    )
    train_log = window.slice(0, 2000)
    replay(ck.model, states, batched(encode(train_log, states), mcfg, ck.meta["timespan"]))
    bounds = {k: (int(v[0]), int(v[1])) for k, v in ck.meta["split"].items()}
    at_train_end = states.copy()
    evaluate(ck.model, states, window, bounds, "frozen", "test", PlainScorer())
    for got, want, before in (
        (ck.states.users, states.users, at_train_end.users),
        (ck.states.items, states.items, at_train_end.items),
    ):
        assert got.ids == want.ids
        assert torch.equal(got.emb, want.emb)
        np.testing.assert_array_equal(got.last_time, want.last_time)
        np.testing.assert_array_equal(got.history, want.history)
        assert not torch.equal(got.emb[: len(before)], before.emb)

    assert ck.last_seq is not None
    for store, column, last in (
        (ck.states.users, window.user_ids, ck.last_seq.users),
        (ck.states.items, window.item_ids, ck.last_seq.items),
    ):
        want_seq = [100 + int(np.flatnonzero(column == i).max()) for i in store.ids]
        np.testing.assert_array_equal(last, want_seq)
        assert last.dtype == np.int64 and (last >= 100).all() and last.max() == 2599

    refused = CliRunner().invoke(app, ["evaluate", "--checkpoint", str(out)])
    assert refused.exit_code != 0 and "from-topic" in refused.output


def test_train_options_are_checked() -> None:
    both = CliRunner().invoke(app, ["train", "--out", "x", "--from-topic", "--data", "y.csv"])
    assert both.exit_code != 0 and "mutually exclusive" in both.output
    alone = CliRunner().invoke(app, ["train", "--out", "x", "--from-seq", "5"])
    assert alone.exit_code != 0 and "need --from-topic" in alone.output
    with pytest.raises(DataError):
        Window(from_seq=10, until_seq=10)


def test_only_the_gap_free_prefix_is_kept() -> None:
    seqs = [4, 0, 2, 1, 5]  # 3 missing: 4 and 5 were read, but the log holds them after it
    cols = LogColumns(
        seqs,
        [f"u{s}" for s in seqs],
        [f"i{s}" for s in seqs],
        [float(s) for s in seqs],
        [0] * 5,
        [np.zeros((5, 0), np.float32)],
    )
    log, kept, after_gap = to_log(cols, Window())
    assert kept.tolist() == [0, 1, 2] and after_gap == 2
    assert log.user_ids.tolist() == ["u0", "u1", "u2"]
    cols.seqs[4] = 1
    with pytest.raises(DataError, match="seq 1"):
        to_log(cols, Window())

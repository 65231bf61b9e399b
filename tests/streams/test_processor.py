"""The worker's logic in-process (no broker): batches of inbox messages in any order and size,
rows in a plain dict, give the sequential replay and one recommendation per event."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest

import streams.app.processor as processor_module
from operators.dataset import bundled_wikipedia, load_interactions
from operators.evaluation.protocols import frozen_replay
from operators.evaluation.scorer import make_scorer
from operators.model.checkpoint import load_checkpoint
from operators.model.online import OnlineJodie
from operators.protocol.catchup import CatchUp, LogEvent
from operators.protocol.exchange import Inbox
from operators.protocol.sequencer import Interaction, Sequencer
from operators.protocol.sides import EntityState, pack_features
from schemas import Codec
from schemas.codec import EVALUATION, INBOX_MESSAGE, RECOMMENDATION
from streams.app.epochs import UNSTAMPED, Epoch, epoch_of, row_key, split_row_key
from streams.app.processor import Processor, WorkerStats
from streams.app.serving import Serving
from streams.exceptions import ModelMismatchError
from streams.records import inbox_event
from streams.router import event_data_of
from streams.runtime.kafka import partition_for
from streams.settings import Settings
from streams.tail import summarise
from tests.streams.harness import HISTORY, make_checkpoint, reference

STREAM = 150


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "v1")


Epochs = Callable[[int], Epoch]


def _router_messages(
    settings: Settings,
    epochs: Epochs = lambda seq: UNSTAMPED,
    features: dict[int, tuple[float, ...]] | None = None,
) -> list[tuple[str, bytes, bytes]]:
    """What the router writes to the two inboxes for rows [HISTORY, HISTORY + STREAM), each
    event stamped with ``epochs(seq)``; ``features`` by seq replaces an event's features
    after the router's checks (what a worker must survive if they were looser)."""
    log = load_interactions(bundled_wikipedia())
    seq = Sequencer(partitions=[0], n_features=0)
    for n, k in enumerate(range(HISTORY, HISTORY + STREAM)):
        event = Interaction(
            f"e{k:06d}",
            str(log.user_ids[k]),
            str(log.item_ids[k]),
            float(log.timestamps[k]),
            (),
            None,
        )
        seq.offer(0, event, n)
    codec = Codec(INBOX_MESSAGE)
    out = []
    for e in seq.drain(idle={0}).sequenced:
        data = event_data_of(e.event)
        if features and e.seq in features:
            data = data._replace(features=pack_features(features[e.seq]))
        version, since = epochs(e.seq)
        for topic, side_key, prev, partner_prev in (
            (settings.topic("user-inbox"), data.user_id, e.prev_user_seq, e.prev_item_seq),
            (settings.topic("item-inbox"), data.item_id, e.prev_item_seq, e.prev_user_seq),
        ):
            body = {
                "event": inbox_event(e.seq, prev, partner_prev, data),
                "partner": None,
                "model_version": version,
                "model_since": since,
            }
            out.append((topic, side_key.encode(), codec.encode(body)))
    return out


Rows = dict[tuple[str, bytes], Inbox[EntityState, EntityState]]
EVALUATIONS: list[dict] = []  # what the last _run emitted to `evaluations`
DLQ: list[tuple[dict, dict]] = []  # and to `interactions.dlq`: (event, headers)


def _run(
    settings: Settings,
    proc: Processor,
    pool: list[tuple[str, bytes, bytes]],
    seed: int,
    owned: tuple[int, ...],
    twice: float = 0.0,
) -> tuple[Rows, list[dict]]:
    """Feed the messages to ``proc`` in random batches and orders until the exchange is done;
    (rows by (side, row key), recommendations). ``twice``: the share of messages (the
    router's and the exchange's) that arrive a second time, at some later point."""
    sides = {settings.topic("user-inbox"): "user", settings.topic("item-inbox"): "item"}
    rows: Rows = {}
    recs: list[dict] = []
    rec_codec = Codec(RECOMMENDATION)
    eval_codec = Codec(EVALUATION)
    EVALUATIONS.clear()
    DLQ.clear()
    rng = random.Random(seed)
    pool = pool + [m for m in pool if rng.random() < twice]

    def local(side: str, key: bytes) -> Inbox[EntityState, EntityState] | None:
        if partition_for(split_row_key(key)[0], 4) not in owned:
            return None
        return rows.setdefault((side, key), proc.initial(side)(key))

    rounds = 0
    while pool:
        rounds += 1
        assert rounds < 10 * STREAM, "the exchange did not converge"
        rng.shuffle(pool)
        size = rng.randint(1, min(len(pool), 60))
        batch, pool = pool[:size], pool[size:]
        work = []
        for topic, key, value in batch:
            side = sides[topic]
            message = proc.inbox_codec.decode(value)
            epoch = epoch_of(message)
            rkey = row_key(key, epoch)
            if (side, rkey) not in rows:
                rows[(side, rkey)] = proc.initial(side)(rkey)
            work.append((side, epoch, rows[(side, rkey)], message))
        for topic, key, value, headers in proc.process(work, local):
            if topic in sides:
                pool.append((topic, key, value))
                if rng.random() < twice:
                    pool.append((topic, key, value))
            elif topic == settings.topic("recommendations"):
                recs.append(rec_codec.decode(value))
            elif topic == settings.topic("evaluations"):
                EVALUATIONS.append(eval_codec.decode(value))
            elif topic == settings.topic("interactions.dlq"):
                DLQ.append((proc.dlq_codec.decode(value), dict(headers or [])))
        # Rows survive the table round trip (what the changelog and RocksDB hold).
        for (side, rkey), box in list(rows.items()):
            rows[(side, rkey)] = proc.decoder(side)(rkey, proc.encode(rkey, box))
    for _topic, _key, value, _headers in proc.flush():
        EVALUATIONS.append(eval_codec.decode(value))
    return rows, recs


def _assert_rows_equal(rows: Rows, online: OnlineJodie, epoch: Epoch) -> int:
    """Every row of ``epoch`` equals the replay's state of its entity; how many there are."""
    n = 0
    for (side, rkey), box in rows.items():
        entity, row_epoch = split_row_key(rkey)
        if row_epoch != epoch:
            continue
        store = online.states.users if side == "user" else online.states.items
        row = store.row(entity.decode())
        assert row is not None and box.idle and box.state.embedding is not None
        np.testing.assert_allclose(box.state.embedding, store.emb[row].numpy(), atol=1e-5)
        n += 1
    return n


@pytest.mark.parametrize(("seed", "owned"), [(0, ()), (1, ()), (2, (0, 2)), (3, (0, 1, 2, 3))])
def test_batches_in_any_order_reproduce_the_sequential_replay(
    checkpoint: Path, seed: int, owned: tuple[int, ...]
) -> None:
    """``owned``: partitions (of 4) whose rows take pre-states in memory, as a worker owning
    them does; the others' go round through the inbox topics."""
    settings = Settings(topic_prefix="unit-", evaluate_every=1)
    stats = WorkerStats()
    proc = Processor(settings, Serving.load(settings, checkpoint), stats)
    rows, recs = _run(settings, proc, _router_messages(settings), seed, owned)
    assert sorted(r["event_id"] for r in recs) == sorted(
        f"e{k:06d}" for k in range(HISTORY, HISTORY + STREAM)
    )
    assert all(len(r["candidates"]) == settings.candidates for r in recs)
    # Every event is evaluated once, as the frozen protocol ranks it (batched model calls
    # may round differently from one-by-one ones; on these events they never flip a rank).
    assert sorted(e["event_id"] for e in EVALUATIONS) == sorted(r["event_id"] for r in recs)
    ckpt = load_checkpoint(checkpoint)
    log = load_interactions(bundled_wikipedia()).slice(HISTORY, HISTORY + STREAM)
    ranker = make_scorer(ckpt.config, ckpt.scorer_tensors)  # the default: history scorer
    offline, _ = frozen_replay(ckpt.model.eval(), ckpt.states, log, ranker)
    live = {e["seq"]: e["rank"] for e in EVALUATIONS}
    assert [live[s] for s in range(STREAM)] == offline.tolist()
    assert stats.user_events == stats.item_events == STREAM
    online = reference(checkpoint, range(HISTORY, HISTORY + STREAM))
    assert _assert_rows_equal(rows, online, UNSTAMPED) == len(rows)
    # What users were served: every event but each user's first here is measured, and the
    # reader of the topic counts the same from the records alone.
    users = {str(r["user_id"]) for r in recs}
    served = stats.served.summary()
    assert served["events"] == STREAM - len(users)
    by_user: dict[str, list[dict]] = {}
    for r in sorted(recs, key=lambda r: r["event_id"]):  # ids sort like the log
        by_user.setdefault(r["user_id"], []).append(r)
    hits = sum(
        later["item_id"] in [c["item_id"] for c in earlier["candidates"]]
        for events in by_user.values()
        for earlier, later in pairwise(events)
    )
    assert served["recall"] == hits / served["events"]
    assert summarise(recs, [])["served"]["recall"] == served["recall"]


@pytest.mark.parametrize(("seed", "owned"), [(6, ()), (7, (0, 2))])
def test_messages_that_arrive_twice_change_nothing(
    checkpoint: Path, seed: int, owned: tuple[int, ...]
) -> None:
    """What a worker reading its last batches again after a producer is replaced
    (streams.runtime.loop), or a router sending the latest events again after starting over
    (streams.router), delivers: a third of the router's messages and of the exchanged
    pre-states arrive twice, in any order. Each repeat is ignored: one recommendation per
    event, and the rows equal the sequential replay."""
    settings = Settings(topic_prefix="unit-", evaluate_every=1)
    stats = WorkerStats()
    proc = Processor(settings, Serving.load(settings, checkpoint), stats)
    rows, recs = _run(settings, proc, _router_messages(settings), seed, owned, twice=0.33)
    assert sorted(r["event_id"] for r in recs) == sorted(
        f"e{k:06d}" for k in range(HISTORY, HISTORY + STREAM)
    )
    assert stats.user_events == stats.item_events == STREAM
    online = reference(checkpoint, range(HISTORY, HISTORY + STREAM))
    assert _assert_rows_equal(rows, online, UNSTAMPED) == len(rows)


@pytest.mark.parametrize(("seed", "owned"), [(4, ()), (5, (1, 3))])
def test_a_switch_mid_stream_serves_each_epoch_with_its_own_weights(
    checkpoint: Path, tmp_path: Path, seed: int, owned: tuple[int, ...]
) -> None:
    """Events [0, K) stamped v1, [K, end) stamped v2, shuffled together: v1's rows end as
    v1's replay of [0, K), v2's rows as v2's replay of everything (its checkpoint caught up
    over [0, K), then the exchange), and each event has one recommendation, by its epoch."""
    k = 60
    v2_dir = make_checkpoint(tmp_path / "v2", version="v2", seed=7)
    first, second = ("v1", 0), ("v2", k)
    settings = Settings(topic_prefix="unit-", evaluate_every=1)
    proc = Processor(settings, None, WorkerStats())
    proc.add(Serving.of(settings, load_checkpoint(checkpoint), "v1", None, first))
    catch_up = CatchUp(load_checkpoint(v2_dir))
    log = load_interactions(bundled_wikipedia())
    for seq in range(k):
        row = HISTORY + seq
        catch_up.offer(
            LogEvent(
                seq, str(log.user_ids[row]), str(log.item_ids[row]), float(log.timestamps[row])
            )
        )
    assert catch_up.advance(k) == k
    proc.add(Serving.of(settings, catch_up.checkpoint(), "v2", None, second))

    pool = _router_messages(settings, lambda seq: first if seq < k else second)
    rows, recs = _run(settings, proc, pool, seed, owned)

    by_event = {r["event_id"]: r["model_version"] for r in recs}
    assert len(recs) == len(by_event) == STREAM
    assert {e["event_id"]: e["model_version"] for e in EVALUATIONS} == by_event
    assert by_event == {f"e{HISTORY + n:06d}": ("v1" if n < k else "v2") for n in range(STREAM)}
    v1 = reference(checkpoint, range(HISTORY, HISTORY + k))
    v2 = reference(v2_dir, range(HISTORY, HISTORY + STREAM))
    assert _assert_rows_equal(rows, v1, first) > 0
    assert _assert_rows_equal(rows, v2, second) > 0


def test_rows_of_another_model_version_are_refused(checkpoint: Path) -> None:
    settings = Settings(topic_prefix="unit-", evaluate_every=1)
    serving = Serving.load(settings, checkpoint)
    proc = Processor(settings, serving, WorkerStats())
    row = proc.encode(b"u1", proc.initial("user")(b"u1"))
    other = Processor(settings, Serving.load(settings, checkpoint, version="v2"), WorkerStats())
    assert proc.decoder("user")(b"u1", row).applied_seq == -1
    with pytest.raises(ModelMismatchError, match="computed by model"):
        other.decoder("user")(b"u1", row)


def test_poisoned_events_are_quarantined_and_the_rest_stays_exact(checkpoint: Path) -> None:
    """Events whose features the model cannot take (they got past a looser router) and one
    whose recommendation fails: each goes to the DLQ with its reason, gets no
    recommendation, and every state still equals the sequential replay (which quarantines
    the same events); nothing raises."""
    bad = {10: (1.0, 2.0, 3.0), 11: (float("nan"),), 90: (0.5,)}
    settings = Settings(topic_prefix="unit-", evaluate_every=1)
    stats = WorkerStats()
    serving = Serving.load(settings, checkpoint)
    real = serving.recommendations
    broken = f"e{HISTORY + 40:06d}"

    def recommendations(outs: list) -> list[dict]:
        if any(o.event.event_id == broken for o in outs):
            raise ValueError("index refused the query")
        return real(outs)

    serving.recommendations = recommendations  # type: ignore[method-assign]
    proc = Processor(settings, serving, stats)
    rows, recs = _run(settings, proc, _router_messages(settings, features=bad), 11, (0, 1))

    poisoned = {f"e{HISTORY + s:06d}" for s in bad}
    every = {f"e{k:06d}" for k in range(HISTORY, HISTORY + STREAM)}
    assert sorted(r["event_id"] for r in recs) == sorted(every - poisoned - {broken})
    reasons = {event["event_id"]: headers["detail"].decode() for event, headers in DLQ}
    assert set(reasons) == poisoned | {broken}
    assert all(h["reason"] == b"quarantined" for _e, h in DLQ)
    assert {reasons[e] for e in poisoned} == {"feature_length"}
    assert reasons[broken].startswith("exception ValueError while recommending")
    assert stats.quarantined == {"feature_length": 3, "exception": 1}
    # The replay of the same log quarantines the same events: equal states everywhere.
    ckpt = load_checkpoint(checkpoint)
    online = OnlineJodie(ckpt.model, ckpt.states)
    log = load_interactions(bundled_wikipedia())
    for s in range(STREAM):
        k = HISTORY + s
        feats = np.asarray(bad[s], dtype=np.float32) if s in bad else None
        online.observe(str(log.user_ids[k]), str(log.item_ids[k]), float(log.timestamps[k]), feats)
    assert _assert_rows_equal(rows, online, UNSTAMPED) == len(rows)


def test_a_stop_waits_for_the_ranks_of_all_its_servings_within_one_deadline(
    checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A graceful stop waits ``FINISH_TIMEOUT_S`` in all for ranks still on their way, not that
    long for each epoch served: a worker in the middle of a switch serves several, and must
    still stop within the time its supervisor gives it."""
    monkeypatch.setattr(processor_module, "FINISH_TIMEOUT_S", 0.2)
    waits: list[float] = []

    class Silent:
        """A ranking process that never answers: each wait lasts all it is given."""

        def finish(self, timeout_s: float) -> list:
            waits.append(timeout_s)
            time.sleep(timeout_s)
            return []

    settings = Settings(topic_prefix="unit-", evaluate_every=1)
    proc = Processor(settings, None, WorkerStats())
    ckpt = load_checkpoint(checkpoint)
    for epoch in [("v1", 0), ("v2", 10), ("v3", 20)]:
        serving = Serving.of(settings, ckpt, epoch[0], None, epoch)
        serving.live = Silent()  # type: ignore[assignment]
        proc.add(serving)
    assert proc.flush(last=True) == []
    # The first took the whole budget (less the moment since the stop began); none was left.
    assert 0.0 < waits[0] <= 0.2
    assert waits[1:] == [0.0, 0.0]

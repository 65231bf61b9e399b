"""The worker's logic in-process (no broker): batches of inbox messages in any order and size,
rows in a plain dict, give the sequential replay and one recommendation per event."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from operators.dataset import bundled_wikipedia, load_interactions
from operators.exchange import Inbox
from operators.sequencer import Interaction, Sequencer
from operators.streaming import EntityState
from schemas import Codec
from schemas.codec import INBOX_MESSAGE, RECOMMENDATION
from streams.kafka import partition_for
from streams.records import inbox_event
from streams.router import event_data_of
from streams.settings import Settings
from streams.worker import ModelMismatchError, Processor, Serving, WorkerStats
from tests.streams.harness import HISTORY, make_checkpoint, reference

STREAM = 150


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "v1")


def _router_messages(settings: Settings) -> list[tuple[str, bytes, bytes]]:
    """What the router writes to the two inboxes for rows [HISTORY, HISTORY + STREAM)."""
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
        for topic, side_key, prev, partner_prev in (
            (settings.topic("user-inbox"), data.user_id, e.prev_user_seq, e.prev_item_seq),
            (settings.topic("item-inbox"), data.item_id, e.prev_item_seq, e.prev_user_seq),
        ):
            body = {"event": inbox_event(e.seq, prev, partner_prev, data), "partner": None}
            out.append((topic, side_key.encode(), codec.encode(body)))
    return out


@pytest.mark.parametrize(("seed", "owned"), [(0, ()), (1, ()), (2, (0, 2)), (3, (0, 1, 2, 3))])
def test_batches_in_any_order_reproduce_the_sequential_replay(
    checkpoint: Path, seed: int, owned: tuple[int, ...]
) -> None:
    """``owned``: partitions (of 4) whose rows take pre-states in memory, as a worker owning
    them does; the others' go round through the inbox topics."""
    settings = Settings(topic_prefix="unit-")
    serving = Serving.load(settings, checkpoint)
    stats = WorkerStats()
    proc = Processor(settings, serving, stats)
    sides = {settings.topic("user-inbox"): "user", settings.topic("item-inbox"): "item"}
    rows: dict[tuple[str, bytes], Inbox[EntityState, EntityState]] = {}
    pool = _router_messages(settings)
    recs: list[dict] = []
    rec_codec = Codec(RECOMMENDATION)
    rng = random.Random(seed)

    def local(side: str, key: bytes) -> Inbox[EntityState, EntityState] | None:
        if partition_for(key, 4) not in owned:
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
            if (side, key) not in rows:
                rows[(side, key)] = proc.initial(side)(key)
            work.append((side, rows[(side, key)], value))
        for topic, key, value in proc.process(work, local):
            if topic in sides:
                pool.append((topic, key, value))
            elif topic == settings.topic("recommendations"):
                recs.append(rec_codec.decode(value))
        # Rows survive the table round trip (what the changelog and RocksDB hold).
        for (side, key), box in list(rows.items()):
            rows[(side, key)] = proc.decoder(side)(key, proc.encode(box))

    assert sorted(r["event_id"] for r in recs) == sorted(
        f"e{k:06d}" for k in range(HISTORY, HISTORY + STREAM)
    )
    assert all(r["rank"] >= 1 and len(r["candidates"]) == settings.candidates for r in recs)
    assert stats.user_events == stats.item_events == STREAM
    online = reference(checkpoint, range(HISTORY, HISTORY + STREAM))
    for (side, key), box in rows.items():
        store = online.states.users if side == "user" else online.states.items
        row = store.row(key.decode())
        assert row is not None and box.idle and box.state.embedding is not None
        np.testing.assert_allclose(box.state.embedding, store.emb[row].numpy(), atol=1e-5)


def test_rows_of_another_model_version_are_refused(checkpoint: Path) -> None:
    settings = Settings(topic_prefix="unit-")
    serving = Serving.load(settings, checkpoint)
    proc = Processor(settings, serving, WorkerStats())
    row = proc.encode(proc.initial("user")(b"u1"))
    other = Processor(settings, Serving.load(settings, checkpoint, version="v2"), WorkerStats())
    assert proc.decoder("user")(b"u1", row).applied_seq == -1
    with pytest.raises(ModelMismatchError, match="computed by model"):
        other.decoder("user")(b"u1", row)

"""The Faust worker: user and item agents over RocksDB tables, exchanging pre-states exactly.

Topics (all keyed, JODIE_PARTITIONS partitions, co-partitioned with the tables):

- ``user-inbox`` (key user): events for the user's owner (from the router) and item pre-states
  (from item owners). The ``users`` agent keeps each user's ``Inbox`` in ``user-state``;
- ``item-inbox`` (key item): the mirror image, ``items`` agent, ``item-state``;
- ``recommendations`` (key user) after every user update; ``item-vectors`` (key item) after every
  item update, read back by every worker into its candidate index.

Each agent reads its table row, hands the message to ``operators.exchange.Inbox`` with the
model side from ``operators.streaming``, writes the row and sends what the inbox returned.
``processing_guarantee="exactly_once"`` commits table changelogs, sends and input offsets in
Kafka transactions, so a crash at any moment replays to the same tables and outputs.

The checkpoint is the baseline: an entity without a table row starts from its checkpoint
state (or the model's initial state if the checkpoint never saw it), so a worker needs no
bulk load before serving.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faust
import numpy as np
import torch
from confluent_kafka import Consumer, TopicPartition

from operators.checkpoint import Checkpoint, load_checkpoint
from operators.exchange import Applied, Inbox, PartnerState, SendPreState
from operators.retrieval import TieredIndex
from operators.streaming import CheckpointStates, EntityState, StreamModel, UserOutput
from schemas import Codec
from schemas.codec import ENTITY_RECORD, INBOX_MESSAGE, RECOMMENDATION
from streams.records import (
    inbox_from_record,
    inbox_to_record,
    partner_message,
    partner_state,
    pending,
)
from streams.settings import Settings
from streams.topics import app_id

_log = logging.getLogger("jodie.worker")
NAN = float("nan")


def model_version(ckpt: Checkpoint) -> str:
    meta = ckpt.meta
    version = meta.get("version")
    if isinstance(version, str) and version:
        return version
    return f"sha-{meta['sha256']['model.safetensors'][:12]}"


@dataclass
class Serving:
    """What one worker process serves: weights, baseline states, the candidate index."""

    settings: Settings
    checkpoint: Checkpoint
    version: str
    stream: StreamModel
    baseline: CheckpointStates
    index: TieredIndex
    candidates: int
    counters: dict[str, int] = field(default_factory=lambda: {"users": 0, "items": 0})

    @classmethod
    def load(cls, settings: Settings, checkpoint_dir: Path) -> Serving:
        torch.set_num_threads(1)  # one event at a time: threads only add synchronisation
        ckpt = load_checkpoint(checkpoint_dir)
        cfg = ckpt.config
        dim = cfg.embedding_dim + cfg.item_static_dim
        baseline = CheckpointStates(ckpt)
        index = TieredIndex(dim)
        ids, vectors = baseline.item_vectors()
        if ids:
            index.upsert(ids, vectors)
        return cls(
            settings=settings,
            checkpoint=ckpt,
            version=model_version(ckpt),
            stream=StreamModel(ckpt.model, settings.horizon_s),
            baseline=baseline,
            index=index,
            candidates=settings.candidates,
        )

    def recommendation(self, out: UserOutput) -> dict[str, Any]:
        """Top candidates for the predicted item: nearest neighbours ∪ history, re-scored."""
        pred = out.predicted
        found, _ = self.index.search(pred[None, :], self.candidates)
        cand = list(
            dict.fromkeys([*found[0].tolist(), *[h for h in out.history if h in self.index]])
        )
        if cand:
            vectors = np.stack([self.index.vector(c) for c in cand]).astype(np.float32)
            scores = -((vectors - pred[None, :]) ** 2).sum(axis=1)
            order = np.argsort(-scores, kind="stable")[: self.candidates]
            ranked = [{"item_id": cand[k], "score": float(scores[k])} for k in order]
        else:
            ranked = []
        return {
            "user_id": out.event.user_id,
            "event_id": out.event.event_id,
            "timestamp": out.event.timestamp,
            "model_version": self.version,
            "projected_user": out.projected.tolist(),
            "predicted_item": pred.tolist(),
            "candidates": ranked,
            "state_change_probability": out.state_change_probability,
        }


def build_app(settings: Settings, worker_id: int, checkpoint_dir: Path) -> faust.App:
    """The Faust app of one worker process (its state directory and web port from the id)."""
    serving = Serving.load(settings, checkpoint_dir)
    datadir = settings.state_dir / f"worker-{worker_id}"
    datadir.parent.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        app_id(settings),
        broker=f"kafka://{settings.bootstrap_servers}",
        store="rocksdb://",
        processing_guarantee="exactly_once",
        topic_partitions=settings.partitions,
        topic_replication_factor=settings.replication_factor,
        datadir=str(datadir),
        web_bind="127.0.0.1",
        web_host="127.0.0.1",
        web_port=settings.web_port + worker_id,
        table_standby_replicas=0,
        broker_commit_interval=settings.commit_interval_s,
        consumer_auto_offset_reset="earliest",
        # Every value is Avro (or raw float32) framed by our codecs; Faust passes bytes through.
        key_serializer="raw",
        value_serializer="raw",
    )
    raw: dict[str, Any] = {
        "key_type": bytes,
        "value_type": bytes,
        "key_serializer": "raw",
        "value_serializer": "raw",
    }
    user_inbox = app.topic(settings.topic("user-inbox"), partitions=settings.partitions, **raw)
    item_inbox = app.topic(settings.topic("item-inbox"), partitions=settings.partitions, **raw)
    recommendations = app.topic(settings.topic("recommendations"), **raw)
    item_vectors = app.topic(settings.topic("item-vectors"), **raw)
    # Small block caches: the working set is one row per active entity.
    options = {"block_cache_size": 64 << 20, "block_cache_compressed_size": 16 << 20}
    tables: dict[str, Any] = {
        "partitions": settings.partitions,
        "options": options,
        "key_type": bytes,
        "value_type": bytes,
    }
    user_state = app.Table("user-state", **tables)
    item_state = app.Table("item-state", **tables)

    inbox_codec = Codec(INBOX_MESSAGE)
    record_codec = Codec(ENTITY_RECORD)
    rec_codec = Codec(RECOMMENDATION)
    user_apply = serving.stream.user_apply()
    item_apply = serving.stream.item_apply()

    def load(table: Any, key: bytes, side: str) -> Inbox[EntityState, EntityState]:
        stored = table.get(key)
        if stored is not None:
            return inbox_from_record(record_codec.decode(stored), side)
        entity = key.decode()
        start = serving.baseline.user(entity) if side == "user" else serving.baseline.item(entity)
        return Inbox(state=start)

    async def handle(side: str, key: bytes, value: bytes) -> None:
        table = user_state if side == "user" else item_state
        apply = user_apply if side == "user" else item_apply
        box = load(table, key, side)
        message = inbox_codec.decode(value)
        if message["event"] is not None:
            outs = box.on_event(pending(message["event"], side), apply)
        else:
            partner = message["partner"]
            outs = box.on_partner(PartnerState(int(partner["seq"]), partner_state(partner)), apply)
        table[key] = record_codec.encode(inbox_to_record(box, serving.version))
        other = item_inbox if side == "user" else user_inbox
        for out in outs:
            if isinstance(out, SendPreState):
                body = {"event": None, "partner": partner_message(out.seq, out.state)}
                await other.send(key=out.partner.encode(), value=inbox_codec.encode(body))
            elif isinstance(out, Applied) and side == "user":
                record = serving.recommendation(out.output)
                await recommendations.send(key=key, value=rec_codec.encode(record))
                serving.counters["users"] += 1
            elif isinstance(out, Applied):
                vector = out.output.vector.astype("<f4").tobytes()
                await item_vectors.send(key=key, value=vector)
                serving.index.upsert([key.decode()], out.output.vector[None, :])
                serving.counters["items"] += 1

    @app.agent(user_inbox)
    async def users(stream: Any) -> None:
        async for key, value in stream.items():
            await handle("user", key, value)

    @app.agent(item_inbox)
    async def items(stream: Any) -> None:
        async for key, value in stream.items():
            await handle("item", key, value)

    index_feed = _IndexFeed(settings, serving)

    @app.timer(interval=0.2)
    async def refresh_index() -> None:
        index_feed.poll()

    @app.page("/metrics")
    async def metrics(web: Any, request: Any) -> Any:
        return web.json(
            {
                "model_version": serving.version,
                **serving.counters,
                "items_indexed": len(serving.index),
            }
        )

    app.jodie_serving = serving  # type: ignore[attr-defined]
    return app


class _IndexFeed:
    """Keeps this worker's candidate index current from the compacted item-vectors topic."""

    def __init__(self, settings: Settings, serving: Serving) -> None:
        self.settings = settings
        self.serving = serving
        self.consumer: Consumer | None = None

    def poll(self) -> None:
        if self.consumer is None:
            self.consumer = Consumer(
                {
                    "bootstrap.servers": self.settings.bootstrap_servers,
                    "group.id": f"jodie-index-{uuid.uuid4().hex[:8]}",
                    "isolation.level": "read_committed",
                    "enable.auto.commit": False,
                    "auto.offset.reset": "earliest",
                    "logger": _log,
                }
            )
            topic = self.settings.topic("item-vectors")
            meta = self.consumer.list_topics(topic, timeout=10).topics[topic]
            self.consumer.assign([TopicPartition(topic, p, 0) for p in meta.partitions])
        began = time.monotonic()
        while time.monotonic() - began < 0.05:
            messages = self.consumer.consume(num_messages=1000, timeout=0)
            if not messages:
                return
            ids, vectors = [], []
            for msg in messages:
                if msg.error() is not None or msg.value() is None or msg.key() is None:
                    continue
                ids.append((msg.key() or b"").decode())
                vectors.append(np.frombuffer(msg.value() or b"", dtype="<f4"))
            if ids:
                latest = dict(zip(ids, vectors, strict=True))  # the last vector per item wins
                self.serving.index.upsert(list(latest), np.stack(list(latest.values())))


def run_worker(
    settings: Settings, worker_id: int, checkpoint_dir: Path, loglevel: str = "warn"
) -> None:
    """Run one worker until it is stopped (SIGTERM / Ctrl-C)."""
    app = build_app(settings, worker_id, checkpoint_dir)
    worker = faust.Worker(app, loglevel=loglevel, quiet=True)
    worker.execute_from_commandline()

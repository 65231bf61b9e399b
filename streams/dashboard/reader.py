"""The dashboard's Kafka side: a read_committed reader of the pipeline's topics, and a poller
of the consumer groups' lag (admin client) and of the workers' JSON metrics pages.

The reader joins no group (it assigns every partition itself and commits nothing), so it
never moves a partition away from a worker. It starts ``backfill`` messages before each
topic's end (the compacted ``models`` topic from its start), so a dashboard opened on a
running pipeline shows the recent past at once.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np
from confluent_kafka import (
    TIMESTAMP_NOT_AVAILABLE,
    ConsumerGroupTopicPartitions,
    IsolationLevel,
    KafkaException,
    Message,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, OffsetSpec

from schemas.codec import (
    EVALUATION,
    MODEL_ANNOUNCEMENT,
    RECOMMENDATION,
    SEQUENCED_INTERACTION,
    Codec,
)
from schemas.exceptions import SchemaError
from streams.app.processor import EPOCH_HEADER
from streams.codecs import make_codec
from streams.dashboard.board import Board
from streams.dashboard.exceptions import DashboardError
from streams.runtime.clients import admin, committed_reader
from streams.runtime.kafka import retry_transient, take, watermarks
from streams.settings import Settings
from streams.topics import router_group, workers_group

_log = logging.getLogger("jodie.dashboard")

#: The topics the dashboard reads, by their names without the prefix.
TOPICS = (
    "interactions.log",
    "recommendations",
    "evaluations",
    "models",
    "interactions.dlq",
    "item-vectors",
)

#: What a record of each topic can fail to decode with; such a record is counted, not fatal.
_UNREADABLE = (SchemaError, KeyError, ValueError, TypeError, UnicodeDecodeError)


def _headers(msg: Message) -> dict[str, str]:
    raw = msg.headers() or []
    pairs = raw.items() if isinstance(raw, dict) else raw
    return {
        name: value.decode(errors="replace") if isinstance(value, bytes) else str(value or "")
        for name, value in pairs
    }


def _stamp(msg: Message) -> float:
    """The time Kafka stamped the message with (epoch seconds); now if it has none."""
    kind, ms = msg.timestamp()
    return ms / 1000.0 if kind != TIMESTAMP_NOT_AVAILABLE and ms > 0 else time.time()


class Reader:
    """Reads the pipeline's topics into ``board`` (under ``lock``) in a daemon thread."""

    def __init__(self, settings: Settings, board: Board, lock: threading.Lock, backfill: int):
        self.settings, self.board, self.lock = settings, board, lock
        self.topics = {settings.topic(name): name for name in TOPICS}
        client = admin(settings)
        try:
            present = client.list_topics(timeout=10).topics
        except KafkaException as exc:
            raise DashboardError(
                f"no broker answers at {settings.bootstrap_servers} ({exc.args[0].str()}): start "
                "it with `jodie broker up`, or point JODIE_BOOTSTRAP at the pipeline's brokers"
            ) from exc
        missing = sorted(t for t in self.topics if t not in present)
        if missing:
            raise DashboardError(
                f"no topic {', '.join(missing)} on {settings.bootstrap_servers}: start the "
                "pipeline's topics with `jodie topics apply`, or set JODIE_TOPIC_PREFIX to the "
                f"pipeline's prefix (now {settings.topic_prefix!r})"
            )
        self.consumer = committed_reader(
            settings,
            group_id=f"jodie-dashboard-{uuid.uuid4().hex[:8]}",
            **{"enable.partition.eof": False},
        )
        assignment = []
        for topic, name in self.topics.items():
            partitions = sorted(present[topic].partitions)
            per_partition = math.ceil(backfill / max(1, len(partitions)))
            for p in partitions:
                low, high = watermarks(self.consumer, TopicPartition(topic, p))
                start = low if name == "models" else max(low, high - per_partition)
                assignment.append(TopicPartition(topic, p, start))
        self.consumer.assign(assignment)
        self._codecs: dict[str, Codec] = {
            "interactions.log": make_codec(
                settings, SEQUENCED_INTERACTION, settings.topic("interactions.log")
            ),
            "recommendations": Codec(RECOMMENDATION),
            "evaluations": Codec(EVALUATION),
            "models": make_codec(settings, MODEL_ANNOUNCEMENT, settings.topic("models")),
        }
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dashboard-reader", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.consumer.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                messages = take(self.consumer, 1000, 0.5)
            except KafkaException as exc:  # a broker away: keep trying, the page says so
                _log.warning("reading: %s", exc)
                time.sleep(1.0)
                continue
            decoded = [self._decode(m) for m in messages if m.error() is None]
            with self.lock:
                for apply in decoded:
                    apply(self.board)

    def _decode(self, msg: Message) -> Callable[[Board], None]:
        """What ``msg`` does to the board, decoded outside the lock."""
        name = self.topics.get(msg.topic() or "", "")
        t = _stamp(msg)
        value = msg.value() or b""
        try:
            if name == "interactions.dlq":
                h = _headers(msg)
                reason, detail, source = (
                    h.get("reason", ""),
                    h.get("detail", ""),
                    h.get("source", ""),
                )
                return lambda b: b.on_dlq(reason, detail, source, t)
            if name == "item-vectors":
                item = (msg.key() or b"").decode()
                vector = np.frombuffer(value, dtype="<f4").copy()
                label = _headers(msg).get(EPOCH_HEADER, "")
                version = "" if label in ("", "unstamped") else label.rpartition("@")[0]
                return lambda b: b.on_item_vector(item, vector, version)
            record = self._codecs[name].decode(value)
            if name == "interactions.log":
                return lambda b: b.on_log(record, t)
            if name == "recommendations":
                return lambda b: b.on_recommendation(record, t)
            if name == "evaluations":
                return lambda b: b.on_evaluation(record, t)
            key = (msg.key() or b"").decode()
            return lambda b: b.on_model(key, record, t)
        except _UNREADABLE:
            return lambda b: b.on_undecodable(name)


class Poller:
    """Every ``interval_s``: the lag of the router's and the workers' consumer groups, and
    the first ``workers`` workers' JSON metrics (``/metrics.json``, else ``/metrics`` if it
    is JSON), into ``board`` (under ``lock``)."""

    def __init__(
        self,
        settings: Settings,
        board: Board,
        lock: threading.Lock,
        workers: int = 0,
        interval_s: float = 1.0,
    ) -> None:
        self.settings, self.board, self.lock = settings, board, lock
        self.workers, self.interval_s = workers, interval_s
        self.admin = admin(settings)
        self.groups = {
            "router": (router_group(settings), [settings.topic("interactions")]),
            "workers": (
                workers_group(settings),
                [settings.topic("user-inbox"), settings.topic("item-inbox")],
            ),
        }
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dashboard-poller", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.is_set():
            began = time.time()
            lags: dict[str, int | None] = {}
            error = None
            for name, (group, topics) in self.groups.items():
                try:
                    lags[name] = group_lag(self.admin, group, topics)
                except (KafkaException, TimeoutError) as exc:  # a busy broker: next round
                    lags[name], error = None, f"{group}: {exc or 'no answer in time'}"
            pages = [worker_page(self.settings.web_port + n) for n in range(self.workers)]
            with self.lock:
                self.board.on_lag(began, lags, error)
                self.board.workers = pages
            self._stop.wait(max(0.0, self.interval_s - (time.time() - began)))


def group_lag(client: AdminClient, group: str, topics: list[str], timeout_s: float = 5.0) -> int:
    """Messages of ``topics`` that ``group`` has not committed yet: per partition, the last
    stable offset (read_committed) minus the group's committed offset, or minus the first
    offset where the group has committed none. A transaction's commit marker takes an offset,
    so a caught-up group may show one message per partition written transactionally."""
    metadata = client.list_topics(timeout=timeout_s).topics
    partitions = [
        TopicPartition(t, p) for t in topics if t in metadata for p in metadata[t].partitions
    ]
    if not partitions:
        return 0
    request = [ConsumerGroupTopicPartitions(group, partitions)]

    def ask() -> list[TopicPartition]:
        answer = client.list_consumer_group_offsets(request, request_timeout=timeout_s)[group]
        return list(answer.result(timeout_s).topic_partitions or [])

    # A broker that just started answers COORDINATOR_LOAD_IN_PROGRESS while it loads the
    # group coordinator: asked again, it answers.
    committed = {(tp.topic, tp.partition): tp.offset for tp in retry_transient(ask, timeout_s)}

    def offsets(spec: OffsetSpec) -> dict[tuple[str, int], int]:
        futures = client.list_offsets(
            {tp: spec for tp in partitions},
            isolation_level=IsolationLevel.READ_COMMITTED,
            request_timeout=timeout_s,
        )
        return {(tp.topic, tp.partition): f.result(timeout_s).offset for tp, f in futures.items()}

    ends = offsets(OffsetSpec.latest())
    starts = offsets(OffsetSpec.earliest()) if any(o < 0 for o in committed.values()) else {}
    lag = 0
    for key, end in ends.items():
        done = committed.get(key, -1)
        lag += max(0, end - (done if done >= 0 else starts.get(key, 0)))
    return lag


def worker_page(port: int, timeout_s: float = 1.0) -> dict[str, Any]:
    """A worker's JSON metrics, summarised; ``answered`` False when neither path gave JSON."""
    for path in ("/metrics.json", "/metrics"):
        url = f"http://127.0.0.1:{port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as response:
                page = json.loads(response.read())
        except (OSError, ValueError):
            continue
        if isinstance(page, dict):
            online = page.get("online")
            online = online if isinstance(online, dict) else {}
            return {
                "port": port,
                "url": url,
                "answered": True,
                "events": _number(page.get("user_events")),
                "events_per_s": _number(page.get("events_per_s")),
                "lag": _number(page.get("lag")),
                "model_version": str(page.get("model_version") or ""),
                "mrr": _number(online.get("mrr")),
            }
    return {"port": port, "answered": False}


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None

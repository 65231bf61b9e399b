"""The streaming worker: the JODIE processor (streams.app) as an application on the runtime.

The runtime (streams.runtime.loop) gives exactly once: each batch's outputs (partner
pre-states to any partition, recommendations, item vectors), its table changes (to the
``user-state`` / ``item-state`` changelogs) and its input offsets commit in one Kafka
transaction, with one transactional producer per worker and the consumer group's metadata
(KIP-447). Any number of workers share the inbox partitions through one consumer group.

We do not use Faust's ``exactly_once``: faust-streaming 0.15 keeps one transactional
producer per *destination* partition, so a worker's sends to other partitions (every message of
the exchange) commit apart from the input offsets — two workers fail with "No transaction
producer found" and a killed worker re-emits recommendations.

Model versions (``--model NAME``, streams.versions): every event comes stamped with the epoch
that serves it. A worker serves each epoch with that version's weights, from its states at
the epoch's start (the checkpoint caught up over the log, prepared in the background as soon
as the promotion shows on ``models``), on table rows keyed by epoch; recommendations name the
version. Events of the previous epoch still in flight finish with the previous weights.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from operators.model.checkpoint import load_checkpoint
from operators.retrieval.cooccurrence import CooccurrenceCandidates
from schemas import INTERACTION, DecodeError, SchemaError
from streams.app.epochs import UNSTAMPED, Epoch, epoch_of, row_key, split_row_key
from streams.app.metrics import WorkerCollector
from streams.app.processor import Box, Message_, Output, Processor, WorkerStats
from streams.app.serving import Serving, model_version
from streams.codecs import make_codec
from streams.feeds import Feeds
from streams.interactive import Queries
from streams.retirement import Retirement
from streams.runtime.collector import CycleCollector
from streams.runtime.directory import advertise
from streams.runtime.http import Endpoint, json_route
from streams.runtime.kafka import partition_for
from streams.runtime.loop import Application, LoopConfig, Record, TransactionalLoop
from streams.runtime.metrics import AGE_BUCKETS, BatchHistogram, LoopMetrics, Metrics, ages_s
from streams.runtime.store import Table, TableMemory
from streams.settings import Settings
from streams.topics import app_id, changelog_topic, largest_record, workers_group
from streams.versions import Versions

_log = logging.getLogger("jodie.worker")

#: A decoded inbox message: side, partition, key, epoch, the message.
Decoded = tuple[str, int, bytes, Epoch, dict[str, Any]]


@dataclass
class Prepared:
    """A batch as ``Worker.prepare`` makes it: what ``process`` applies and what ``committed``
    notes once its transaction committed, which may be after the next batch was prepared
    (``JODIE_WORKER_OVERLAP``)."""

    messages: list[Decoded] = field(default_factory=list)
    #: DLQ records of the inbox messages that could not be read.
    rejected: list[Output] = field(default_factory=list)
    #: (side, partition) → the latest epoch start of a router event in the batch.
    routed: dict[tuple[str, int], int] = field(default_factory=dict)
    #: Kafka timestamps (ms) of the batch's pre-states.
    pre_state_stamps: list[int] = field(default_factory=list)


class Worker(Application[Prepared]):
    """One worker process: the processor, its two tables, its feeds and model versions."""

    def __init__(
        self,
        settings: Settings,
        worker_id: int,
        checkpoint_dir: Path | None = None,
        version: str | None = None,
        model: str | None = None,
        endpoint: tuple[str, int] | None = None,
        collector: CycleCollector | None = None,
    ) -> None:
        """Serve one checkpoint (``checkpoint_dir``: the unstamped stream of a router run
        without a model) or the promoted versions of registry model ``model``, each from
        the start of its epoch. ``endpoint``: the (host, port) where this worker answers
        HTTP, advertised to the group for interactive queries (streams.interactive).
        ``collector``: the process's cycle-collector schedule, whose full passes this worker
        runs between batches and whose cost it reports (a process of its own installs one;
        workers sharing a test's process keep CPython's schedule)."""
        if (checkpoint_dir is None) == (model is None):
            raise ValueError("give exactly one of checkpoint_dir and model")
        self.settings = settings
        self.worker_id = worker_id
        self.name = f"jodie-worker-{worker_id}"
        self.cooccurrence = (
            CooccurrenceCandidates(
                max_items=settings.cooccurrence_items, neighbour_cache=settings.cooccurrence_cache
            )
            if settings.cooccurrence
            else None
        )
        serving = None
        if checkpoint_dir is not None:
            ckpt = load_checkpoint(checkpoint_dir)
            serving = Serving.of(
                settings,
                ckpt,
                version or model_version(ckpt),
                self.cooccurrence,
                apart=settings.evaluate_apart,
            )
        self.stats = WorkerStats()
        # Quarantined events go to the DLQ framed as clients send them, ready to re-send.
        dlq_codec = make_codec(settings, INTERACTION, settings.topic("interactions"))
        self.processor = Processor(settings, serving, self.stats, dlq_codec)
        self.versions = Versions(
            settings, worker_id, model, self.processor, self.cooccurrence, self.stats
        )
        self._feeds: Feeds | None = None
        root = settings.state_dir / app_id(settings) / f"worker-{worker_id}"
        self.sides = {self.processor.user_inbox: "user", self.processor.item_inbox: "item"}
        self._tables: dict[str, Table[Box]] = {
            topic: Table(
                settings,
                f"{side}-state",
                changelog_topic(settings, f"{side}-state"),
                root,
                self.processor.decoder(side),
                self.processor.encode,
                self.processor.initial(side),
                cache_rows=settings.row_cache,
            )
            for topic, side in self.sides.items()
        }
        self.tables_by_side = {side: self._tables[topic] for topic, side in self.sides.items()}
        self.retirement = Retirement(
            self.processor,
            self.tables_by_side,
            self.stats,
            settings.retire_chunk,
            settings.retire_interval_s,
        )
        self._partitions: dict[str, int] = {}
        self._reported_events = 0
        row_limit = largest_record(settings, [t.changelog for t in self._tables.values()])
        self.loop = TransactionalLoop(
            settings,
            LoopConfig(
                name=f"worker {worker_id}",
                group_id=workers_group(settings),
                transactional_id=f"{app_id(settings)}-worker-{worker_id}",
                client_id=advertise(self.name, *(endpoint or (None, None))),
                batch=settings.worker_batch,
                first_batch=settings.worker_first_batch,
                poll_timeout_s=settings.commit_interval_s,
                session_timeout_ms=settings.worker_session_timeout_ms,
                transaction_timeout_ms=settings.worker_transaction_timeout_ms,
                # A row changes without input from its own inbox partition when a pre-state is
                # handed over in memory, so state without committed offsets is normal here;
                # and re-read inbox messages are ignored (each row's applied_seq), so offsets
                # that expired cost a re-read, not a double count.
                expired_offsets_are_gaps=False,
                # For the same reason, reading the last batches again after a producer is
                # replaced costs nothing but the reading, and heals a commit the broker
                # completed without all of its markers (streams.runtime.transactions).
                reread_batches=4,
                # A backlog read a partition's run after another leaves each event's first
                # side waiting for its second, rows rewritten batch after batch meanwhile:
                # read in the router's order instead (``order``), from short runs of each
                # partition (32 KiB, a few hundred messages, against 1 MiB by default) that
                # the lookahead can interleave.
                lookahead=settings.worker_lookahead,
                consumer=(
                    {"max.partition.fetch.bytes": 32 << 10} if settings.worker_lookahead else {}
                ),
                # A row holds the events waiting in it, so it can outgrow librdkafka's default
                # limit of 1,000,000 bytes: refused, its batch would fail at every attempt.
                # The changelogs take up to their declared limit (deploy/topics.toml).
                producer={} if row_limit is None else {"message.max.bytes": row_limit},
                recovery_timeout_s=settings.recovery_timeout_s,
                # Each batch's commit runs while the next one is processed. The idle duties
                # (``poll``: model versions, feeds, retirement) wait for it, up to this long.
                overlap=settings.worker_overlap,
                poll_interval_s=max(settings.commit_interval_s, 0.5),
            ),
            self,
            _log,
        )
        # Prometheus families of this worker alone (its own registry: /metrics).
        self.metrics = Metrics()
        self.loop_metrics = LoopMetrics(self.loop.stats, self.metrics.registry, "jodie")
        self.metrics.register(WorkerCollector(self.stats, lambda: self.processor.serving))
        # The exchange's hop: a pre-state waits for its sender's commit, then behind whatever
        # this worker's inbox partition holds before it (seconds behind a backlog of events).
        self.pre_state_age = BatchHistogram(
            "jodie_pre_state_age_seconds",
            "Seconds from another worker's send of a pre-state (its Kafka timestamp) to the "
            "commit of the batch here that took it.",
            AGE_BUCKETS,
        )
        self.metrics.register(self.pre_state_age)
        self.table_memory = TableMemory(self._tables.values())
        self.metrics.register(self.table_memory)
        self.collector = collector
        if collector is not None:
            self.metrics.register(collector)

    def run(self, max_seconds: float | None = None) -> WorkerStats:
        self.loop.run(max_seconds)
        return self.stats

    def stop(self) -> None:
        self.loop.stop()

    def snapshot(self) -> dict[str, Any]:
        """What /metrics.json serves and the worker logs."""
        snapshot = self.stats.snapshot(self.processor.serving, self.loop.stats)
        snapshot["heap"] = {**self.metrics.heap.summary(), "rocksdb": self.table_memory.summary()}
        if self.collector is not None:
            snapshot["gc"] = self.collector.summary()
        return snapshot

    # -- the application ----------------------------------------------------------------------
    @property
    def inputs(self) -> Sequence[str]:
        return list(self.sides)

    @property
    def outputs(self) -> Sequence[str]:
        p = self.processor
        return [p.recommendations, p.item_vectors, p.evaluations, p.dlq, *self.sides]

    @property
    def tables(self) -> Mapping[str, Table[Box]]:
        return self._tables

    def start(self, partitions: Mapping[str, int]) -> None:
        self._partitions = {self.sides[topic]: n for topic, n in partitions.items()}
        self._feeds = Feeds(self.settings, self.processor, self.cooccurrence)
        self.versions.start(self._feeds)

    def poll(self) -> None:
        self.versions.follow()
        if self._feeds is not None:
            self._feeds.poll(self.processor.applied_seq)
        self.retirement.step()
        if self.collector is not None:
            self.collector.poll()

    def flush(self) -> Iterable[Output]:
        return self.processor.flush()

    def finish(self) -> Iterable[Output]:
        return self.processor.flush(last=True)

    def prepare(self, records: list[Record]) -> Prepared:
        batch = Prepared()
        decoded, routed = batch.messages, batch.routed
        for topic, p, offset, key, value, stamp in records:
            try:
                if key is None or value is None:
                    raise DecodeError("an inbox message without a key or a value")
                message = self.processor.read(value)
                epoch = epoch_of(message)
            except (DecodeError, SchemaError, KeyError, TypeError, ValueError) as exc:
                # Only the router and workers write the inboxes (the ACLs of a secure
                # cluster say so); whatever else lands there is set aside, not fatal.
                batch.rejected.append(self._unreadable(topic, p, offset, key, value, exc))
                continue
            if self.retirement.cleared(self.sides[topic], p, epoch):
                # Read again after its epoch's rows here were deleted: preparing the epoch
                # anew would apply the event a second time, from the epoch's start.
                self.stats.cleared += 1
                continue
            if message["event"] is None and stamp >= 0:
                batch.pre_state_stamps.append(stamp)
            # Preparing an epoch may wait for its catch-up: the runtime calls this before the
            # transaction opens, so the wait never counts against the transaction timeout.
            if self.versions.serves(epoch):
                decoded.append((self.sides[topic], p, key, epoch, message))
                if message["event"] is not None and epoch != UNSTAMPED:  # router's, in order
                    at = (self.sides[topic], p)
                    routed[at] = max(epoch[1], routed.get(at, epoch[1]))
        return batch

    def process(self, batch: Prepared) -> Iterable[Output]:
        sent: list[Output] = list(batch.rejected)
        work: list[Message_] = []
        for side, p, key, epoch, message in batch.messages:
            table, rkey = self.tables_by_side[side], row_key(key, epoch)
            work.append((side, epoch, table.get(p, rkey), message))
            table.touch(p, rkey)
        sent += self.processor.process(work, self._local)
        self.stats.messages += len(work)
        return sent

    def _unreadable(
        self,
        topic: str,
        p: int,
        offset: int,
        key: bytes | None,
        value: bytes | None,
        exc: Exception,
    ) -> Output:
        """The DLQ record of an inbox message this worker cannot read (original bytes)."""
        kind = "unreadable_inbox"
        self.stats.quarantined[kind] = self.stats.quarantined.get(kind, 0) + 1
        _log.warning("worker %d: %s/%d/%d unreadable: %s", self.worker_id, topic, p, offset, exc)
        headers: list[tuple[str, str | bytes | None]] = [
            ("reason", kind.encode()),
            ("detail", str(exc)[:500].encode()),
            ("source", f"{topic}/{p}/{offset}".encode()),
        ]
        return (self.processor.dlq, key or b"", value or b"", headers)

    def order(self, record: Record) -> int | None:
        return None if record.value is None else self.processor.order(record.value)

    def committed(self, batch: Prepared, records: list[Record], seconds: float) -> None:
        self.loop_metrics.observe(records, seconds)
        if batch.pre_state_stamps:
            ages = ages_s(batch.pre_state_stamps)
            self.pre_state_age.observe(ages)
            self.stats.pre_states += len(ages)
            self.stats.pre_state_ages.extend(ages)
        self.retirement.routed_in(batch.routed)

    def report(self, interval_s: float) -> None:
        self.stats.rate = (self.stats.user_events - self._reported_events) / interval_s
        self._reported_events = self.stats.user_events
        _log.info("worker %d %s", self.worker_id, json.dumps(self.snapshot()))

    def close(self) -> None:
        _log.info("worker %d stopped %s", self.worker_id, json.dumps(self.snapshot()))
        if self._feeds is not None:
            self._feeds.close()
        self.versions.close()
        self.processor.close()

    def partition_of(self, side: str, entity: str) -> int | None:
        """The inbox (and table) partition of a user or item; None before the start."""
        n = self._partitions.get(side)
        return None if n is None else partition_for(entity.encode(), n)

    def _local(self, side: str, key: bytes) -> Box | None:
        """The row of an entity whose partition this worker owns now (marked changed)."""
        table = self.tables_by_side[side]
        entity, _epoch = split_row_key(key)
        p = partition_for(entity, self._partitions[side])
        if p not in table.partitions:
            return None
        table.touch(p, key)
        return table.get(p, key)


def run_worker(
    settings: Settings,
    worker_id: int,
    checkpoint_dir: Path | None,
    loglevel: str = "warn",
    version: str | None = None,
    model: str | None = None,
) -> None:
    """Run one worker until it is stopped (SIGTERM / Ctrl-C); on port web_port + id, /metrics
    (Prometheus text format), /metrics.json (the snapshot) and the interactive queries
    (streams.interactive)."""
    logging.basicConfig(
        level=getattr(logging, loglevel.upper(), logging.WARNING),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # The endpoint's thread shares the GIL with the processing loop: when it wants it back
    # (a query arrived), the loop's thread holds it up to the switch interval. 1 ms instead
    # of CPython's 5 halved the p99 of direct queries at 20 queries/s and 500 events/s
    # (benchmarks/query_latency.py: 349 → 125 ms, 348 → 150 ms), the stream unchanged.
    sys.setswitchinterval(0.001)
    http = Endpoint(max_queue=settings.query_queue, max_wait_s=settings.query_max_wait_s)
    served = http.serve(settings.web_port + worker_id)
    endpoint = (http.host or "", http.port or 0) if served else None
    # The schedule is the process's (gc thresholds are global): installed here, where one
    # worker owns the process, and given back when it stops.
    collector = CycleCollector(settings.gc_full_every_s)
    worker = Worker(settings, worker_id, checkpoint_dir, version, model, endpoint, collector)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: worker.stop())
    http.route("/metrics", worker.metrics.exposition)
    http.route("/metrics.json", json_route(worker.snapshot))
    Queries(worker).register(http)
    # What start-up loaded (the checkpoint, the libraries) lives as long as the process.
    collector.freeze()
    try:
        worker.run()
    finally:
        http.close()
        collector.close()

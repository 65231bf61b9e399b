"""The worker's logic without Kafka: inbox messages in, outputs and table changes out.

Topics (keyed; the inboxes, tables and recommendations have JODIE_PARTITIONS partitions each,
table partition p pairing with inbox partition p; ``item-vectors`` and ``evaluations``, read
whole, have JODIE_WHOLE_PARTITIONS):

- ``user-inbox`` (key user): events for the user's owner (from the router) and items'
  pre-states (from item owners); the user side keeps each user's ``Inbox`` in ``user-state``;
- ``item-inbox`` (key item): the mirror image, ``item-state``;
- ``recommendations`` (key user) after every user update; ``item-vectors`` (key item, with the
  event's seq in a header) after every item update, read back by every worker into its
  candidate index and its live evaluation;
- ``evaluations`` (key user): each user event's rank, once every item's state at the event is
  known here (operators.evaluation.live) — in the transaction of a later batch, or of its own
  when the worker is idle (``flush``);
- ``interactions.dlq`` (key user): each event this worker quarantined (its Avro Interaction,
  as a client would re-send it, the reason in headers). A quarantined event changes no
  embedding and gets no recommendation (operators.model.kernel); the user's owner records it
  (both sides quarantine the same events), and a side that quarantines an event because
  applying it raised records it itself. Recommending is guarded the same way: an event whose
  recommendation cannot be made keeps its (exact) states and goes to the DLQ instead.

The checkpoint is the baseline: an entity without a table row starts from its checkpoint
state (or the model's initial state if the checkpoint never saw it), so a worker needs no bulk
load before serving. Rows are keyed by epoch (streams.app.epochs); each epoch is served by its
own ``Serving``, and recommendations name its version.
"""

from __future__ import annotations

import logging
import struct
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from operators.evaluation.live import Query
from operators.evaluation.metrics import RollingRanks
from operators.evaluation.served import ServedTally
from operators.protocol.exchange import (
    Applied,
    ApplyMany,
    DerivedStates,
    Inbox,
    PartnerState,
    SendPreState,
    drive,
)
from operators.protocol.sides import (
    EntityState,
    EventData,
    ItemOutput,
    UserOutput,
    unpack_features,
)
from schemas import Codec, wire
from schemas.codec import ENTITY_RECORD, EVALUATION, INBOX_MESSAGE, INTERACTION, RECOMMENDATION
from streams.app.epochs import UNSTAMPED, Epoch, label, row_key, split_row_key
from streams.app.serving import Recommendation, Serving, f4_bytes
from streams.exceptions import ModelMismatchError
from streams.records import (
    WaitingBytes,
    inbox_from_record,
    inbox_row_bytes,
    inbox_to_record,
    partner_message,
    partner_state,
    pending,
)
from streams.settings import Settings

Box = Inbox[EntityState, EntityState]
_log = logging.getLogger("jodie.worker")


class LoopCounters(Protocol):
    """The runtime loop's counters that /metrics shows (streams.runtime.loop.LoopStats)."""

    @property
    def started(self) -> float: ...
    @property
    def transactions(self) -> int: ...
    @property
    def restored(self) -> int: ...
    @property
    def changelog(self) -> int: ...
    @property
    def changelog_bytes(self) -> int: ...
    @property
    def largest_row(self) -> int: ...
    @property
    def held(self) -> int: ...
    @property
    def lag(self) -> int: ...
    @property
    def app_s(self) -> float: ...
    @property
    def send_s(self) -> float: ...
    @property
    def commit_s(self) -> float: ...
    @property
    def wait_s(self) -> float: ...


@dataclass
class WorkerStats:
    """Counters of the processing the worker logs and serves on /metrics (the loop's own
    counters come with them, from the runtime)."""

    user_events: int = 0
    item_events: int = 0
    messages: int = 0
    ranks: RollingRanks = field(default_factory=RollingRanks)
    rate: float = 0.0  # user events/s over the last report interval
    unstamped: int = 0  # inbox messages of events routed before any version was promoted
    cleared: int = 0  # inbox messages read again for an epoch whose rows were deleted here
    quarantined: dict[str, int] = field(default_factory=dict)  # events, by reason
    served: ServedTally = field(default_factory=ServedTally)  # what users were served
    epochs: list[dict[str, Any]] = field(default_factory=list)  # each epoch served, prepared
    pre_states: int = 0  # pre-states taken from other workers (through Kafka)
    # Seconds from the send of each of the latest pre-states to the commit that took it here.
    pre_state_ages: deque[float] = field(default_factory=lambda: deque(maxlen=10_000))

    def snapshot(self, serving: Serving | None, loop: LoopCounters) -> dict[str, Any]:
        return {
            "model_version": serving.version if serving is not None else None,
            "epochs": self.epochs,
            "unstamped_skipped": self.unstamped,
            "cleared_skipped": self.cleared,
            "quarantined": dict(self.quarantined),
            "uptime_s": round(time.time() - loop.started, 1),
            "user_events": self.user_events,
            "item_events": self.item_events,
            "messages": self.messages,
            "transactions": loop.transactions,
            # Where the committed batches' time went (streams.runtime.loop.LoopStats).
            "batch_phase_s": {
                "app": round(loop.app_s, 3),
                "send": round(loop.send_s, 3),
                "commit": round(loop.commit_s, 3),
                "wait": round(loop.wait_s, 3),
            },
            "restored_records": loop.restored,
            "changelog_records": loop.changelog,
            "changelog_bytes": loop.changelog_bytes,
            "largest_row_bytes": loop.largest_row,
            "input_records_held": loop.held,
            "events_per_s": round(self.rate, 1),
            "lag": loop.lag,
            "items_indexed": len(serving.index) if serving is not None else 0,
            "online": self.ranks.summary(),
            "served": self.served.summary(),
            "pre_states": {"taken": self.pre_states, **_ages_ms(self.pre_state_ages)},
            "evaluation": (
                {
                    "watermark": serving.live.watermark,
                    "pending": serving.live.pending(),
                    "unranked": serving.live.unranked,
                }
                if serving is not None
                else {}
            ),
        }


def _ages_ms(ages: deque[float]) -> dict[str, float | None]:
    """p50, p99 and max of ``ages`` in milliseconds (None before any)."""
    if not ages:
        return {"age_ms_p50": None, "age_ms_p99": None, "age_ms_max": None}
    p50, p99, top = np.percentile(np.fromiter(ages, float, len(ages)), [50, 99, 100]) * 1000.0
    return {"age_ms_p50": round(p50, 1), "age_ms_p99": round(p99, 1), "age_ms_max": round(top, 1)}


Headers = list[tuple[str, str | bytes | None]]
Output = tuple[str, bytes, bytes, Headers | None]  # topic, key, value, headers (the runtime's)
Local = Callable[[str, bytes], "Box | None"]  # (side, row key) → the row, if owned here
Message_ = tuple[str, Epoch, Box, dict[str, Any]]  # side, epoch, its row, the decoded message
#: Seconds a graceful stop waits, in all, for the ranks of its servings' live evaluations
#: still on their way (within the 30 s a supervisor gives a worker to stop,
#: ``streams.children``, however many epochs it serves).
FINISH_TIMEOUT_S = 10.0
#: Header of item-vectors records: the epoch whose weights computed the vector.
EPOCH_HEADER = "jodie-epoch"
#: Header of item-vectors records: the seq of the event after which the item has the vector.
SEQ_HEADER = "jodie-seq"
#: Headers of item-vectors records: the item's event count, decayed count and time after the
#: event (the ranker's popularity terms, exact: the decayed count as repr of a float64).
STATS_HEADERS = ("jodie-count", "jodie-trend", "jodie-time")
#: Last header of item-vectors records: the process that wrote them (a token of its own), so
#: that its feed can leave aside its own records, which it applied when it wrote them.
ORIGIN_HEADER = "jodie-origin"


class Processor:
    """The worker's logic without Kafka: inbox messages in, outputs and table changes out.

    ``process`` applies a batch of messages to their table rows and returns the messages to
    send; the caller owns rows and transactions. Unit-testable with in-memory tables. Each
    message belongs to an epoch (streams.app.epochs) and is handled by that epoch's
    ``Serving`` only, on rows keyed by that epoch.
    """

    def __init__(
        self,
        settings: Settings,
        serving: Serving | None,
        stats: WorkerStats,
        dlq_codec: Codec | None = None,
    ) -> None:
        """``dlq_codec``: how quarantined events are framed in the DLQ — as clients frame
        them (the worker passes the topic's codec, a registry's if configured); plain
        single-object Avro by default."""
        self.stats = stats
        self.user_inbox = settings.topic("user-inbox")
        self.item_inbox = settings.topic("item-inbox")
        self.recommendations = settings.topic("recommendations")
        self.evaluations = settings.topic("evaluations")
        self.item_vectors = settings.topic("item-vectors")
        self.origin: tuple[str, bytes] = (ORIGIN_HEADER, uuid.uuid4().hex[:16].encode())
        self.dlq = settings.topic("interactions.dlq")
        self.dlq_codec = dlq_codec or Codec(INTERACTION)
        self.inbox_codec = Codec(INBOX_MESSAGE)
        self.record_codec = Codec(ENTITY_RECORD)
        self.rec_codec = Codec(RECOMMENDATION)
        self.eval_codec = Codec(EVALUATION)
        # The direct reader and writer of schemas.wire, while they agree with the codecs.
        self._inbox_header = self.inbox_codec.header
        self._rec_writer = (
            wire.RecommendationWriter(self.rec_codec.header)
            if wire.same_as_recommendation_codec(self.rec_codec)
            else None
        )
        self._row_header = self.record_codec.header
        self._row_writer = (
            wire.EntityRecordWriter(self._row_header)
            if wire.same_as_entity_record_codec(self.record_codec)
            else None
        )
        self._waiting_bytes = WaitingBytes()
        self.applied_seq = -1  # the latest log position of a user event applied here
        self.servings: dict[Epoch, Serving] = {}
        self._many: dict[Epoch, tuple[ApplyMany[EntityState, EntityState], ...]] = {}
        # Per epoch and side: the partners' post-states this worker computed (a partner's
        # pre-state that need not wait for its owner's message).
        self._derived: dict[Epoch, dict[str, DerivedStates[EntityState]]] = {}
        self._derived_most = settings.derived_states
        if serving is not None:
            self.add(serving)

    def add(self, serving: Serving) -> None:
        """Serve ``serving.epoch`` from now on (its rows start from ``serving.baseline``)."""
        self.servings[serving.epoch] = serving
        self._many[serving.epoch] = (
            serving.stream.user_apply_many(),
            serving.stream.item_apply_many(),
        )
        self._derived[serving.epoch] = {
            side: DerivedStates(self._derived_most, usable=_not_quarantined)
            for side in ("user", "item")
        }

    def retire(self, epoch: Epoch) -> None:
        """Stop serving ``epoch``: no message of it can come any more (streams.retirement)."""
        serving = self.servings.pop(epoch, None)
        if serving is not None:
            serving.close()
        self._many.pop(epoch, None)
        self._derived.pop(epoch, None)

    @property
    def serving(self) -> Serving | None:
        """The latest epoch's serving (what /metrics reports)."""
        return self.servings[max(self.servings, key=lambda e: e[1])] if self.servings else None

    def read(self, value: bytes) -> dict[str, Any]:
        """An inbox message as ``inbox_codec`` decodes it (its DecodeError for a bad one)."""
        header = self._inbox_header
        if value[: len(header)] == header:
            message = wire.read_inbox_message(value, len(header), packed_features=True)
            if message is not None:
                return message
        return self.inbox_codec.decode(value)

    def order(self, value: bytes) -> int | None:
        """The seq of the event an inbox message carries: the order a backlog is best read in,
        each event's two sides together. None for a pre-state (it completes an event that
        waits: the sooner the better) and for what is not one of this schema's messages."""
        header = self._inbox_header
        if not value.startswith(header):
            return None
        return wire.inbox_event_seq(value, len(header))

    # Row codecs for the tables.
    def decoder(self, side: str) -> Callable[[bytes, bytes], Box]:
        def decode(key: bytes, raw: bytes) -> Box:
            record = None
            header = self._row_header
            if self._row_writer is not None and raw[: len(header)] == header:
                record = wire.read_entity_record(raw, len(header), packed_features=True)
            if record is None:  # rows of older schemas, or what only the Codec reads
                record = self.record_codec.decode(raw)
            _entity, epoch = split_row_key(key)
            serving = self.servings.get(epoch)
            if serving is None or record["model_version"] != serving.version:
                # New weights on states computed by other weights would be neither model.
                raise ModelMismatchError(
                    f"{side} row {key!r} was computed by model {record['model_version']}; this "
                    f"worker serves {sorted(s.version for s in self.servings.values())} for "
                    f"its epoch. Serve a new version by promoting it (jodie models promote)."
                )
            return inbox_from_record(record, side)

        return decode

    def encode(self, key: bytes, box: Box) -> bytes:
        version = self.servings[split_row_key(key)[1]].version
        if self._row_writer is not None:
            try:
                return inbox_row_bytes(self._row_writer, box, version, self._waiting_bytes)
            except (OverflowError, TypeError, ValueError, struct.error):
                pass  # what only fastavro writes exactly (or refuses): the Codec decides
        return self.record_codec.encode(inbox_to_record(box, version))

    def initial(self, side: str) -> Callable[[bytes], Box]:
        def start(key: bytes) -> Box:
            entity, epoch = split_row_key(key)
            base, name = self.servings[epoch].baseline, entity.decode()
            if side == "user":
                return Inbox(state=base.user(name), applied_seq=base.user_seq(name))
            return Inbox(state=base.item(name), applied_seq=base.item_seq(name))

        return start

    def process(self, messages: list[Message_], local: Local | None = None) -> list[Output]:
        """Apply a batch of (side, epoch, the row it is for, decoded message); the messages
        to send.

        Messages are offered to their rows first; then every row advances as far as it can,
        ready events of distinct entities applied together (operators.protocol.exchange.drive), so
        the model runs in batches while each entity still applies its events in order.
        ``local(side, row key)`` gives the row of an entity this worker owns (else None): a
        pre-state for it is handed over in memory and applied in the same transaction instead
        of a round trip through Kafka — the committed effect is the same.
        """
        by_epoch: dict[Epoch, list[tuple[str, Box, dict[str, Any]]]] = {}
        for side, epoch, box, message in messages:
            by_epoch.setdefault(epoch, []).append((side, box, message))
        sent: list[Output] = []
        for epoch, batch in sorted(by_epoch.items(), key=lambda kv: kv[0][1]):
            sent += self._process(self.servings[epoch], batch, local)
        return sent

    def _process(
        self,
        serving: Serving,
        messages: list[tuple[str, Box, dict[str, Any]]],
        local: Local | None,
    ) -> list[Output]:
        epoch = serving.epoch
        stamp = {"model_version": epoch[0], "model_since": epoch[1]}
        headers: Headers = [] if epoch == UNSTAMPED else [(EPOCH_HEADER, label(epoch).encode())]
        touched: dict[str, list[Box]] = {"user": [], "item": []}
        for side, box, message in messages:
            if message["event"] is not None:
                box.offer_event(pending(message["event"], side))
            else:
                partner = message["partner"]
                box.offer_partner(PartnerState(int(partner["seq"]), partner_state(partner)))
            touched[side].append(box)
        sent: list[Output] = []
        vectors: dict[str, np.ndarray] = {}
        item_stats: dict[str, tuple[float, float, float]] = {}
        user_outs: list[tuple[int, UserOutput]] = []  # (seq, output)
        user_many, item_many = self._many[epoch]
        many = {"user": user_many, "item": item_many}
        derived = self._derived[epoch]
        inbox = {"user": self.user_inbox, "item": self.item_inbox}
        count_h, trend_h, time_h = STATS_HEADERS
        while touched["user"] or touched["item"]:
            for side, other in (("item", "user"), ("user", "item")):
                boxes, touched[side] = touched[side], []
                for out in drive(boxes, many[side], derived[side]) if boxes else []:
                    if isinstance(out, SendPreState):
                        key = row_key(out.partner.encode(), epoch)
                        row = local(other, key) if local is not None else None
                        if row is None:
                            body = {"event": None, "partner": partner_message(out.seq, out.state)}
                            value = self.inbox_codec.encode({**body, **stamp})
                            sent.append((inbox[other], out.partner.encode(), value, None))
                        elif row.offer_partner(PartnerState(out.seq, out.state)):
                            touched[other].append(row)
                    elif isinstance(out, Applied) and side == "item":
                        item_out: ItemOutput = out.output
                        item_id = item_out.event.item_id
                        if item_out.quarantined is not None and _raised(item_out.quarantined):
                            # The user side applied it: only this side knows.
                            sent.append(
                                self.quarantine(
                                    out.seq, item_out.event, "item", item_out.quarantined
                                )
                            )
                        vectors[item_id] = item_out.vector
                        stats = (
                            float(item_out.events),
                            item_out.trend,
                            item_out.event.timestamp,
                        )
                        item_stats[item_id] = stats
                        serving.live.item_vector(out.seq, item_id, item_out.vector, stats)
                        self.stats.item_events += 1
                        sent.append(
                            (
                                self.item_vectors,
                                item_id.encode(),
                                f4_bytes(item_out.vector),
                                [
                                    *headers,
                                    (SEQ_HEADER, b"%d" % out.seq),
                                    (count_h, repr(item_out.events).encode()),
                                    (trend_h, repr(item_out.trend).encode()),
                                    (time_h, repr(stats[2]).encode()),
                                    self.origin,
                                ],
                            )
                        )
                    elif isinstance(out, Applied):
                        user_out: UserOutput = out.output
                        self.applied_seq = max(self.applied_seq, out.seq)
                        if user_out.quarantined is not None:
                            sent.append(
                                self.quarantine(
                                    out.seq, user_out.event, "user", user_out.quarantined
                                )
                            )
                            continue
                        user_outs.append((out.seq, user_out))
                        if serving.live.samples(out.seq):  # a query only for what is ranked
                            serving.live.add(_query(out.seq, user_out))
                if side == "item" and vectors:
                    # This worker's index sees its own items at once (before its users' next
                    # ranks); the others' come from item-vectors.
                    serving.upsert(
                        list(vectors),
                        np.stack(list(vectors.values())),
                        [item_stats[i] for i in vectors],
                    )
                    vectors.clear()
        sent += self._recommend(serving, user_outs)
        self.stats.user_events += len(user_outs)
        return sent

    def _recommend(self, serving: Serving, user_outs: list[tuple[int, UserOutput]]) -> list[Output]:
        """Where user-side outputs become recommendation records, with the evaluations that
        became possible."""
        return self._recommendations(serving, user_outs) + self._evaluate(serving)

    def _recommendations(
        self, serving: Serving, user_outs: list[tuple[int, UserOutput]]
    ) -> list[Output]:
        """Recommendation records; an output that cannot be made into one goes to the DLQ
        (found by retrying the batch one output at a time)."""
        try:
            records = serving.recommendations([out for _seq, out in user_outs])
        except Exception:  # any input-borne failure: narrowed below
            pass
        else:
            self._tally(serving, records)
            return [self._recommendation(r) for r in records]
        sent: list[Output] = []
        for seq, out in user_outs:
            try:
                records = serving.recommendations([out])
                self._tally(serving, records)
                sent += [self._recommendation(r) for r in records]
            except Exception as exc:  # this output is the poison one
                why = f"exception {type(exc).__name__} while recommending: {exc}"[:500]
                sent.append(self.quarantine(seq, out.event, "user", why))
        return sent

    def _tally(self, serving: Serving, records: list[Recommendation]) -> None:
        """Where each event's item stood in the list its user was served before it."""
        if not records:
            return
        tally = self.stats.served
        popular = serving.index.top(0, 2 * tally.k)  # by event count, as the heuristic serves
        for r in records:
            tally.event(r.user_id, r.item_id, r.ids, popular)

    def _recommendation(self, rec: Recommendation) -> Output:
        return (self.recommendations, rec.user_id.encode(), self._encode_rec(rec), None)

    def _encode_rec(self, rec: Recommendation) -> bytes:
        if self._rec_writer is not None:
            try:
                return self._rec_writer.record(
                    rec.user_id,
                    rec.event_id,
                    rec.item_id,
                    rec.timestamp,
                    rec.model_version,
                    rec.projected_user_f32,
                    rec.predicted_item_f32,
                    rec.ids,
                    rec.scores,
                    rec.state_change_probability,
                )
            except (OverflowError, struct.error, TypeError, AttributeError, ValueError):
                pass  # a value the direct writer does not take: the codec writes or refuses it
        return self.rec_codec.encode(rec.record())

    def quarantine(self, seq: int, event: EventData, side: str, why: str) -> Output:
        """The DLQ record of a quarantined event, counted by reason."""
        kind = why.split(" ", 1)[0].rstrip(":")
        self.stats.quarantined[kind] = self.stats.quarantined.get(kind, 0) + 1
        _log.warning("quarantined event %s (seq %d, %s side): %s", event.event_id, seq, side, why)
        value = self.dlq_codec.encode(
            {
                "event_id": event.event_id,
                "user_id": event.user_id,
                "item_id": event.item_id,
                "timestamp": event.timestamp,
                "features": unpack_features(event.features),
                "state_label": None,
            }
        )
        headers: Headers = [
            ("reason", b"quarantined"),
            ("detail", why.encode()),
            ("source", f"interactions.log/seq/{seq}/{side}".encode()),
        ]
        return (self.dlq, event.user_id.encode(), value, headers)

    def _evaluate(self, serving: Serving, wait_s: float | None = None) -> list[Output]:
        """The evaluations ranked so far; with ``wait_s`` (a stop), those still on their way
        are waited for up to that long first."""
        sent: list[Output] = []
        ranks = serving.live.ready() if wait_s is None else serving.live.finish(wait_s)
        for ranked in ranks:
            q = ranked.query
            self.stats.ranks.add(ranked.rank)
            record = {
                "event_id": q.event_id,
                "seq": q.seq,
                "user_id": q.user_id,
                "item_id": q.item_id,
                "model_version": serving.version,
                "rank": ranked.rank,
                "n_items": ranked.n_items,
            }
            sent.append(
                (self.evaluations, q.user_id.encode(), self.eval_codec.encode(record), None)
            )
        return sent

    def flush(self, last: bool = False) -> list[Output]:
        """Evaluations that item vectors read since the last batch made possible; ``last``
        (a graceful stop): also those still on their way (streams.app.evaluation), waited
        for up to ``FINISH_TIMEOUT_S`` in all: one deadline for every serving, so that a stop
        with several epochs served does not wait that long for each."""
        sent: list[Output] = []
        deadline = time.monotonic() + FINISH_TIMEOUT_S if last else None
        for epoch in sorted(self.servings, key=lambda e: e[1]):
            wait_s = None if deadline is None else max(0.0, deadline - time.monotonic())
            sent += self._evaluate(self.servings[epoch], wait_s)
        return sent

    def close(self) -> None:
        """Stop what the servings run beside the processing (streams.app.evaluation)."""
        for serving in self.servings.values():
            serving.close()


def _not_quarantined(output: UserOutput | ItemOutput) -> bool:
    """Whether an application's partner post-state may stand in for the partner's message:
    not when the event was quarantined (each side decides that on its own inputs)."""
    return output.quarantined is None


def _raised(why: str) -> bool:
    """A quarantine for an exception (side-specific), not the kernel's (both sides)."""
    return why.startswith("exception")


def _query(seq: int, out: UserOutput) -> Query:
    e = out.event
    return Query(
        seq,
        e.event_id,
        e.user_id,
        e.item_id,
        out.previous_item,
        out.pre_state,
        out.delta_user,
        e.timestamp,
        out.pre_history,
        out.pre_counts,
        out.pre_user.history_times,
        out.pre_user.habits,
        out.pre_user.events,
        out.pre_user.last_time,
    )

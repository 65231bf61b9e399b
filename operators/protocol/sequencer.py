"""The sequencer: merges client partitions into one canonical order with explicit per-entity links.

Why: an update of user u at event r needs item i's state just before r, and i lives on another
partition, maybe another worker. If every event names the previous event of its user and of
its item (``prev_user_seq``, ``prev_item_seq``), each side knows exactly which event comes next
for each entity, whatever order the messages arrive in: users and items then form one
consistent order (the sequence numbers), so no cycle can make two entities wait on each other,
and any partitioning computes what a sequential replay in sequence order computes.

The order is ``(timestamp, event_id)`` across the client partitions (a k-way merge): events of
one partition are taken in partition order, and a head is released only when every other
partition has a later head or is idle (caught up, see the streaming layer's grace period). An
event that fails ``validate`` (an empty, over-long or control-character id, a non-finite or
absurd timestamp, a non-finite or huge feature, a bad label, a feature length other than the
one already known) or lies too far in the future (see *Watermark*) is rejected when it is
offered, so it never takes part in the merge: a timestamp of ``inf`` would hold back its
partition until every other one drained, and ``nan`` keys compare inconsistently. An event
that arrives after a later event of the same user or item was sequenced is rejected as
``time_backwards``, and a re-sent event id as ``duplicate`` (both go to the DLQ: every refused
message is accounted for there, none is dropped silently). Rejections stay in line with
their partition's events, so an offset is committed only past what was handled. A rejected
event changes no state: it is as if it had never been sent.

Duplicates are found in bounded memory: the ids of the last ``dedup_window`` sequenced events
(``RecentIds``), and the id (a hash of it) of each user's and each item's latest event, which
the per-entity maps hold anyway. A re-send is therefore a ``duplicate`` when its first copy is
among the last ``dedup_window`` events or is still the latest event of its user or of its item.
An older re-send whose user or item has a later timestamp since is ``time_backwards``; only
when the latest events of both its user and its item since share its exact timestamp is it
sequenced a second time (a double count). The per-entity maps hold one entry per user and
item ever seen (every event must be linked to its entity's previous one): the caller may
pass maps that keep the cold entries out of memory (the router does).

Watermark: the largest timestamp of the events accepted so far, i.e. sequenced (restored from
the log after a restart) or valid and waiting in the merge. An event later than the watermark
plus ``Limits.max_clock_skew_s`` is rejected as ``future_timestamp``: accepted, it would make
every later event of its user and item ``time_backwards``, so one message could silence a
popular item. Events waiting in the merge count because one partition's buffer may run far
ahead of the others' in event time (a backlog read unevenly); rejected events never count.
Before the first accepted event there is no watermark: the event is bounded by ``clock() +
max_clock_skew_s`` when the sequencer has a clock (the router passes the wall clock), and
only by ``Limits.max_abs_timestamp`` otherwise. The watermark only moves by accepted events,
so a quiet period in event time longer than the skew makes the events after it rejected:
the skew must exceed the longest gap between consecutive events the stream may have.

>>> s = Sequencer(partitions=[0, 1], n_features=0)
>>> s.offer(0, Interaction("e1", "u", "i", 1.0, (), None), offset=0)
>>> s.offer(1, Interaction("e2", "v", "i", 2.0, (), None), offset=0)
>>> [(e.seq, e.prev_item_seq) for e in s.drain(idle={0, 1}).sequenced]
[(0, -1), (1, 0)]
"""

from __future__ import annotations

import heapq
import math
import re
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, Protocol

RejectReason = Literal[
    "malformed",
    "unknown_schema",
    "missing_id",
    "bad_id",
    "bad_timestamp",
    "future_timestamp",
    "bad_features",
    "feature_length",
    "bad_label",
    "time_backwards",
    "duplicate",
]


class Interaction(NamedTuple):
    """A decoded client event (the Avro Interaction record as a value object).

    A named tuple rather than a frozen dataclass: the router makes one per event, and a
    tuple is made in a fraction of the time.
    """

    event_id: str
    user_id: str
    item_id: str
    timestamp: float
    features: tuple[float, ...]
    state_label: int | None
    # The event's fields as the router writes them into its records (schemas.wire's
    # ``interaction_core``), when the message it came in held exactly those bytes: passed on
    # instead of encoded again. None: encode them.
    core: bytes | None = None

    @staticmethod
    def from_record(record: Mapping[str, Any]) -> Interaction:
        return Interaction(
            event_id=str(record["event_id"]),
            user_id=str(record["user_id"]),
            item_id=str(record["item_id"]),
            timestamp=float(record["timestamp"]),
            features=tuple(float(x) for x in record.get("features") or ()),
            state_label=record.get("state_label"),
        )


class SequencedEvent(NamedTuple):
    """An event in the canonical order, linked to its user's and item's previous events."""

    seq: int
    prev_user_seq: int  # -1 for the user's first event
    prev_item_seq: int  # -1 for the item's first event
    prev_user_time: float | None
    prev_item_time: float | None
    event: Interaction


@dataclass(frozen=True)
class Rejected:
    """An event that is not applied, with the reason (DLQ material)."""

    reason: RejectReason
    detail: str
    event_id: str | None
    partition: int
    offset: int


@dataclass
class DrainResult:
    sequenced: list[SequencedEvent] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        """Nothing sequenced and nothing rejected."""
        return not self.sequenced and not self.rejected

    @property
    def duplicates(self) -> int:
        """How many of the rejections are re-sent event ids."""
        return sum(r.reason == "duplicate" for r in self.rejected)


@dataclass(frozen=True)
class Limits:
    """Bounds on what an event may hold (the router takes them from its settings).

    ``max_id_length``: characters per id; ids are also table keys and Kafka keys.
    ``max_abs_timestamp``: seconds; past it an event is absurd whatever the stream (1e15 s is
    about 30 million years, and keeps every difference of two timestamps finite in float32).
    ``max_clock_skew_s``: how far past the watermark an event may be (see the module doc).
    ``max_feature_abs``: a larger feature saturates the RNN and swamps every other input.
    ``max_features``: the most features any event may have (or the known length, if larger),
    so that a huge array is refused unread and the first event cannot fix an absurd length.
    """

    max_id_length: int = 256
    max_abs_timestamp: float = 1e15
    max_clock_skew_s: float = 86_400.0
    max_feature_abs: float = 1e6
    max_features: int = 4096


# Unicode category Cc (C0, DEL, C1) and lone surrogates (Cs, which UTF-8 cannot encode): a NUL
# separates the entity from the epoch in table keys, and the others break logs and keys.
_BAD_ID_CHAR = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def _id_problem(field_name: str, value: str, limits: Limits) -> tuple[RejectReason, str] | None:
    if not value:
        return "missing_id", f"empty {field_name}"
    if len(value) > limits.max_id_length:  # checked first: the scan below is then bounded
        return (
            "bad_id",
            f"{field_name} has {len(value)} characters, more than {limits.max_id_length}",
        )
    bad = _BAD_ID_CHAR.search(value)
    if bad is not None:
        return "bad_id", f"{field_name} holds control character U+{ord(bad.group()):04X}"
    return None


def _features_within(features: tuple[float, ...], bound: float) -> bool:
    """True when every feature lies in [-bound, bound]; False may also mean "look closer".

    A Python step per feature took about a tenth of the router's CPU on events of 172
    features; these three passes run in C. Their sum is NaN when a feature is NaN, and NaN or
    infinite when one is infinite (or when large finite ones overflow: the exact pass then
    decides), and without NaN among them ``min`` and ``max`` are the true extremes.
    """
    total = sum(features)
    if total - total != 0.0:  # NaN or ±inf
        return False
    return -bound <= min(features) and max(features) <= bound


def validate(
    event: Interaction, n_features: int | None, limits: Limits = Limits()
) -> tuple[RejectReason, str] | None:
    """Why an event cannot be applied, or None when it is valid (order-free checks only).

    >>> validate(Interaction("e", "u\\x00", "i", 1.0, (), None), n_features=0)
    ('bad_id', 'user_id holds control character U+0000')
    """
    ids = event.event_id, event.user_id, event.item_id
    longest = limits.max_id_length
    # One scan of the three ids when they are fine (nearly always); field by field, to name
    # the first problem, when they are not.
    if not all(0 < len(v) <= longest for v in ids) or _BAD_ID_CHAR.search("".join(ids)):
        for field_name, value in zip(("event_id", "user_id", "item_id"), ids, strict=True):
            problem = _id_problem(field_name, value, limits)
            if problem is not None:
                return problem
    if not math.isfinite(event.timestamp):
        return "bad_timestamp", f"timestamp {event.timestamp} is not finite"
    if abs(event.timestamp) > limits.max_abs_timestamp:
        return (
            "bad_timestamp",
            f"timestamp {event.timestamp} is beyond ±{limits.max_abs_timestamp:g} s",
        )
    # A huge array is refused by its length alone, before any look at its values; below the
    # cap, bad values are named before a wrong count (the more specific reason).
    count = len(event.features)
    if count > max(limits.max_features, n_features or 0):
        if n_features is not None:
            return "feature_length", f"expected {n_features} features, got {count}"
        return "feature_length", f"{count} features, more than {limits.max_features}"
    bound = limits.max_feature_abs
    # NaN fails every comparison, so the exact pass also finds NaN and ±inf; it runs only
    # where the quick test (which nearly every valid event passes) did not clear them.
    if (
        count
        and not _features_within(event.features, bound)
        and not all(-bound <= x <= bound for x in event.features)
    ):
        if not all(math.isfinite(x) for x in event.features):
            return "bad_features", "a feature is NaN or infinite"
        return "bad_features", f"a feature is beyond ±{bound:g}"
    if n_features is not None and count != n_features:
        return "feature_length", f"expected {n_features} features, got {count}"
    if event.state_label not in (None, 0, 1):
        return "bad_label", f"state_label {event.state_label} is not 0, 1 or null"
    return None


class RecentIds:
    """The event ids of the last ``size`` sequenced events, oldest first.

    >>> r = RecentIds(size=2)
    >>> for e in ("a", "b", "c"):
    ...     r.add(e)
    >>> "a" in r, "c" in r, list(r)
    (False, True, ['b', 'c'])
    """

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"the duplicate window needs room for one id, got {size}")
        self.size = size
        self._ids: OrderedDict[str, None] = OrderedDict()

    def add(self, event_id: str) -> None:
        self._ids[event_id] = None
        if len(self._ids) > self.size:
            self._ids.popitem(last=False)

    def __contains__(self, event_id: object) -> bool:
        return event_id in self._ids

    def __iter__(self) -> Iterator[str]:
        return iter(self._ids)

    def __len__(self) -> int:
        return len(self._ids)


#: An entity's latest event: its seq, its timestamp and the hash of its id (``_id_hash``).
Last = tuple[int, float, int]


class EntityMap(Protocol):
    """Where the sequencer keeps each entity's latest event: a dict by default; any map with
    ``get`` and item assignment (e.g. one that keeps the cold entries on disk)."""

    def get(self, key: str, /) -> Last | None: ...
    def __setitem__(self, key: str, value: Last, /) -> None: ...


def _id_hash(event_id: str) -> int:
    # Python's string hash: 64 bits, cached on the string, and stable within the process,
    # which is all it needs (the state is rebuilt from the log at every start). Two different
    # ids collide with probability ~2⁻⁶⁴, and only a collision with the same timestamp counts.
    return hash(event_id)


class Sequencer:
    """Merge-orders events from client partitions, validates, links and numbers them.

    State (``next_seq``, each entity's latest event, the ids of the last ``dedup_window``
    events) is rebuilt from the canonical log with ``restore`` after a restart, so the
    sequencer keeps no state of its own outside Kafka.
    """

    def __init__(
        self,
        partitions: Iterable[int],
        n_features: int | None,
        limits: Limits = Limits(),
        clock: Callable[[], float] | None = None,
        dedup_window: int = 100_000,
        last_user: EntityMap | None = None,
        last_item: EntityMap | None = None,
    ) -> None:
        """``clock``: seconds since the epoch, to bound the first event; ``dedup_window``:
        how many of the latest event ids the duplicate check holds (module doc);
        ``last_user`` / ``last_item``: empty maps to keep the entities' latest events in
        (default: dicts)."""
        self.partitions = sorted(set(partitions))
        self.n_features = n_features
        self.limits = limits
        self.clock = clock
        self.watermark: float | None = None  # the largest timestamp accepted (module doc)
        self.next_seq = 0
        self.last_user: EntityMap = {} if last_user is None else last_user
        self.last_item: EntityMap = {} if last_item is None else last_item
        self.seen = RecentIds(dedup_window)
        # Per partition, in partition order: valid events, and rejections found on arrival
        # (decoding or validation; kept in line so offsets are committed only past what was
        # handled).
        self._buffers: dict[int, deque[tuple[int, Interaction | Rejected]]] = {
            p: deque() for p in self.partitions
        }

    # --- input ---------------------------------------------------------------------------
    def offer(self, partition: int, event: Interaction, offset: int) -> None:
        """Queue a decoded event read from ``partition`` at ``offset`` (in partition order).

        An event that fails ``validate`` (with the feature length checked only once it is
        known) is queued as rejected, like ``offer_rejected``: it is passed on when it reaches
        the head of its partition and never enters the merge. The checks that depend on the
        order (time going backwards, duplicates, the length fixed by the first event) are
        made when the event leaves the merge.
        """
        problem = validate(event, self.n_features, self.limits) or self._future_problem(event)
        if problem is not None:
            reason, detail = problem
            self.offer_rejected(Rejected(reason, detail, event.event_id, partition, offset))
            return
        self._raise_watermark(event.timestamp)
        self._buffers[partition].append((offset, event))

    def horizon(self) -> float | None:
        """The latest timestamp an event offered now may have (None: only the absolute bound)."""
        if self.watermark is not None:
            return self.watermark + self.limits.max_clock_skew_s
        if self.clock is not None:
            return self.clock() + self.limits.max_clock_skew_s
        return None

    def _future_problem(self, event: Interaction) -> tuple[RejectReason, str] | None:
        horizon = self.horizon()
        if horizon is None or event.timestamp <= horizon:
            return None
        basis = "the watermark" if self.watermark is not None else "the clock"
        return (
            "future_timestamp",
            f"timestamp {event.timestamp} is past {horizon} ({basis} "
            f"+ {self.limits.max_clock_skew_s:g} s)",
        )

    def _raise_watermark(self, timestamp: float) -> None:
        if self.watermark is None or timestamp > self.watermark:
            self.watermark = timestamp

    def offer_rejected(self, rejected: Rejected) -> None:
        """Queue an event that failed before it could be merged (malformed bytes, unknown
        schema, or ``validate`` through ``offer``)."""
        self._buffers[rejected.partition].append((rejected.offset, rejected))

    def buffered(self) -> int:
        return sum(len(b) for b in self._buffers.values())

    def committable(self, next_offsets: Mapping[int, int]) -> dict[int, int]:
        """Per partition, the offset to commit: the first one still buffered, else the next."""
        out = dict(next_offsets)
        for p, buf in self._buffers.items():
            if buf:
                out[p] = buf[0][0]
        return out

    def restore(self, events: Iterable[SequencedEvent]) -> None:
        """Rebuild the state from already-sequenced events (any order), streamed: besides the
        per-entity maps it holds only the ``dedup_window`` latest ids."""
        latest: list[tuple[int, str]] = []  # (seq, id), a min-heap of the largest seqs
        size = self.seen.size
        for e in events:
            self._record(e)
            if len(latest) < size:
                heapq.heappush(latest, (e.seq, e.event.event_id))
            elif e.seq > latest[0][0]:
                heapq.heapreplace(latest, (e.seq, e.event.event_id))
        for _seq, event_id in sorted(latest):
            self.seen.add(event_id)

    # --- output --------------------------------------------------------------------------
    def drain(self, idle: set[int]) -> DrainResult:
        """Release every event that is next in the canonical order.

        ``idle``: partitions known to have nothing more right now (caught up past the grace
        period). A partition with an empty buffer that is not idle holds the merge back,
        because an earlier event may still arrive on it.
        """
        result = DrainResult()
        # Heads as (timestamp, event_id, partition): compared in C, and the partition makes
        # every key distinct (one head per partition), so nothing past it is compared.
        heap: list[tuple[float, str, int]] = []
        for p in self.partitions:
            head = self._head(p, result)
            if head is not None:
                heap.append((head.timestamp, head.event_id, p))
        heapq.heapify(heap)
        buffers = self._buffers
        # Only the partition whose head was just taken can have emptied since this check.
        if any(not buffers[p] and p not in idle for p in self.partitions):
            return result
        while heap:
            _t, _id, p = heapq.heappop(heap)
            offset, event = buffers[p].popleft()
            self._sequence(event, p, offset, result)  # type: ignore[arg-type]
            following = self._head(p, result)
            if following is not None:
                heapq.heappush(heap, (following.timestamp, following.event_id, p))
            elif p not in idle:
                break
        return result

    def _head(self, partition: int, result: DrainResult) -> Interaction | None:
        """The partition's next event, after passing on rejections queued before it."""
        buf = self._buffers[partition]
        while buf and isinstance(buf[0][1], Rejected):
            result.rejected.append(buf.popleft()[1])  # type: ignore[arg-type]
        if not buf:
            return None
        event = buf[0][1]
        assert isinstance(event, Interaction)
        return event

    def _sequence(
        self, event: Interaction, partition: int, offset: int, result: DrainResult
    ) -> None:
        user = self.last_user.get(event.user_id)
        item = self.last_item.get(event.item_id)
        # It passed ``validate`` when offered; only the feature length may have been fixed
        # (or changed, with a new model) since, and ``validate`` would name it so.
        count = len(event.features)
        problem: tuple[RejectReason, str] | None = None
        if self.n_features is not None and count != self.n_features:
            problem = "feature_length", f"expected {self.n_features} features, got {count}"
        elif self._resent(event, user, item):
            # Before the time check: a re-send is older than what followed its first copy,
            # and "duplicate" is the reason that tells the producer what happened.
            problem = "duplicate", f"event_id {event.event_id} was already sequenced"
        else:
            problem = self._time_problem(event, user, item)
        if problem is not None:
            reason, detail = problem
            result.rejected.append(Rejected(reason, detail, event.event_id, partition, offset))
            return
        sequenced = SequencedEvent(
            self.next_seq,
            user[0] if user else -1,
            item[0] if item else -1,
            user[1] if user else None,
            item[1] if item else None,
            event,
        )
        self._record(sequenced, user, item)
        self.seen.add(event.event_id)
        result.sequenced.append(sequenced)

    def _resent(self, event: Interaction, user: Last | None, item: Last | None) -> bool:
        """Whether ``event``'s id is among the latest ones, or is its user's (``user``: that
        user's latest event) or its item's latest event (module doc: what an older re-send
        meets instead)."""
        if event.event_id in self.seen:
            return True
        if user is None and item is None:
            return False
        mark = (event.timestamp, _id_hash(event.event_id))
        return (user is not None and user[1:] == mark) or (item is not None and item[1:] == mark)

    def _time_problem(
        self, event: Interaction, user: Last | None, item: Last | None
    ) -> tuple[RejectReason, str] | None:
        for kind, last in (("user", user), ("item", item)):
            if last is not None and event.timestamp < last[1]:
                entity = event.user_id if kind == "user" else event.item_id
                return (
                    "time_backwards",
                    f"timestamp {event.timestamp} is before {kind} {entity}'s last event "
                    f"at {last[1]}",
                )
        return None

    def _record(
        self,
        e: SequencedEvent,
        user: Last | Literal[False] | None = False,
        item: Last | Literal[False] | None = False,
    ) -> None:
        """Take ``e`` into the state; ``user`` / ``item``: its user's and item's latest
        events as already looked up (False: look them up)."""
        ev = e.event
        if self.n_features is None:
            self.n_features = len(ev.features)  # the first valid event fixes the length
        if e.seq >= self.next_seq:
            self.next_seq = e.seq + 1
        if user is False:
            user = self.last_user.get(ev.user_id)
        if item is False:
            item = self.last_item.get(ev.item_id)
        last: Last | None = None
        if user is None or e.seq > user[0]:
            last = (e.seq, ev.timestamp, _id_hash(ev.event_id))
            self.last_user[ev.user_id] = last
        if item is None or e.seq > item[0]:
            self.last_item[ev.item_id] = last or (e.seq, ev.timestamp, _id_hash(ev.event_id))
        if self.watermark is None or ev.timestamp > self.watermark:
            self.watermark = ev.timestamp

"""Conversions between the Avro records on the wire and the operators' value objects."""

from __future__ import annotations

import math
from itertools import compress
from operator import is_not
from typing import Any

import numpy as np

from operators.protocol.exchange import Inbox, Pending
from operators.protocol.sides import EntityState, EventData, pack_features, unpack_features
from schemas import wire

NAN = float("nan")


def embedding_bytes(embedding: np.ndarray | None) -> bytes | None:
    if embedding is None:
        return None
    return np.asarray(embedding, dtype="<f4").tobytes()


def embedding_array(data: bytes | None) -> np.ndarray | None:
    if data is None:
        return None
    return np.frombuffer(data, dtype="<f4").copy()


def _time_out(t: float) -> float | None:
    return None if math.isnan(t) else t


def _time_in(t: float | None) -> float:
    return NAN if t is None else float(t)


def inbox_event(seq: int, prev_seq: int, partner_prev_seq: int, event: EventData) -> dict[str, Any]:
    return {
        "seq": seq,
        "prev_seq": prev_seq,
        "partner_prev_seq": partner_prev_seq,
        "event_id": event.event_id,
        "user_id": event.user_id,
        "item_id": event.item_id,
        "timestamp": event.timestamp,
        "features": unpack_features(event.features),
    }


def event_data(record: dict[str, Any]) -> EventData:
    features = record["features"]
    return EventData(
        event_id=record["event_id"],
        user_id=record["user_id"],
        item_id=record["item_id"],
        timestamp=float(record["timestamp"]),
        # The worker's own reader gives the features packed (schemas.wire, packed_features);
        # the Codec, for what only it reads, gives a list.
        features=features if isinstance(features, bytes) else pack_features(features),
    )


def pending(record: dict[str, Any], side: str) -> Pending:
    data = event_data(record)
    partner = data.item_id if side == "user" else data.user_id
    return Pending(
        int(record["seq"]), int(record["prev_seq"]), partner, data, int(record["partner_prev_seq"])
    )


def partner_message(seq: int, state: EntityState) -> dict[str, Any]:
    return {
        "seq": seq,
        "embedding": embedding_bytes(state.embedding),
        "last_time": _time_out(state.last_time),
    }


def partner_state(record: dict[str, Any]) -> EntityState:
    return EntityState(embedding_array(record["embedding"]), _time_in(record["last_time"]))


def inbox_to_record(box: Inbox[EntityState, EntityState], version: str) -> dict[str, Any]:
    state = box.state
    return {
        "embedding": embedding_bytes(state.embedding),
        "last_time": _time_out(state.last_time),
        "history": list(state.history),
        "history_counts": list(state.history_counts),
        "count": state.events,
        "trend": state.trend,
        "applied_seq": box.applied_seq,
        "sent_seq": box.sent_seq,
        "waiting": [
            inbox_event(p.seq, p.prev_seq, p.partner_prev_seq, p.payload)
            for p in box.waiting.values()
        ],
        "partners": [partner_message(seq, s) for seq, s in box.partners.items()],
        "derived": None if box.derived is None else partner_message(box.applied_seq, box.derived),
        "model_version": version,
        "history_times": list(state.history_times),
        "habits": list(state.habits),
    }


def _partner_bytes(seq: int, state: EntityState) -> bytes:
    return wire.partner_bytes(seq, embedding_bytes(state.embedding), _time_out(state.last_time))


def _waiting_bytes(p: Pending) -> bytes:
    e = p.payload
    return wire.inbox_event_bytes(
        p.seq,
        p.prev_seq,
        p.partner_prev_seq,
        wire.interaction_core(e.event_id, e.user_id, e.item_id, e.timestamp, e.features),
    )


class WaitingBytes:
    """The wire bytes of the events waiting in rows, encoded once while they wait.

    A row is written again by every transaction that changes it, with every event still
    waiting in it, so a busy entity's queue would be encoded again and again. A waiting
    event's bytes depend only on it: its two links and the event at its log position, which is
    one event for the life of a pipeline. They are kept here by position and links, up to
    ``most`` of them; past that the oldest half is dropped.

    ``queue`` also keeps, for each row's queue (the ``waiting`` dict itself, held here so that
    its identity stays its own), the bytes of its entries by key: a row written again finds
    the entries still waiting without a Python step per entry, which mattered for the long
    queues of items whose events wait for another worker's pre-states (with two workers the
    per-entry lookups were the larger part of writing the changelog).
    """

    def __init__(self, most: int = 200_000, most_queues: int = 10_000) -> None:
        self.most = most
        self.most_queues = most_queues
        self._bytes: dict[tuple[int, int, int, str], bytes] = {}
        # id(waiting) → (waiting, its entries as last written, their bytes), both by prev_seq
        self._queues: dict[
            int, tuple[dict[int, Pending], dict[int, Pending], dict[int, bytes]]
        ] = {}

    def __call__(self, p: Pending) -> bytes:
        key = (p.seq, p.prev_seq, p.partner_prev_seq, p.payload.event_id)
        data = self._bytes.get(key)
        if data is None:
            if len(self._bytes) >= self.most:  # dicts keep insertion order: oldest first
                for old in list(self._bytes)[: self.most // 2]:
                    del self._bytes[old]
            data = self._bytes[key] = _waiting_bytes(p)
        return data

    def queue(self, waiting: dict[int, Pending]) -> list[bytes]:
        """The bytes of ``waiting``'s entries, in its order."""
        if not waiting:
            self._queues.pop(id(waiting), None)
            return []
        known = self._queues.get(id(waiting))
        if known is None:
            if len(self._queues) >= self.most_queues:
                for old in list(self._queues)[: self.most_queues // 2]:
                    del self._queues[old]
            known = self._queues[id(waiting)] = (waiting, {}, {})
        _, entries, encoded = known
        keys = list(waiting)
        values = list(waiting.values())
        # Entries not written before from this very object (new, or replaced under their
        # key), found by identity in C loops: only those are looked up and encoded.
        for i in compress(range(len(keys)), map(is_not, map(entries.get, keys), values)):
            k, p = keys[i], values[i]
            entries[k] = p
            encoded[k] = self(p)
        if len(entries) > 2 * len(keys) + 8:  # applied entries: forget them
            for k in [k for k in entries if k not in waiting]:
                del entries[k], encoded[k]
        return list(map(encoded.__getitem__, keys))

    def __len__(self) -> int:
        return len(self._bytes)


def inbox_row_bytes(
    writer: wire.EntityRecordWriter,
    box: Inbox[EntityState, EntityState],
    version: str,
    waiting_bytes: WaitingBytes | None = None,
) -> bytes:
    """What ``inbox_to_record``'s record encodes to, written by ``writer`` without building
    it (its errors where it does not write what fastavro would: the caller asks the Codec).
    ``waiting_bytes`` keeps the waiting events' encodings from one write to the next."""
    state = box.state
    if waiting_bytes is None:
        waiting = [_waiting_bytes(p) for p in box.waiting.values()]
    else:
        waiting = waiting_bytes.queue(box.waiting)
    derived = box.derived
    return writer.record(
        embedding_bytes(state.embedding),
        _time_out(state.last_time),
        state.history,
        state.history_counts,
        state.events,
        state.trend,
        box.applied_seq,
        box.sent_seq,
        waiting,
        [_partner_bytes(seq, s) for seq, s in box.partners.items()],
        None if derived is None else _partner_bytes(box.applied_seq, derived),
        version,
        state.history_times,
        state.habits,
    )


def inbox_from_record(record: dict[str, Any], side: str) -> Inbox[EntityState, EntityState]:
    history = tuple(record["history"])
    # Rows written before counts were kept: each entry counts once.
    counts = tuple(int(c) for c in record.get("history_counts") or ()) or (1,) * len(history)
    state = EntityState(
        embedding_array(record["embedding"]),
        _time_in(record["last_time"]),
        history,
        counts,
        int(record.get("count") or 0),
        float(record.get("trend") or 0.0),
        tuple(map(float, record.get("history_times") or ())),
        tuple(map(float, record.get("habits") or ())),
    )
    box: Inbox[EntityState, EntityState] = Inbox(
        state=state, applied_seq=int(record["applied_seq"]), sent_seq=int(record["sent_seq"])
    )
    for w in record["waiting"]:
        p = pending(w, side)
        box.waiting[p.prev_seq] = p
    for m in record["partners"]:
        box.partners[int(m["seq"])] = partner_state(m)
    if record["derived"] is not None:
        box.derived = partner_state(record["derived"])
    return box

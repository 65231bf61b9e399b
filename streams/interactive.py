"""Interactive queries: what a user should see now, and where an item stands, asked of any worker.

    GET /users/{user_id}/recommendations?k=10[&at=T][&cold_start=1]
    GET /items/{item_id}

Any worker answers (Kafka Streams' interactive queries). The one asked finds the key's inbox
partition (the producer's partitioner, as the router keys them); when it owns that partition
it answers from its own table row, else it forwards the request to the member that owns it
(``streams.runtime.directory``: the group's assignment, with the endpoints the members
advertise in their client ids) and relays the answer with a ``Via`` header. A forwarded
request that reaches a worker which does not own the key (a rebalance moved it since) answers
421, and the asker looks the owner up afresh, once; while no member owns the partition (a
rebalance in progress) the answer is 503 with ``Retry-After``. Forwards go over connections
the asker keeps open to each owner (``Endpoint.peers``) and are awaited on the endpoint's
loop, so a forward in flight holds no thread; an owner that shed the query (503, its
``Retry-After``) is relayed as it answered. An overloaded worker sheds queries itself
(``streams.runtime.http``: ``JODIE_QUERY_QUEUE``, ``JODIE_QUERY_MAX_WAIT_S``).

Consistency and concurrency: queries run on the endpoint's thread while the loop processes,
and never wait for a batch. The user's (or item's) row is read as last committed (``Table.
committed``: the table's RocksDB, written only after each transaction commits), so an answer
never sees a batch half applied: ``log_seq`` is the seq in interactions.log of the last event
of that user applied and committed, ``pending_events`` the events of it received but waiting
for their partner's state. The candidate index is read under the serving's lock, which the
loop holds only while it writes item vectors into it; the index holds the latest item states
this worker knows, which may run a batch ahead of the user's committed row.

Time: a JODIE answer depends on when it is asked, since the user's embedding is projected
over the time since its last event. Answers project to the owner's *stream time* — the
latest event time among the items its index holds (every worker's item vectors reach every
index), never before the user's last event — or to ``at`` (event time, seconds) when given.
Not the wall clock: events carry their own time (the bundled Wikipedia month is replayed
long after it happened), and projecting by wall-clock gaps would take every user far past
anything the model was trained on. A client whose events are stamped with the wall clock
asks with ``at=<now>``.

A user without any applied event is unknown here: 404, or with ``cold_start=1`` the items
the ranker's popularity terms favour at that time (the same for everyone).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import numpy as np

from operators.model.state import TREND_SECONDS, trend_at
from streams.app.epochs import UNSTAMPED, label, row_key
from streams.app.processor import Box, Processor
from streams.app.serving import Ranked, Serving
from streams.query import MAX_K
from streams.runtime.directory import Directory, DirectoryError, Member, owner_among
from streams.runtime.http import Endpoint, HttpError, Peers, Reply, Request, Response, json_response
from streams.runtime.loop import TransactionalLoop
from streams.runtime.store import Table
from streams.settings import Settings

#: How long a forwarded query may take at its owner.
FORWARD_TIMEOUT_S = 5.0
_RETRY = {"Retry-After": "1"}


class Owner(Protocol):
    """What the queries read of a worker (streams.worker.Worker)."""

    @property
    def name(self) -> str: ...
    @property
    def settings(self) -> Settings: ...
    @property
    def sides(self) -> Mapping[str, str]: ...  # inbox topic → side
    @property
    def tables_by_side(self) -> Mapping[str, Table[Box]]: ...
    @property
    def processor(self) -> Processor: ...
    @property
    def loop(self) -> TransactionalLoop[Any]: ...
    def partition_of(self, side: str, entity: str) -> int | None: ...


class Queries:
    """The query routes of one worker."""

    def __init__(self, worker: Owner, directory: Directory | None = None) -> None:
        self.worker = worker
        self.name = worker.name
        self.directory = directory or Directory(worker.settings, worker.loop.config.group_id)
        self.inboxes = {side: topic for topic, side in worker.sides.items()}
        self.peers = Peers()  # the endpoint's own once registered (see register)

    def register(self, http: Endpoint) -> None:
        self.peers = http.peers
        http.get("/users/{user_id}/recommendations", self.user)
        http.get("/items/{item_id}", self.item)

    # -- routes -------------------------------------------------------------------------------
    def user(self, request: Request) -> Reply:
        user_id = request.params["user_id"]
        k, at, cold = _k(request), _at(request), request.flag("cold_start")
        return self._routed(
            "user", user_id, request, lambda p, s, box: self._user(p, s, box, user_id, k, at, cold)
        )

    def item(self, request: Request) -> Reply:
        item_id = request.params["item_id"]
        return self._routed(
            "item", item_id, request, lambda p, s, box: self._item(p, s, box, item_id)
        )

    # -- routing ------------------------------------------------------------------------------
    def _routed(
        self,
        side: str,
        entity: str,
        request: Request,
        answer: Callable[[int, Serving, Box], dict[str, Any]],
    ) -> Reply:
        """``answer(partition, serving, committed row)`` here if this worker owns the entity,
        else the owner's response (awaited: the forward waits on the endpoint's loop, not on
        a thread)."""
        worker = self.worker
        p = worker.partition_of(side, entity)
        if p is None:
            raise HttpError(503, f"{self.name} is starting; retry shortly", _RETRY)
        # A snapshot of the served epochs (the loop may add one meanwhile): the latest.
        servings = list(worker.processor.servings.values())
        if servings:
            serving = max(servings, key=lambda s: s.epoch[1])
            box = worker.tables_by_side[side].committed(p, row_key(entity.encode(), serving.epoch))
            if box is not None:
                return json_response(answer(p, serving, box))
        elif p in worker.tables_by_side[side].partitions:
            raise HttpError(503, f"{self.name} serves no model version yet", _RETRY)
        if "via" in request.headers:
            raise HttpError(421, f"{self.name} does not own {side} partition {p} (any more)")
        return self._forward(side, p, request)

    async def _owner(self, topic: str, p: int, fresh: bool) -> Member | None:
        """The owner of ``topic[p]``; a description of the group older than its time to live
        is asked for on another thread (the coordinator may take seconds to answer)."""
        members = None if fresh else self.directory.cached()
        if members is not None:
            return owner_among(members, topic, p)
        return await asyncio.to_thread(self.directory.owner, topic, p, fresh)

    async def _forward(self, side: str, p: int, request: Request) -> Response:
        topic, last = self.inboxes[side], ""
        for fresh in (False, True):
            try:
                owner = await self._owner(topic, p, fresh)
            except DirectoryError as exc:
                raise HttpError(503, str(exc), _RETRY) from exc
            if owner is None:
                last = f"no worker owns {side} partition {p} now (the group is rebalancing)"
                continue
            if owner.endpoint is None:
                raise HttpError(
                    503, f"{owner.name} owns {side} partition {p} but serves no HTTP endpoint"
                )
            if owner.name == self.name:
                last = f"{side} partition {p} is moving to or from {self.name}"
                continue
            try:
                reply = await self.peers.get(
                    owner.endpoint, request.target, FORWARD_TIMEOUT_S, {"Via": f"1.1 {self.name}"}
                )
            except OSError as exc:
                last = f"{owner.name} at {owner.endpoint} did not answer ({exc or 'timed out'})"
                continue
            if reply.status == 421:
                last = f"{owner.name} no longer owns {side} partition {p}"
                continue
            relayed = {"Via": f"1.1 {owner.name}"}
            if "retry-after" in reply.headers:  # the owner shed it: the client may retry
                relayed["Retry-After"] = reply.headers["retry-after"]
            return Response(reply.status, reply.body, reply.content_type, relayed)
        raise HttpError(503, f"{last}; retry shortly", _RETRY)

    # -- answers (on the owner, from its committed row) ----------------------------------------
    def _envelope(self, p: int, serving: Serving) -> dict[str, Any]:
        return {
            "model_version": serving.version,
            "epoch": label(serving.epoch) if serving.epoch != UNSTAMPED else None,
            "served_by": self.name,
            "partition": p,
        }

    def _user(
        self,
        p: int,
        serving: Serving,
        box: Box,
        user_id: str,
        k: int,
        at: float | None,
        cold: bool,
    ) -> dict[str, Any]:
        state = box.state
        answer: dict[str, Any] = {"user_id": user_id, "k": k, **self._envelope(p, serving)}
        if state.is_new:
            if not cold:
                raise HttpError(
                    404,
                    f"unknown user {user_id!r}: no event of it has been applied (ask with "
                    "cold_start=1 for the items popular and trending now)",
                    pending_events=len(box.waiting),
                )
            t = at if at is not None else serving.clock
            return {
                **answer,
                "cold_start": True,
                "log_seq": None,
                "pending_events": len(box.waiting),
                "last_event_time": None,
                "projected_to": _finite(t),
                "score": serving.cold_start_meaning,
                "recommendations": _listed(serving.trending(t, k) if math.isfinite(t) else []),
            }
        if at is not None and at < state.last_time:
            raise HttpError(
                400,
                f"at={at:g} is before the user's last event ({state.last_time:g}): "
                "a user can only be projected forward",
            )
        t = at if at is not None else max(serving.clock, state.last_time)
        ranked = serving.rank_user(user_id, state, box.derived, t, k)
        return {
            **answer,
            "cold_start": False,
            "log_seq": box.applied_seq if box.applied_seq >= 0 else None,
            "pending_events": len(box.waiting),
            "last_event_time": state.last_time,
            "projected_to": t,
            "projected_by_s": t - state.last_time,
            "time": "at" if at is not None else "stream",
            "history": list(state.history),
            "score": serving.score_meaning,
            "recommendations": _listed(ranked),
        }

    def _item(self, p: int, serving: Serving, box: Box, item_id: str) -> dict[str, Any]:
        state = box.state
        if state.is_new:
            raise HttpError(
                404,
                f"unknown item {item_id!r}: no event of it has been applied",
                pending_events=len(box.waiting),
            )
        now = max(serving.clock, state.last_time)
        return {
            "item_id": item_id,
            **self._envelope(p, serving),
            "log_seq": box.applied_seq if box.applied_seq >= 0 else None,
            "pending_events": len(box.waiting),
            "count": state.events,
            "trend": state.trend,
            "last_event_time": state.last_time,
            "stream_time": now,
            "trend_now": float(
                trend_at(np.array([state.trend]), np.array([state.last_time]), now)[0]
            ),
            "trend_time_constant_s": TREND_SECONDS,
        }


def _listed(ranked: list[Ranked]) -> list[dict[str, Any]]:
    return [{"item_id": r.item_id, "score": r.score, "terms": r.terms} for r in ranked]


def _finite(t: float) -> float | None:
    return t if math.isfinite(t) else None


def _k(request: Request) -> int:
    raw = request.arg("k", "10") or ""
    try:
        k = int(raw)
    except ValueError:
        k = 0
    if not 1 <= k <= MAX_K:
        raise HttpError(400, f"k must be a whole number from 1 to {MAX_K}, got {raw!r}")
    return k


def _at(request: Request) -> float | None:
    raw = request.arg("at")
    if raw is None:
        return None
    try:
        at = float(raw)
    except ValueError:
        at = math.nan
    if not math.isfinite(at):
        raise HttpError(400, f"at must be an event time in seconds, got {raw!r}")
    return at

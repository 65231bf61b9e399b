"""A client of a running pipeline: send interactions, read the recommendations they lead to.

Example (a router and workers running on the same ``JODIE_*`` settings)::

    from streams.client import Client, Interaction

    with Client() as client:
        client.send("alice", "item-42", timestamp=1700000000.0)
        client.send_many(Interaction(user, item, t) for user, item, t in rows)
        client.flush()
        for rec in client.recommendations(user="alice", idle_timeout_s=30):
            print(rec["model_version"], [c["item_id"] for c in rec["candidates"]])

Interactions go to the ``interactions`` topic as Avro ``Interaction`` records keyed by user id,
through one idempotent producer (no duplicates or reordering on retries), framed for the
schema registry when ``JODIE_SCHEMA_REGISTRY_URL`` is set. Recommendations are read as a
read_committed consumer sees them: only those of committed worker transactions, each once.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, TypedDict, cast

from confluent_kafka import Consumer, KafkaException

from schemas import INTERACTION
from streams.codecs import make_codec
from streams.exceptions import DeliveryError
from streams.produce import ProduceSummary, Sender, produce_file
from streams.runtime.clients import idempotent_producer
from streams.settings import Settings, get_settings
from streams.tail import read, reader

if TYPE_CHECKING:
    from streams.query import UserRecommendations


@dataclass(frozen=True)
class Interaction:
    """One interaction to send: ``user`` touched ``item`` at ``timestamp`` (seconds, any
    epoch, the same for all events). ``features``: the same length for every event of a
    stream (the served model's). ``event_id``: give a stable one to make re-sends
    deduplicable; by default the client numbers its events in the order they are sent.
    ``state_label``: 1 when the user's state changed after it (e.g. banned), else 0."""

    user: str
    item: str
    timestamp: float
    features: Sequence[float] = ()
    event_id: str | None = None
    state_label: int | None = None


class Candidate(TypedDict):
    item_id: str
    score: float  # the served ranker's score: higher is better


class Recommendation(TypedDict):
    """A recommendation record (schemas/recommendation.avsc): what ``user_id`` is predicted
    to touch next, made after its interaction ``event_id`` on ``item_id`` at ``timestamp``."""

    user_id: str
    event_id: str
    item_id: str
    timestamp: float
    model_version: str
    projected_user: list[float]
    predicted_item: list[float]
    candidates: list[Candidate]  # best first
    state_change_probability: float | None


class Recommendations(Iterator[Recommendation]):
    """Recommendation records as they commit; iterate, then ``close`` (or use ``with``).

    Positioned when made (not when first iterated), so records committed after the call are
    read even if the iteration starts later. ``stop()`` may be called from any thread: the
    iteration then ends within a fraction of a second.
    """

    def __init__(
        self,
        settings: Settings,
        user: str | None,
        follow: bool,
        from_beginning: bool,
        limit: int | None,
        idle_timeout_s: float | None,
    ) -> None:
        self._stop = threading.Event()
        self._consumer: Consumer | None = reader(
            settings, "recommendations", user=user, from_beginning=from_beginning
        )
        self._records = read(
            self._consumer,
            settings,
            "recommendations",
            follow=follow,
            user=user,
            limit=limit,
            idle_timeout_s=idle_timeout_s,
            stop=self._stop.is_set,
        )

    def __next__(self) -> Recommendation:
        if self._consumer is None:
            raise StopIteration
        try:
            return cast(Recommendation, next(self._records))
        except StopIteration:
            self.close()
            raise

    def stop(self) -> None:
        """End the iteration at its next poll (safe from another thread, unlike ``close``)."""
        self._stop.set()

    def close(self) -> None:
        """Stop and release the consumer; call it from the iterating thread."""
        self._stop.set()
        if self._consumer is not None:
            self._records.close()
            self._consumer.close()
            self._consumer = None

    def __enter__(self) -> Recommendations:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class Client:
    """Sends interactions to one pipeline and reads its recommendations.

    ``settings``: the pipeline's cluster, security and topic prefix (by default the
    ``JODIE_*`` environment, as the ``jodie`` command reads it). The producer is made at the
    first send, so a client that only reads never opens one.
    """

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings if settings is not None else get_settings()
        self.topic = self.settings.topic("interactions")
        self.codec = make_codec(self.settings, INTERACTION, self.topic)
        self._sender: Sender | None = None
        self._tag = uuid.uuid4().hex[:12]  # this client's event ids: "<tag>:<number>"
        self._sent = 0
        self._streams: list[Recommendations] = []

    @property
    def sender(self) -> Sender:
        """The idempotent producer to ``interactions`` (made on first use)."""
        if self._sender is None:
            self._sender = Sender(idempotent_producer(self.settings), self.topic)
        return self._sender

    def send(
        self,
        user: str,
        item: str,
        timestamp: float,
        features: Sequence[float] = (),
        *,
        event_id: str | None = None,
        state_label: int | None = None,
    ) -> str:
        """Queue one interaction (sent in the background; ``flush`` waits for delivery) and
        return its event id. Raises ``schemas.EncodeError`` when a field has the wrong type;
        values the pipeline rejects (NaN features, a wrong feature length, an event older
        than its user's last) go to ``interactions.dlq`` with the reason."""
        return self._send(Interaction(user, item, timestamp, features, event_id, state_label))

    def send_many(self, events: Iterable[Interaction], flush_every: int | None = None) -> int:
        """Send ``events`` in order, waiting for delivery every ``flush_every`` events
        (``JODIE_PRODUCE_BATCH`` by default) and at the end; returns how many were sent."""
        every = flush_every or self.settings.produce_batch
        n = 0
        for event in events:
            self._send(event)
            n += 1
            if n % every == 0:
                self.flush()
        self.flush()
        return n

    def send_file(
        self,
        path: str | Path | None = None,
        *,
        start: int = 0,
        limit: int | None = None,
        rate: float | None = None,
        strict: bool = False,
        on_progress: Callable[[int], None] | None = None,
        laps: int | None = 1,
    ) -> ProduceSummary:
        """Send the rows of a JODIE CSV (plain or .gz; the bundled Wikipedia file by
        default): valid rows ``start .. start+limit``, at ``rate`` events/s if given, with
        ids derived from the file so a re-run is deduplicated. Bad rows are reported in the
        summary (``strict``: raise at the first). ``laps``: passes over the rows, each
        after the first as new events later in time (None: until stopped; see
        ``streams.produce.produce_file``). Delivered when it returns."""
        from operators.dataset import bundled_wikipedia

        try:
            return produce_file(
                path or bundled_wikipedia(),
                self.sender.producer,
                self.codec,
                self.topic,
                start=start,
                limit=limit,
                rate=rate,
                strict=strict,
                flush_every=self.settings.produce_batch,
                on_progress=on_progress,
                laps=laps,
            )
        except KafkaException as exc:
            raise DeliveryError(f"sending to {self.topic}: {exc.args[0]}") from exc

    def flush(self, timeout_s: float = 60.0) -> None:
        """Wait until every interaction sent is delivered; ``DeliveryError`` if one failed
        or some are still undelivered after ``timeout_s``."""
        if self._sender is None:
            return
        try:
            remaining = self._sender.flush(timeout_s)
        except KafkaException as exc:
            raise DeliveryError(f"sending to {self.topic}: {exc.args[0]}") from exc
        if remaining:
            raise DeliveryError(
                f"{remaining} interactions not delivered to {self.topic} within {timeout_s} s"
            )

    def recommendations(
        self,
        user: str | None = None,
        follow: bool = True,
        from_beginning: bool = False,
        *,
        limit: int | None = None,
        idle_timeout_s: float | None = None,
    ) -> Recommendations:
        """Recommendation records, ``user``'s only if given (read from that user's
        partition alone), each once, in commit order per user.

        ``from_beginning``: from the start of the topic, else from now (records committed
        after this call). ``follow``: wait for new ones until ``limit`` records, until
        nothing came for ``idle_timeout_s`` (None: no limit) or until ``stop()``; without
        it, stop at the end of the topic.
        """
        stream = Recommendations(self.settings, user, follow, from_beginning, limit, idle_timeout_s)
        self._streams.append(stream)
        return stream

    def query(
        self,
        user: str,
        k: int = 10,
        *,
        workers: int = 1,
        urls: Sequence[str] | None = None,
        cold_start: bool = False,
        at: float | None = None,
    ) -> UserRecommendations:
        """What ``user`` should see now: the served ranker's top ``k`` items, the user
        projected to now, from the worker that owns the user (``GET
        /users/{user}/recommendations`` on any worker, which forwards; see
        ``streams.query.recommend``). The workers are asked at ``urls``, by default those of
        workers 0 .. ``workers``-1 on this machine (JODIE_WEB_PORT + N); any one of them is
        enough. ``cold_start``: popular and trending items for an unknown user instead of
        ``UnknownEntityError``; ``at``: project to that event time instead of now."""
        from streams.query import recommend, worker_urls

        asked = list(urls) if urls is not None else worker_urls(self.settings, workers)
        return recommend(user, k, urls=asked, cold_start=cold_start, at=at)

    def close(self) -> None:
        """Deliver what was sent and close the recommendation streams made here (call it
        from the thread that iterates them; ``Recommendations.stop`` from others)."""
        for stream in self._streams:
            stream.close()
        self._streams.clear()
        self.flush()

    def _send(self, event: Interaction) -> str:
        # Zero-padded, so a client's own events sort (and break timestamp ties) in the order
        # they were sent.
        event_id = event.event_id or f"{self._tag}:{self._sent:012d}"
        record = {
            "event_id": event_id,
            "user_id": event.user,
            "item_id": event.item,
            "timestamp": event.timestamp,
            "features": list(event.features),
            "state_label": event.state_label,
        }
        self.sender.send(event.user.encode(), self.codec.encode(record))
        self._sent += 1
        return event_id

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

"""A transactional producer that outlives broker failures: each librdkafka error handled as it asks.

librdkafka flags what a failed transactional call needs (``KafkaError``):

- ``retriable()``: the call timed out, or met a coordinator that is not there or still loading
  its log (a broker that just restarted answers COORDINATOR_LOAD_IN_PROGRESS for seconds);
  the same call may be made again and continues where it stopped;
- ``txn_requires_abort()``: the open transaction cannot commit; abort it, redo its work;
- ``fatal()``, or anything else: this producer is done. A new one with the same
  ``transactional.id``, once ``init_transactions`` returns, has had the coordinator finish
  what the old one left (abort it, or complete a commit already decided) and carries on.

``Transactions`` makes those calls with bounded retries and backoff and replaces the producer
when it has to; ``recover`` says which of the two happened, and the caller rewinds its input
to what is committed (after a replacement it cannot know whether the last commit landed, so
it asks the group). A producer fenced by another instance with the same id is not replaced
more than ``fencings`` times a minute: two instances fencing each other would otherwise never
stop.

One more failure is librdkafka's own: ``send_offsets_to_transaction`` can block forever,
past its timeout, once the group coordinator it cached went away (a broker killed and
restarted): librdkafka issues #5456 and #5511, open in 2.16. That was the stall of a router
and a worker sitting idle after a broker restart. So every call here runs in a helper thread
and is given up after its timeout plus ``WATCHDOG_GRACE_S`` as if the producer were fatal
(the blocked thread and its producer are abandoned; the new producer fences them), and a
failed ``send_offsets_to_transaction`` is not retried on the same producer, whose stale
coordinator would hang the retry: the producer is replaced at once. The abandoned call may
still complete later and leave its offset commit pending in the group for good: the router
therefore keeps its positions in a topic of its own (streams.router.read_positions), and the
loop reads past such a commit (streams.runtime.loop, ``TransactionalLoop._committed``).

A new producer sweeps before it is used (``Sweep``): it writes one record to every partition
its instance ever writes, adds the group's offsets where it commits some, and aborts. The
broker can leave records of an earlier producer of the same id open for good: a single node
killed right after it decided a commit, and restarted before its controller fenced the dead
incarnation, leads no partition for a moment once it is fenced, and its transaction
coordinator then takes the leaderless partitions for deleted ones and completes the
transaction without writing their markers (seen in two of four full test runs; Kafka 4.4,
kafka.coordinator.transaction.TransactionMarkerChannelManager). Such records hold back every
read_committed reader of their partition until the producer id's next marker there, which
would commit them or abort them depending on which transaction happens to come next — some
of a batch's outputs kept, others dropped. The sweep's abort ends them all, and with them any
offset commit left pending in the group, before anything new commits: the batch is undone
everywhere its markers were skipped, and the instance redoes it from the committed state
(streams.runtime.store rebuilds a store that took its rows). Where some partitions did get
their markers (the group's offsets partition, or a changelog's, or a later commit of the old
producer committed its open records there before it was replaced), the batch stands committed
in part: the loop then sends again what of it is missing and reads it again, which an
application that ignores repeats asks for (streams.runtime.loop,
``LoopConfig.reread_batches``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Literal, TypeVar

from confluent_kafka import KafkaError, KafkaException, Producer, TopicPartition

from streams.runtime.exceptions import FencedError, TransactionError
from streams.runtime.kafka import TRANSIENT

T = TypeVar("T")

_FENCED = (KafkaError._FENCED, KafkaError.PRODUCER_FENCED)
#: Seconds one transactional call may block before it is retried (and the wait is logged).
CALL_TIMEOUT_S = 5.0
#: How long past its own timeout a call may go on before it is taken for hung.
WATCHDOG_GRACE_S = 3.0


#: The key of a sweep's records: never a row's or an entity's (UTF-8 never holds 0xff); they
#: carry no value and are aborted, so no read_committed reader ever sees one.
SWEEP_KEY = b"\xff\xfejodie:sweep"


@dataclass(frozen=True)
class Sweep:
    """What a new producer aborts before it is used (see above)."""

    #: Every partition the instance may write to, its tables' changelogs included.
    partitions: Sequence[TopicPartition]
    #: Where the instance commits consumer offsets: some offsets of its group and the
    #: group's metadata, sent in the sweep only so that its abort reaches the group's
    #: offsets partition (the values never commit).
    offsets: Callable[[], tuple[list[TopicPartition], object]] | None = None


def error_of(exc: KafkaException) -> KafkaError | None:
    error = exc.args[0] if exc.args else None
    return error if isinstance(error, KafkaError) else None


def retriable(error: KafkaError | None) -> bool:
    """Whether the same call may simply be made again."""
    return error is not None and (error.retriable() or error.code() in TRANSIENT)


class Transactions:
    """One transactional producer at a time, made by ``make`` (same transactional id)."""

    def __init__(
        self,
        make: Callable[[], Producer],
        name: str,
        log: logging.Logger,
        timeout_s: float = 120.0,
        fencings: int = 3,
        sweep: Sweep | None = None,
    ) -> None:
        """``timeout_s``: how long one step (a call and its retries, or getting a new
        producer ready) may take before it is a ``TransactionError``; ``sweep``: what each new
        producer aborts first (None: nothing)."""
        self._make = make
        self.sweep = sweep
        self.swept = 0  # sweeps done, one per producer made ready
        self.name = name
        self.log = log
        self.timeout_s = timeout_s
        self.fencings = fencings
        self._fenced_at: list[float] = []
        self._producer: Producer | None = None
        self.replaced = 0  # producers replaced after a fatal error
        self.aborted = 0
        self.hung = 0  # calls given up by the watchdog
        self._hung = False  # the current producer has a call blocked in it

    @property
    def producer(self) -> Producer:
        if self._producer is None:
            raise TransactionError(f"{self.name}: no producer; call start() first")
        return self._producer

    def start(self) -> Producer:
        """A new producer, ``init_transactions`` done: fences an older one with this id and
        settles what it left open. Retried while the coordinator is away or loading."""
        deadline = time.monotonic() + self.timeout_s
        backoff = 0.1
        while True:
            producer = self._make()
            try:
                self.call(partial(producer.init_transactions, CALL_TIMEOUT_S), "init", deadline)
                if self.sweep is not None:
                    self._sweep(producer, self.sweep, deadline)
            except KafkaException as exc:
                error = error_of(exc)
                _discard(producer)
                if time.monotonic() > deadline or (error is not None and _is_fenced(error)):
                    raise TransactionError(f"{self.name}: cannot start: {error}") from exc
                self.log.warning("%s: producer unusable (%s); making a new one", self.name, error)
                time.sleep(backoff)
                backoff = min(2 * backoff, 2.0)
                continue
            self._producer = producer
            return producer

    def _sweep(self, producer: Producer, sweep: Sweep, deadline: float) -> None:
        """One record to each of ``sweep.partitions`` and the offsets, then abort."""
        failed: list[KafkaError] = []

        def delivered(err: KafkaError | None, _msg: object) -> None:
            if err is not None:
                failed.append(err)

        producer.begin_transaction()
        for tp in sweep.partitions:
            producer.produce(
                tp.topic, key=SWEEP_KEY, value=None, partition=tp.partition, on_delivery=delivered
            )
        # Delivered, every partition is in the transaction: its abort marker reaches each.
        while producer.flush(CALL_TIMEOUT_S) > 0:
            if time.monotonic() > deadline:
                reason = "sweep: records not delivered in time"
                raise KafkaException(KafkaError(KafkaError._TIMED_OUT, reason, fatal=True))
        if sweep.offsets is not None:
            offsets, group = sweep.offsets()
            send = partial(producer.send_offsets_to_transaction, offsets, group, CALL_TIMEOUT_S)
            try:
                self.call(send, "sweep offsets", deadline, retry=False)
            except KafkaException as exc:
                error = error_of(exc)
                if error is None or error.fatal():
                    raise
                # Refused by the group (this member's generation is not current, say): the
                # offsets partition joined the transaction before, and the abort reaches it.
                self.log.info("%s: sweep: offsets not sent (%s)", self.name, error)
        self.call(partial(producer.abort_transaction, CALL_TIMEOUT_S), "sweep abort", deadline)
        if failed:
            self.log.warning(
                "%s: sweep: %d partition(s) not reached (%s)", self.name, len(failed), failed[0]
            )
        self.swept += 1

    def call(
        self,
        fn: Callable[[], T],
        what: str,
        deadline: float | None = None,
        retry: bool = True,
    ) -> T:
        """``fn()`` (a call given ``CALL_TIMEOUT_S``), made again with backoff while it fails
        with a retriable error, until ``deadline`` (default: ``timeout_s`` from now); without
        ``retry``, its first failure is final."""
        deadline = deadline if deadline is not None else time.monotonic() + self.timeout_s
        backoff = 0.1
        while True:
            try:
                return self._watched(fn, what)
            except KafkaException as exc:
                error = error_of(exc)
                if not retry or not retriable(error) or time.monotonic() > deadline:
                    raise
                self.log.warning("%s: %s: %s; retrying", self.name, what, error)
                time.sleep(backoff)
                backoff = min(2 * backoff, 2.0)

    def send_offsets(self, offsets: list[TopicPartition], group: object) -> None:
        """``send_offsets_to_transaction`` (``group``: the consumer's group metadata); any
        failure replaces the producer (see above)."""
        producer = self.producer
        send = partial(producer.send_offsets_to_transaction, offsets, group, CALL_TIMEOUT_S)
        try:
            self.call(send, "send offsets", retry=False)
        except KafkaException as exc:
            error = error_of(exc)
            if error is not None and (error.txn_requires_abort() or error.fatal()):
                raise
            reason = f"send offsets failed ({error}); a new producer will retry"
            raise KafkaException(KafkaError(KafkaError._TIMED_OUT, reason, fatal=True)) from exc

    def _watched(self, fn: Callable[[], T], what: str) -> T:
        """``fn()`` in a helper thread, given up when it outlives its timeout (see above)."""
        outcome: list[tuple[bool, object]] = []
        done = threading.Event()

        def run() -> None:
            try:
                outcome.append((True, fn()))
            except BaseException as exc:  # handed to the caller's thread as it is
                outcome.append((False, exc))
            finally:
                done.set()

        threading.Thread(target=run, name=f"{self.name}: {what}", daemon=True).start()
        if not done.wait(CALL_TIMEOUT_S + WATCHDOG_GRACE_S):
            self._hung = True
            self.hung += 1
            reason = f"{what} did not return within {CALL_TIMEOUT_S + WATCHDOG_GRACE_S:.0f} s"
            raise KafkaException(KafkaError(KafkaError._TIMED_OUT, reason, fatal=True))
        ok, value = outcome[0]
        if not ok:
            assert isinstance(value, BaseException)
            raise value
        return value  # type: ignore[return-value]

    def commit(self) -> None:
        self.call(lambda: self.producer.commit_transaction(CALL_TIMEOUT_S), "commit")

    def abort(self) -> None:
        self.call(lambda: self.producer.abort_transaction(CALL_TIMEOUT_S), "abort")

    def recover(self, exc: KafkaException) -> Literal["aborted", "replaced"]:
        """After ``exc`` ended a transaction: abort it when that is what the error asks (the
        work is undone, nothing of it committed), else replace the producer (the last
        transaction was settled by the coordinator, committed or not: ask what is)."""
        error = error_of(exc)
        if error is not None and error.txn_requires_abort():
            try:
                self.abort()
                self.aborted += 1
                self.log.warning("%s: transaction aborted (%s)", self.name, error)
                return "aborted"
            except KafkaException as abort_exc:
                error = error_of(abort_exc) or error  # the producer is no use: replace it
        if error is not None and _is_fenced(error):
            now = time.monotonic()
            self._fenced_at = [t for t in self._fenced_at if now - t < 60.0] + [now]
            if len(self._fenced_at) > self.fencings:
                raise FencedError(f"{self.name}: fenced again and again: {error}") from exc
        self.log.warning("%s: %s; replacing the producer", self.name, error)
        if self._producer is not None and not self._hung:
            _discard(self._producer)  # a hung one is left alone: touching it may block too
        self._producer, self._hung = None, False
        self.start()
        self.replaced += 1
        return "replaced"


def _is_fenced(error: KafkaError) -> bool:
    return error.code() in _FENCED


def _discard(producer: Producer) -> None:
    """Drop what an unusable producer still holds, so releasing it does not wait on it."""
    try:
        producer.purge()
        producer.flush(0)
    except (KafkaException, RuntimeError):
        pass  # it is being thrown away either way

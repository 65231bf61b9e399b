"""The live evaluation ranked in a process of its own, beside the worker's processing.

A worker's transaction needs the recommendations of the events it applies, not their ranks:
the live evaluation ranks events whose lists were already served (``operators.evaluation.live``),
and cost about a sixth of a worker's CPU inline (README, *The live evaluation, apart*). Its
inputs are what the processing hands it anyway, the item vectors it applies or reads and
the sampled events' queries. ``RanksApart`` keeps ``LiveRanks``' interface, buffers those
inputs, and at each ``ready`` hands them to a thread that sends them to a child process,
which holds the ``LiveRanks`` and feeds them to it in the same order; the ranks that come back
are returned by a later ``ready``. The processing never waits for the child: one kept from
its core (it runs at a lower priority) falls behind, and past ``MAX_BACKLOG_BYTES`` the
queries it would rank are counted as unranked. The worker sends the ranks in the
transaction of a later batch, or of its own when idle, as the inline evaluation sends a rank
that waits for another worker's vectors.

The ranks are those of the inline evaluation: a rank is a function of the log and the
weights, not of when the inputs arrive (``operators.evaluation.live``). What changes is when
each evaluation record is written, a batch or so later. A worker that is stopped waits for
the ranks still in flight, for a bounded time, and commits them in a last transaction
(``finish``). One that is killed loses them as it loses the queries waiting for vectors
inline: the records committed are never repeated, and what was lost shows in no count (it
was never ranked).

The child is ``python -m streams.app.evaluation FD``: one end of a socket pair, framed by
``multiprocessing.connection``, carrying plain pickles. It ends when its end is closed (the
worker stopped, or was killed), or on ``close``. If it dies, the worker keeps serving and
counts the queries it can no longer rank as unranked.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from multiprocessing.connection import Connection

import numpy as np

from operators.evaluation.live import LiveRanks, Query, Ranked

_log = logging.getLogger(__name__)

#: Seconds ``close`` waits for the child to finish what it was sent.
CLOSE_TIMEOUT_S = 10.0
#: How often ``finish`` looks for the replies it waits for.
FINISH_POLL_S = 0.01
#: Bytes of batches waiting for the child beyond which the next batches' queries are
#: counted as unranked instead of sent (their item vectors still go): a child kept from its
#: core costs ranks, never the processing's memory or time. About 15 s of a fast worker.
MAX_BACKLOG_BYTES = 64 << 20
#: Bytes of batches waiting for the child beyond which it is taken for stopped for good
#: (SIGSTOP, a debugger, a host out of memory): killed, and counted from then on as a child
#: that died. Past ``MAX_BACKLOG_BYTES`` its queries are dropped, but the item vectors keep
#: coming, and without this bound they would grow the worker's memory without end. About a
#: minute of a fast worker.
GIVE_UP_BYTES = 4 * MAX_BACKLOG_BYTES
#: The child's niceness: under contention for the cores, the processing and the broker come
#: first; the ranking takes what is left (its ranks only come later).
NICE = 10

# One batch's inputs: the item vectors (seqs, ids, (n, d + s) vectors, stats) and queries.
_Batch = tuple[
    list[int], list[str], np.ndarray | None, list[tuple[float, float, float]], list[Query]
]
# One reply: per ranked query (seq, event id, user, item, rank, items known), then the
# child's watermark, pending queries and unranked count; or an error's text.
_Reply = tuple[list[tuple[int, str, str, str, int, int]], int, int, int, str | None]

_NO_STATE = np.zeros(0, dtype=np.float32)
# Plain pickles: multiprocessing's own pickler would hand torch tensors over as shared
# memory, through a resource sharer this pair of processes does not run.
_PROTOCOL = pickle.HIGHEST_PROTOCOL
_NONE = pickle.dumps(None, _PROTOCOL)


class RanksApart:
    """``LiveRanks``' interface, ranked by a child process (module docstring).

    ``live`` is a ``LiveRanks`` fresh from its constructor: its arguments start the child's.
    """

    def __init__(self, live: LiveRanks, name: str = "live evaluation") -> None:
        if live.watermark != live.start or live.pending():
            raise ValueError("RanksApart starts from a LiveRanks that has had no input")
        self.every = live.every
        self.name = name
        self._watermark = live.watermark
        self._unranked = 0
        self._pending = 0  # the child's, at its last reply
        self._lost = 0  # queries the child could not take (it had stopped)
        self._seqs: list[int] = []
        self._items: list[str] = []
        self._vectors: list[np.ndarray] = []
        self._stats: list[tuple[float, float, float]] = []
        self._queries: list[Query] = []
        self._in_flight: deque[int] = deque()  # queries of each batch sent, not answered
        self._replies: deque[_Reply] = deque()  # filled by the receiving thread
        self._dead = threading.Event()
        self._reported = False  # the child's end was counted (and logged)
        self._closing = False
        spec = {f.name: getattr(live, f.name) for f in dataclasses.fields(live) if f.init}
        ours, theirs = socket.socketpair()
        self._proc = subprocess.Popen(
            [sys.executable, "-m", __name__, str(theirs.fileno())],
            pass_fds=(theirs.fileno(),),
        )
        theirs.close()
        self._conn = Connection(ours.detach())
        # Batches go out from a thread of their own: a child that is slow, or still starting
        # (its imports, the weights' transfer), never holds up the processing. What waits
        # for it is bounded (``MAX_BACKLOG_BYTES``).
        self._outbox: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._queued_bytes = 0  # written by the processing thread only
        self._sent_bytes = 0  # written by the sending thread only
        # The spec (the weights and every item's state) goes first and is not counted against
        # the bound: a large catalogue's is larger than it, and the child needs it whole.
        self._sender = threading.Thread(
            target=self._send_all,
            args=(pickle.dumps(spec, _PROTOCOL),),
            name=f"{name}: send",
            daemon=True,
        )
        self._receiver = threading.Thread(
            target=self._receive, name=f"{name}: receive", daemon=True
        )
        self._sender.start()
        self._receiver.start()

    # -- LiveRanks' interface --------------------------------------------------------------
    @property
    def watermark(self) -> int:
        """The child's watermark at its last reply."""
        return self._watermark

    @property
    def unranked(self) -> int:
        return self._unranked + self._lost

    def item_vector(
        self,
        seq: int,
        item_id: str,
        vector: np.ndarray,
        stats: tuple[float, float, float] = (0.0, 0.0, float("nan")),
    ) -> None:
        self._seqs.append(seq)
        self._items.append(item_id)
        self._vectors.append(vector)
        self._stats.append(stats)

    def samples(self, seq: int) -> bool:
        return seq % self.every == 0

    def add(self, q: Query) -> None:
        if self.samples(q.seq):
            self._queries.append(q)

    def pending(self) -> int:
        """Queries not ranked yet: waiting here, on their way, or for item vectors there."""
        return len(self._queries) + sum(self._in_flight) + self._pending

    def ready(self) -> list[Ranked]:
        """Send what was handed in since the last call; the ranks the child has returned."""
        out: list[Ranked] = []
        while self._replies:
            ranks, watermark, pending, unranked, error = self._replies.popleft()
            self._in_flight.popleft()
            self._watermark, self._pending, self._unranked = watermark, pending, unranked
            if error is not None:
                _log.warning("%s: a batch was not ranked: %s", self.name, error)
            out += [
                Ranked(Query(seq, event_id, user, item, None, _NO_STATE, 0.0), rank, n)
                for seq, event_id, user, item, rank, n in ranks
            ]
        self._send()
        return out

    def finish(self, timeout_s: float) -> list[Ranked]:
        """The last ``ready`` before the worker stops: what was handed in is sent, and the
        ranks of every batch sent are waited for, up to ``timeout_s`` (a child kept from its
        core, or stopped, may never answer). Queries still waiting there for another
        worker's item vectors stay unranked, as they would inline."""
        self._send()
        deadline = time.monotonic() + timeout_s
        # Polled: this runs once, on the way out, and a reply takes milliseconds to rank.
        while (
            len(self._replies) < len(self._in_flight)
            and not self._dead.is_set()
            and time.monotonic() < deadline
        ):
            time.sleep(FINISH_POLL_S)
        return self.ready()

    def close(self) -> None:
        """Stop the child once it has taken what was sent (the ranks still coming are
        dropped: nothing sends them any more; ``finish`` first waits for them)."""
        self._closing = True
        self._outbox.put(None)
        self._sender.join(CLOSE_TIMEOUT_S)
        try:
            self._proc.wait(CLOSE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._conn.close()

    # -- the connection ----------------------------------------------------------------------
    def _send(self) -> None:
        if not self._dead.is_set() and self._queued_bytes - self._sent_bytes > GIVE_UP_BYTES:
            self._give_up()
        if self._dead.is_set():
            self._lose()
        if not (self._seqs or self._queries):
            return
        queries = self._queries
        if self._dead.is_set():  # nothing ranks them any more
            self._lost += len(queries)
            self._clear()
            return
        if self._queued_bytes - self._sent_bytes > MAX_BACKLOG_BYTES:
            # Too far behind: its queries are counted, never ranked. The item vectors still
            # go (a gap in them would hold every later rank back).
            self._lost += len(queries)
            queries = []
        batch: _Batch = (
            self._seqs,
            self._items,
            np.stack(self._vectors) if self._vectors else None,
            self._stats,
            queries,
        )
        self._clear()
        payload = pickle.dumps(batch, _PROTOCOL)
        self._in_flight.append(len(queries))
        self._queued_bytes += len(payload)
        self._outbox.put(payload)

    def _clear(self) -> None:
        self._seqs, self._items, self._vectors, self._stats, self._queries = [], [], [], [], []

    def _send_all(self, spec: bytes) -> None:
        """The sending thread: the spec, then each batch, until None (then the child's end)."""
        try:
            self._conn.send_bytes(spec)
            while (payload := self._outbox.get()) is not None:
                self._conn.send_bytes(payload)
                self._sent_bytes += len(payload)
            self._conn.send_bytes(_NONE)
        except OSError:
            self._dead.set()

    def _receive(self) -> None:
        """The receiving thread: the replies, until the child stops."""
        try:
            while True:
                self._replies.append(pickle.loads(self._conn.recv_bytes()))
        except (EOFError, OSError):
            self._dead.set()

    def _give_up(self) -> None:
        """The child has taken nothing for ``GIVE_UP_BYTES`` of batches: it is killed, and
        ``_lose`` counts it as one that died."""
        _log.warning(
            "%s: the ranking process has taken nothing for %d MiB of batches; stopping it",
            self.name,
            GIVE_UP_BYTES >> 20,
        )
        self._proc.kill()
        self._proc.wait()
        self._dead.set()

    def _lose(self) -> None:
        """The child stopped: the batches on their way were not ranked (once every reply it
        wrote has been read), and those still waiting to go are let go."""
        if self._replies or self._reported or self._receiver.is_alive():
            return
        self._reported = True
        self._lost += sum(self._in_flight)
        self._in_flight.clear()
        # The sending thread ends at its first write to the closed socket; what it had not
        # taken would otherwise be held for as long as the worker runs.
        while not self._outbox.empty():
            self._outbox.get_nowait()
        if not self._closing:
            _log.error(
                "%s: the ranking process stopped (exit code %s); the events it would have "
                "ranked are counted as unranked from now on",
                self.name,
                self._proc.poll(),
            )


def _serve(conn: Connection) -> None:
    """The child: a LiveRanks from the first message, then batches until None or EOF."""
    live = LiveRanks(**pickle.loads(conn.recv_bytes()))
    while True:
        try:
            batch: _Batch | None = pickle.loads(conn.recv_bytes())
        except EOFError:
            return
        if batch is None:
            return
        seqs, items, vectors, stats, queries = batch
        error = None
        ranked: list[Ranked] = []
        try:
            if seqs:
                assert vectors is not None
                for seq, item, vector, st in zip(seqs, items, vectors, stats, strict=True):
                    live.item_vector(seq, item, vector, st)
            for q in queries:
                live.add(q)
            ranked = live.ready()
        except Exception as exc:  # a bad input must not end the evaluation of the rest
            # What waits may be what failed: counted, never ranked (nor raised again).
            live.drop_pending()
            error = f"{type(exc).__name__}: {exc}"[:500]
        reply: _Reply = (
            [
                (r.query.seq, r.query.event_id, r.query.user_id, r.query.item_id, r.rank, r.n_items)
                for r in ranked
            ],
            live.watermark,
            live.pending(),
            live.unranked,
            error,
        )
        conn.send_bytes(pickle.dumps(reply, _PROTOCOL))


def main(argv: list[str]) -> None:
    # The worker's process group gets its Ctrl-C; the worker closes this child itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.nice(NICE)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    # One core's worth, like the worker: BLAS or torch threads only contend for the cores.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(1)
    threadpool_limits(1)
    _serve(Connection(int(argv[0])))


if __name__ == "__main__":
    main(sys.argv[1:])

"""Retiring epochs: the rows, index and evaluation of an epoch no message can reach any more.

When a later epoch serves, the earlier one's events are still finishing (an event waits for
its partner's pre-state, a slow worker catches up), so its rows and its ``Serving`` stay
until nothing of it can arrive again. The point is decided per table partition, from what
this worker has itself processed and committed:

- **closed by the router**: the router writes the inboxes in seq order (one transactional
  producer), and every event of epoch E comes before the first event of any later epoch. So
  once this worker committed a router event of a later epoch in inbox partition p, every
  router message of E in p was processed: every entity of p with events in E has its row,
  with each of those events offered to it;
- **finished**: every E row of p is idle (no event waiting for its turn, no partner state
  waiting for its event). A partner's pre-state answers one of the row's own events and is
  consumed when that event is applied, so an idle row of a closed epoch never receives
  another message: E is over in p, whoever owns it next.

Then the worker tombstones E's rows of p in its changelog (a restore, and compaction, drop
them) and deletes them from RocksDB, at most ``JODIE_RETIRE_CHUNK`` rows per transaction,
between batches. An epoch over in every partition the worker owns is **retired**: its
``Serving`` (weights, candidate index, live evaluation) leaves the processor and the item
vectors still read for it are dropped. A partition gained later in which E is not over yet
(its previous owner was behind) brings E's messages back: the worker prepares E again, as a
restarted worker does, and its index then holds E's item vectors from E's start on plus
those that arrive, not those read before the retirement.

The sweep looks at the rows themselves, so it also collects rows of epochs this process
never served (left by an earlier run). What it cannot see is a partition where no router
event of a later epoch arrived since this process started: its earlier epochs stay until one
does (in a steady stream, at once).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from schemas import Codec
from schemas.codec import ENTITY_RECORD
from streams.app.epochs import UNSTAMPED, Epoch, label, split_row_key
from streams.app.processor import Box, Processor, WorkerStats
from streams.runtime.store import Table

_log = logging.getLogger("jodie.worker")
NONE = -(1 << 62)  # an epoch start before any


@dataclass
class _Sweep:
    """One pass over a table partition: first ``check`` (which earlier epochs are over),
    then ``delete`` (their rows)."""

    side: str
    partition: int
    closed: int  # epochs starting before this seq are closed by the router here
    phase: str = "check"
    after: bytes | None = None  # the last key looked at
    found: set[Epoch] = field(default_factory=set)  # closed epochs with rows here
    busy: set[Epoch] = field(default_factory=set)  # ... with a row not idle


class Retirement:
    """Collects the rows of finished epochs and retires epochs over everywhere it owns."""

    def __init__(
        self,
        processor: Processor,
        tables: dict[str, Table[Box]],
        stats: WorkerStats,
        chunk: int = 2_000,
        interval_s: float = 5.0,
    ) -> None:
        """``tables``: side → table."""
        self.processor = processor
        self.tables = tables
        self.stats = stats
        self.chunk = chunk
        self.interval_s = interval_s
        self.codec = Codec(ENTITY_RECORD)
        #: (side, partition) → the latest epoch start of a router event committed there.
        self.routed: dict[tuple[str, int], int] = {}
        #: (side, partition) → no row of an epoch starting before this seq is left there.
        self.clear: dict[tuple[str, int], int] = {}
        self._due: dict[tuple[str, int], float] = {}  # when a partition may be swept again
        self._sweep: _Sweep | None = None
        self.deleted = 0  # rows tombstoned (for metrics)
        self.retired: list[Epoch] = []

    def routed_in(self, routed: dict[tuple[str, int], int]) -> None:
        """A batch committed with router events of these (side, partition) → epoch start."""
        for key, since in routed.items():
            if since > self.routed.get(key, NONE):
                self.routed[key] = since

    def cleared(self, side: str, partition: int, epoch: Epoch) -> bool:
        """Whether ``epoch``'s rows were deleted from ``partition`` of ``side``: closed and
        idle there, it gets no new message, so one of it now is a message read again (after
        a producer was replaced, streams.runtime.loop), which would find no row and apply
        its event a second time from the epoch's start."""
        return epoch != UNSTAMPED and epoch[1] < self.clear.get((side, partition), NONE)

    def step(self) -> None:
        """Between batches: look at up to ``chunk`` rows, then retire what is over."""
        if self._sweep is None:
            self._sweep = self._next()
        if self._sweep is not None:
            self._advance(self._sweep)
        self._retire()

    # -- sweeping -------------------------------------------------------------------------------
    def _next(self) -> _Sweep | None:
        now = time.monotonic()
        for side, table in self.tables.items():
            for p in sorted(table.partitions):
                key = (side, p)
                closed = self.routed.get(key, NONE)
                if closed > self.clear.get(key, NONE) and self._due.get(key, 0.0) <= now:
                    return _Sweep(side, p, closed)
        return None

    def _advance(self, sweep: _Sweep) -> None:
        table = self.tables[sweep.side]
        if sweep.partition not in table.partitions:
            self._sweep = None  # revoked meanwhile: its next owner sweeps it
            return
        rows = table.scan(sweep.partition, sweep.after, self.chunk)
        for key, raw in rows:
            _entity, epoch = split_row_key(key)
            if epoch == UNSTAMPED or epoch[1] >= sweep.closed:
                continue
            if sweep.phase == "check":
                sweep.found.add(epoch)
                if epoch not in sweep.busy and not _idle(self.codec.decode(raw)):
                    sweep.busy.add(epoch)
            elif epoch not in sweep.busy:
                table.delete(sweep.partition, key)
                self.deleted += 1
        sweep.after = rows[-1][0] if rows else sweep.after
        if len(rows) == self.chunk:
            return
        if sweep.phase == "check" and sweep.found - sweep.busy:
            sweep.phase, sweep.after = "delete", None
            return
        at = (sweep.side, sweep.partition)
        self.clear[at] = min([sweep.closed, *(e[1] for e in sweep.busy)])
        if sweep.busy:
            self._due[at] = time.monotonic() + self.interval_s
        over = sorted(label(e) for e in sweep.found - sweep.busy)
        if over:
            _log.info("%s[%d]: rows of %s deleted", sweep.side, sweep.partition, over)
        self._sweep = None

    # -- retiring -------------------------------------------------------------------------------
    def _retire(self) -> None:
        owned = [(side, p) for side, table in self.tables.items() for p in table.partitions]
        servings = self.processor.servings
        if not owned or len(servings) < 2:
            return
        newest = max(e[1] for e in servings)
        for epoch in [e for e in servings if e != UNSTAMPED and e[1] < newest]:
            if all(self.clear.get(key, NONE) > epoch[1] for key in owned):
                self.processor.retire(epoch)
                for table in self.tables.values():
                    # Rows read for an interactive query, say: none may outlive the serving.
                    table.rows.drop(_of_epoch(epoch))
                self.retired.append(epoch)
                for info in self.stats.epochs:
                    if (info["version"], info["since"]) == epoch and "retired_at" not in info:
                        info["retired_at"] = time.time()
                _log.info("retired epoch %s", label(epoch))


def _of_epoch(epoch: Epoch) -> Callable[[tuple[int, bytes]], bool]:
    """Selects the cached rows (partition, key) of ``epoch``."""
    return lambda pk: split_row_key(pk[1])[1] == epoch


def _idle(record: dict[str, object]) -> bool:
    """A row with nothing waiting: every event offered to it applied."""
    return not record["waiting"] and not record["partners"]

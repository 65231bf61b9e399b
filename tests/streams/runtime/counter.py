"""A trivial application on the runtime, for its exactly-once tests: per-key running counts.

Each input record (key k) adds one to k's count, a row of a changelog-backed table, and
sends ``"<count>:<input offset>"`` to the output topic under k. Run as a process, so a test
can kill it with SIGKILL mid-transaction:

    python -m tests.streams.runtime.counter --bootstrap 127.0.0.1:9092 --prefix t- \\
        --state DIR --id 0

It stops by itself once it has held partitions and seen no input for ``--idle`` seconds.
With ``--hold PATH``, once ``PATH.ask`` exists the next transaction, its outputs produced,
creates PATH and waits (a test kills the process then). With ``--overlap`` (the loop's
``LoopConfig.overlap``) that wait is the next batch's processing, the last one's commit in
flight meanwhile: the kill lands once it returned, before its rows reach the local store.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Generic, TypeVar

from streams.runtime.clients import Connection
from streams.runtime.loop import Application, LoopConfig, Output, Record, TransactionalLoop
from streams.runtime.store import Table

R = TypeVar("R")


def topics(prefix: str) -> tuple[str, str, str]:
    """(input, output, the counts table's changelog)."""
    return f"{prefix}in", f"{prefix}out", f"{prefix}counts-changelog"


class OneTable(Application[list[Record]], Generic[R]):
    """An application of one input, one output and one table co-partitioned with the input,
    its batches the records as they come."""

    def __init__(self, source: str, sink: str, table: Table[R]) -> None:
        self.input, self.output, self.table = source, sink, table

    @property
    def inputs(self) -> Sequence[str]:
        return [self.input]

    @property
    def outputs(self) -> Sequence[str]:
        return [self.output]

    @property
    def tables(self) -> Mapping[str, Table[R]]:
        return {self.input: self.table}

    def prepare(self, records: list[Record]) -> list[Record]:
        return records


class Counter(OneTable[int]):
    def __init__(
        self,
        conn: Connection,
        prefix: str,
        state: Path,
        delay_s: float,
        idle_s: float,
        hold: Path | None = None,
    ) -> None:
        source, sink, changelog = topics(prefix)
        self.counts: Table[int] = Table(
            conn,
            "counts",
            changelog,
            state,
            decode=lambda _key, raw: int(raw),
            encode=lambda _key, count: str(count).encode(),
            initial=lambda _key: 0,
        )
        super().__init__(source, sink, self.counts)
        self.delay_s = delay_s
        self.idle_s = idle_s
        self.hold = hold
        self.idle_since: float | None = None  # None: no partitions held
        self.stop: Callable[[], None] = lambda: None

    def poll(self) -> None:
        if self.idle_since is not None and time.monotonic() - self.idle_since > self.idle_s:
            self.stop()

    def process(self, batch: list[Record]) -> Iterator[Output]:
        for record in batch:
            assert record.key is not None
            count = self.counts.get(record.partition, record.key) + 1
            self.counts.put(record.partition, record.key, count)
            yield self.output, record.key, f"{count}:{record.offset}".encode(), None
        time.sleep(self.delay_s)
        if self.hold is not None and self.hold.with_suffix(".ask").exists():
            # The outputs are with the producer, the transaction open: a test asked for this
            # moment to kill the process in, with time for them to reach the broker.
            self.hold.touch()
            time.sleep(5.0)
            self.hold.unlink()
        self.idle_since = time.monotonic()

    def on_assign(self, partitions: list[tuple[str, int]]) -> None:
        self.idle_since = time.monotonic() if self.counts.partitions else None

    def on_revoke(self, partitions: list[tuple[str, int]]) -> None:
        self.on_assign(partitions)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--state", type=Path, required=True)
    parser.add_argument("--id", type=int, default=0)
    parser.add_argument("--batch", type=int, default=25)
    parser.add_argument("--delay", type=float, default=0.1)
    parser.add_argument("--hold", type=Path, help="see the module's docstring")
    parser.add_argument("--idle", type=float, default=4.0)
    parser.add_argument("--max-seconds", type=float, default=120.0)
    parser.add_argument("--overlap", action="store_true", help="LoopConfig.overlap")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    conn = Connection(args.bootstrap)
    app = Counter(conn, args.prefix, args.state, args.delay, args.idle, args.hold)
    loop = TransactionalLoop(
        conn,
        LoopConfig(
            name=f"counter {args.id}",
            group_id=f"{args.prefix}counter",
            transactional_id=f"{args.prefix}counter-{args.id}",
            batch=args.batch,
            overlap=args.overlap,
        ),
        app,
    )
    app.stop = loop.stop
    stats = loop.run(max_seconds=args.max_seconds)
    logging.getLogger("counter").info("stopped: %s", stats)


if __name__ == "__main__":
    main()

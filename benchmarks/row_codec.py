"""Table rows' Avro, per row: fastavro (the Codec) against schemas.wire's direct codec.

Builds the two kinds of row a worker writes at every batch for each entity it changed: a user
row (a 128-float embedding, a full history of --history items, one event waiting with its
172 features and its partner's pre-state) and an item row (embedding, count and trend), then
times, in CPU time, encoding each as the worker does (``inbox_to_record`` and the Codec, or
``inbox_row_bytes``) and decoding it back (the Codec, or ``read_entity_record``). Both ways
give the same bytes (checked here and in tests/schemas/test_wire.py).

Then a busy item's row: --waiting events queued in it (its events waiting for pre-states from
another worker), written again after each change as a worker writes it (the oldest one
applied, one more arriving), the waiting events' bytes taken per entry from the encodings kept
by position (``WaitingBytes``) against the row's whole queue kept (``WaitingBytes.queue``).

    python benchmarks/row_codec.py --rows 20000 [--waiting 100]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np

from operators.protocol.exchange import Inbox, Pending
from operators.protocol.sides import EntityState, EventData, pack_features
from schemas import Codec, wire
from schemas.codec import ENTITY_RECORD
from streams.cli.common import script_main
from streams.records import WaitingBytes, inbox_row_bytes, inbox_to_record

Box = Inbox[EntityState, EntityState]


def rows(history: int) -> dict[str, Box]:
    rng = np.random.default_rng(0)
    emb = rng.standard_normal(128).astype(np.float32)
    items = tuple(f"item-{i}" for i in range(history))
    user: Box = Inbox(
        EntityState(emb, 1.4e9, items, tuple(range(1, history + 1))), applied_seq=900, sent_seq=-1
    )
    features = pack_features(rng.standard_normal(172).tolist())
    event = EventData("ev-901", "user-7", "item-3", 1.4e9 + 60, features)
    user.offer_event(Pending(902, 900, "item-3", event, 850))
    user.partners[902] = EntityState(emb.copy(), 1.4e9 - 5)
    item: Box = Inbox(EntityState(emb.copy(), 1.4e9, events=4_000, trend=17.25), applied_seq=901)
    return {"user": user, "item": item}


def cpu_us(n: int, fn: Callable[..., object], *args: object) -> float:
    start = time.process_time()
    for _ in range(n):
        fn(*args)
    return (time.process_time() - start) / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--history", type=int, default=16, help="ModelConfig.history_size")
    parser.add_argument("--waiting", type=int, default=100, help="events queued in a busy row")
    args = parser.parse_args()
    for name in ("rows", "waiting"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} takes a count of at least 1")
    codec = Codec(ENTITY_RECORD)
    writer = wire.EntityRecordWriter(codec.header)
    start = len(codec.header)
    for kind, box in rows(args.history).items():
        data = codec.encode(inbox_to_record(box, "v1"))
        assert inbox_row_bytes(writer, box, "v1") == data
        assert wire.read_entity_record(data, start) == codec.decode(data)
        n = args.rows
        enc_codec = cpu_us(n, lambda b: codec.encode(inbox_to_record(b, "v1")), box)
        enc_wire = cpu_us(n, inbox_row_bytes, writer, box, "v1")
        dec_codec = cpu_us(n, codec.decode, data)
        dec_wire = cpu_us(n, wire.read_entity_record, data, start, True)  # as the worker
        print(
            f"{kind} row ({len(data)} bytes): encode {enc_codec:.1f} -> {enc_wire:.1f} µs, "
            f"decode {dec_codec:.1f} -> {dec_wire:.1f} µs (CPU per row, fastavro -> direct)"
        )
    busy_queue(writer, args.waiting, args.rows)


def busy_queue(writer: wire.EntityRecordWriter, waiting: int, writes: int) -> None:
    rng = np.random.default_rng(1)
    features = pack_features(rng.standard_normal(172).tolist())
    emb = rng.standard_normal(128).astype(np.float32)

    def event(seq: int) -> Pending:
        data = EventData(f"ev-{seq}", f"user-{seq % 97}", "item-3", 1.4e9 + seq, features)
        return Pending(seq, seq - 1, f"user-{seq % 97}", data, seq - 50)

    timings = {}
    for way in ("per entry", "queue kept"):
        box: Box = Inbox(EntityState(emb, 1.4e9, events=4_000, trend=17.25), applied_seq=0)
        for seq in range(1, waiting + 1):
            box.offer_event(event(seq))
        kept = WaitingBytes()
        written = []  # every 100th write, to check that both ways write the same rows
        start = time.process_time()
        for k in range(writes):
            del box.waiting[k]
            box.offer_event(event(waiting + k + 1))
            if way == "per entry":
                queue = [kept(p) for p in box.waiting.values()]
            else:
                queue = kept.queue(box.waiting)
            row = writer.record(
                emb.tobytes(), 1.4e9, (), (), 4_000, 17.25, k, -1, queue, [], None, "v1", (), ()
            )
            if k % 100 == 0:
                written.append(row)
        timings[way] = (time.process_time() - start) / writes * 1e6
        if way == "per entry":
            expected = written
        else:
            assert written == expected
    print(
        f"a row with {waiting} events waiting, written again after each change: "
        f"{timings['per entry']:.1f} -> {timings['queue kept']:.1f} µs (CPU per write, "
        "the waiting events' bytes per entry -> the queue kept)"
    )


if __name__ == "__main__":
    script_main(main)

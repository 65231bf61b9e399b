"""The worker's CPU cost per event without Kafka: the processor (streams.app.processor) alone.

Builds what the router writes to the two inboxes for rows [--start, --start + --events) of the
bundled Wikipedia file, then feeds them to one Processor that owns every partition (one
worker), --batch inbox messages at a time, rows kept in a dict and round-tripped through their
Avro codec after each batch as the table does, under a worker process's cycle-collector
schedule. Prints CPU seconds per event (process time, so other load on the machine inflates
it less than wall time) and, with --profile, the functions by own CPU time. --items N adds N
synthetic items (random unit vectors, one event each before
the stream) to the candidate index and the live evaluation: the cost per event at a large
catalogue, as in the soak (benchmarks/soak.py; its workers evaluate every 100th event,
JODIE_EVALUATE_EVERY=100).

    python benchmarks/processor_speed.py --checkpoint CKPT --events 10000
    python benchmarks/processor_speed.py --checkpoint CKPT --events 10000 --profile
    JODIE_EVALUATE_EVERY=100 python benchmarks/processor_speed.py --checkpoint CKPT \
        --events 2000 --items 100000 --profile
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from streams.cli.common import script_main
from streams.runtime.collector import CycleCollector
from streams.settings import read_settings


def add_items(serving: Any, ckpt: Any, n: int, t: float) -> None:
    """``n`` synthetic items, each seen once just before ``t``, in the index and the live
    evaluation besides the checkpoint's."""
    import numpy as np

    from operators.evaluation.live import LiveRanks
    from operators.model.static import static_embeddings

    cfg = ckpt.config
    ids = [f"synthetic-{k}" for k in range(n)]
    dyn = np.random.default_rng(0).standard_normal((n, cfg.embedding_dim)).astype(np.float32)
    dyn /= np.linalg.norm(dyn, axis=1, keepdims=True)
    vectors = np.concatenate([dyn, static_embeddings("item", ids, cfg.item_static_dim)], axis=1)
    stats = np.tile(np.array([1.0, 1.0, t - 1.0]), (n, 1))
    serving.upsert(ids, vectors, stats.tolist())
    live = serving.live
    known_ids, known = serving.baseline.item_vectors()
    known_stats = np.stack(serving.baseline.item_stats(known_ids), axis=1)
    serving.live = LiveRanks(
        live.model,
        live.start,
        [*known_ids, *ids],
        np.concatenate([known, vectors]),
        np.concatenate([known_stats, stats]),
        live.scorer,
        every=live.every,
    )


def count(text: str) -> int:
    """An argparse type: a whole number of at least 1 (a one-line error otherwise)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a count of at least 1")
    return value


def workload_arguments(parser: argparse.ArgumentParser) -> None:
    """What chooses the workload: the model, the stretch of Wikipedia, the catalogue."""
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--start", type=int, default=125_979)
    parser.add_argument("--events", type=count, default=10_000)
    parser.add_argument("--batch", type=count, default=2000, help="inbox messages per batch")
    parser.add_argument("--items", type=int, default=0, help="synthetic items to add")


def workload(args: argparse.Namespace) -> tuple[Any, list[tuple[str, bytes, bytes]]]:
    """A Processor that owns every partition, and the inbox messages (side, key, value) the
    router writes for the events, interleaved as a worker reads them."""
    os.environ.setdefault("JODIE_STATE_DIR", "/nonexistent")

    from operators.dataset import bundled_wikipedia, load_interactions
    from operators.model.checkpoint import load_checkpoint
    from operators.protocol.sequencer import Interaction, Sequencer
    from schemas import Codec
    from schemas.codec import INBOX_MESSAGE
    from streams.app.epochs import UNSTAMPED
    from streams.app.processor import Processor, WorkerStats
    from streams.app.serving import Serving, model_version
    from streams.records import inbox_event
    from streams.router import event_data_of

    settings = read_settings()
    ckpt = load_checkpoint(args.checkpoint)
    serving = Serving.of(settings, ckpt, model_version(ckpt), None)
    log = load_interactions(bundled_wikipedia())
    if args.items:
        add_items(serving, ckpt, args.items, float(log.timestamps[args.start]))
    proc = Processor(settings, serving, WorkerStats())
    seq = Sequencer(partitions=[0], n_features=log.features.shape[1])
    for n, k in enumerate(range(args.start, args.start + args.events)):
        seq.offer(
            0,
            Interaction(
                f"e{k:06d}",
                str(log.user_ids[k]),
                str(log.item_ids[k]),
                float(log.timestamps[k]),
                tuple(float(x) for x in log.features[k]),
                None,
            ),
            n,
        )
    codec = Codec(INBOX_MESSAGE)
    messages: list[tuple[str, bytes, bytes]] = []
    for e in seq.drain(idle={0}).sequenced:
        data = event_data_of(e.event)
        for side, key, prev, partner_prev in (
            ("user", data.user_id, e.prev_user_seq, e.prev_item_seq),
            ("item", data.item_id, e.prev_item_seq, e.prev_user_seq),
        ):
            body = {
                "event": inbox_event(e.seq, prev, partner_prev, data),
                "partner": None,
                "model_version": UNSTAMPED[0],
                "model_since": UNSTAMPED[1],
            }
            messages.append((side, key.encode(), codec.encode(body)))
    # The router writes each event to both inboxes; a worker reads them interleaved.
    users = [m for m in messages if m[0] == "user"]
    items = [m for m in messages if m[0] == "item"]
    return proc, [m for pair in zip(users, items, strict=True) for m in pair]


def apply(
    proc: Any, stream: list[tuple[str, bytes, bytes]], batch: int, between: Callable[[], Any]
) -> int:
    """Feed ``stream`` to ``proc`` ``batch`` messages at a time, rows kept in a dict and
    encoded after each batch as the table does, ``between`` called after each; the number
    of outputs."""
    from streams.app.epochs import epoch_of, row_key
    from streams.app.processor import Box

    rows: dict[tuple[str, bytes], Box] = {}
    changed: set[tuple[str, bytes]] = set()

    def local(side: str, key: bytes) -> Box | None:
        row = rows.get((side, key))
        if row is None:
            row = rows[(side, key)] = proc.initial(side)(key)
        changed.add((side, key))
        return row

    sent = 0
    for b in range(0, len(stream), batch):
        work = []
        for side, key, value in stream[b : b + batch]:
            message = proc.read(value)
            rkey = row_key(key, epoch_of(message))
            work.append((side, epoch_of(message), local(side, rkey), message))
        out = proc.process(work, local)
        sent += len(out)
        for side, rkey in changed:  # what the table writes to its changelog
            proc.encode(rkey, rows[(side, rkey)])
        changed.clear()
        between()
    return sent + len(proc.flush())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    workload_arguments(parser)
    parser.add_argument("--profile", action="store_true", help="print the top functions")
    parser.add_argument("--top", type=int, default=40)
    args = parser.parse_args()
    proc, stream = workload(args)

    settings = read_settings()
    # The cycle collector on a worker process's schedule (young passes rarer, the full one
    # between batches): with CPython's default one, a fifth of this loop's CPU was collection.
    collector = CycleCollector(settings.gc_full_every_s)
    collector.freeze()
    profile = cProfile.Profile(time.process_time) if args.profile else None
    cpu0, wall0 = time.process_time(), time.monotonic()
    if profile is not None:
        profile.enable()
    sent = apply(proc, stream, args.batch, collector.poll)
    if profile is not None:
        profile.disable()
    cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
    n = proc.stats.user_events
    print(
        f"{n} events, {sent} outputs, batch {args.batch} messages: CPU {cpu:.2f} s = "
        f"{1e6 * cpu / n:,.0f} µs/event ({n / cpu:,.0f} events/s per core); wall {wall:.2f} s; "
        f"live MRR {proc.stats.ranks.summary()['mrr']:.4f}, load {os.getloadavg()[0]:.1f}; "
        f"cycle collector {sum(collector.seconds):.2f} s"
    )
    collector.close()
    if profile is not None:
        pstats.Stats(profile).sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    script_main(main)

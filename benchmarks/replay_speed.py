"""Replay speed of interactions.log against reading the same events from the CSV.

Produces the bundled Wikipedia file (157,474 events) to fresh topics (a unique
JODIE_TOPIC_PREFIX, deleted at the end) and routes it into interactions.log; then measures
events/s of `streams.replay.replay_log` (read_committed consumer, Avro decoding, canonical
order: what `jodie train --from-topic` reads) next to `operators.dataset.load_interactions`
on the CSV, best of --repeat runs each, and checks both give the same rows.

    jodie broker up
    python benchmarks/replay_speed.py [--repeat 3]
    jodie broker down
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from operators.dataset import bundled_wikipedia, load_interactions
from schemas import INTERACTION
from streams.codecs import make_codec
from streams.produce import produce_file
from streams.replay import replay_log
from streams.router import Router
from streams.runtime.clients import idempotent_producer
from streams.topics import scratch_topics

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--repeat", type=int, default=3)
args = parser.parse_args()

# Fresh topics of its own, deleted at the end.
with scratch_topics("bench") as settings:
    path = bundled_wikipedia()
    topic = settings.topic("interactions")
    began = time.monotonic()
    produced = produce_file(
        path, idempotent_producer(settings), make_codec(settings, INTERACTION, topic), topic
    )
    routed = Router(settings, grace_s=0.2).run(until_idle_s=1.0, max_seconds=600)
    print(
        f"produced and routed     {routed.sequenced:,} events in {time.monotonic() - began:.1f} s"
    )
    assert routed.sequenced == produced.events

    replay_s, csv_s = [], []
    for _ in range(args.repeat):
        replayed = replay_log(settings)
        replay_s.append(replayed.seconds)
        started = time.perf_counter()
        csv = load_interactions(path)
        csv_s.append(time.perf_counter() - started)
    n = len(csv)
    assert len(replayed.log) == n and replayed.log.user_ids.tolist() == csv.user_ids.tolist()
    assert np.array_equal(replayed.log.timestamps, csv.timestamps)
    print(f"events                  {n:,}")
    print(
        f"replay interactions.log {n / min(replay_s):,.0f} events/s  "
        f"(best of {args.repeat}: {', '.join(f'{s:.2f}' for s in replay_s)} s)"
    )
    print(
        f"read the CSV            {n / min(csv_s):,.0f} events/s  "
        f"(best of {args.repeat}: {', '.join(f'{s:.2f}' for s in csv_s)} s)"
    )

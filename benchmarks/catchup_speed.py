"""Catch-up speed: a checkpoint's states advanced over later Wikipedia events, one event at a
time (the frozen evaluation's loop) against t-batches (what a switching worker runs).

Trains the default model for one epoch on the first --history events (a checkpoint replayed
from the log at that position), then advances its states over the next --events events both
ways and prints events/s and the largest difference between the two results.

    python benchmarks/catchup_speed.py [--history 20000] [--events 30000]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from operators.dataset import bundled_wikipedia, load_interactions
from operators.model.checkpoint import load_checkpoint
from operators.model.config import TrainConfig
from operators.protocol import catchup
from operators.protocol.catchup import CatchUp, LogEvent
from operators.training.run import run_training
from streams.cli.common import script_main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--history", type=int, default=20_000)
    parser.add_argument("--events", type=int, default=30_000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    log = load_interactions(bundled_wikipedia())
    head, stop = args.history, args.history + args.events
    out = Path(tempfile.mkdtemp(prefix="jodie-catchup-")) / "ck"
    run_training(
        log.slice(0, head), TrainConfig(epochs=1, progress=False), out, seqs=np.arange(head)
    )
    events = [
        LogEvent(
            s,
            str(log.user_ids[s]),
            str(log.item_ids[s]),
            float(log.timestamps[s]),
            tuple(log.features[s].tolist()),
        )
        for s in range(head, stop)
    ]
    results = {}
    for name, tbatch_min in (("one_by_one", 1 << 62), ("tbatches", catchup.TBATCH_MIN)):
        catchup.TBATCH_MIN = tbatch_min
        cu = CatchUp(load_checkpoint(out))
        for e in events:
            cu.offer(e)
        began = time.perf_counter()
        assert cu.advance(stop) == stop
        took = time.perf_counter() - began
        results[name] = (cu.states, took)
    (a, ta), (b, tb) = results["one_by_one"], results["tbatches"]
    diff = max(
        float((getattr(a, side).emb - getattr(b, side).emb).abs().max())
        for side in ("users", "items")
    )
    print(
        json.dumps(
            {
                "events": args.events,
                "one_by_one_events_per_s": round(args.events / ta),
                "tbatches_events_per_s": round(args.events / tb),
                "speedup": round(ta / tb, 1),
                "max_abs_diff": diff,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    script_main(main)

"""Live evaluation vs offline: streaming MRR and Recall@10 next to the frozen protocol.

Streams rows [--start, end) of the bundled Wikipedia file through produce → router → worker(s)
from a checkpoint whose states end at --start (a model trained on the first 80 % by default),
reads the `rank` of every event from the `evaluations` topic (the true item's rank against the
query made before the event, every item at its state at the event), and replays the same
events offline with the frozen protocol and the checkpoint's default ranker (the one the
workers serve); prints both on the same events (the workers' sample, JODIE_EVALUATE_EVERY) and
on all, the share of events whose ranks are identical, and what users were served: each
event's position in the list its user got before it, live (from the recommendations) and
offline (the same replay), next to the recent-then-popular heuristic's.

    jodie broker up
    python benchmarks/stream_quality.py --checkpoint CKPT [--workers 1] [--limit N]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from operators.dataset import bundled_wikipedia, load_interactions
from operators.evaluation.metrics import mrr, recall_at_k
from operators.evaluation.protocols import frozen_replay
from operators.evaluation.scorer import make_scorer
from operators.evaluation.served import ServedLists
from operators.model.checkpoint import load_checkpoint
from streams.cli.common import script_main
from streams.produce import produce_rows
from streams.router import Router
from streams.tail import summarise, tail
from streams.topics import scratch_topics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--start", type=int, default=None, help="default: the checkpoint's")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=1800)
    args = parser.parse_args()

    ckpt = load_checkpoint(args.checkpoint)
    start = args.start if args.start is not None else int(ckpt.meta["log_offsets"]["events"])
    log = load_interactions(bundled_wikipedia())
    stop = len(log) if args.limit is None else min(len(log), start + args.limit)
    n = stop - start

    os.environ["JODIE_STATE_DIR"] = tempfile.mkdtemp(prefix="jodie-quality-")
    with scratch_topics("quality") as settings:
        workers: list[subprocess.Popen[bytes]] = []
        try:
            produce_rows(settings, start=start, limit=n)
            Router(settings, grace_s=0.2).run(until_idle_s=1.0, max_seconds=args.timeout)
            began = time.monotonic()
            for w in range(args.workers):
                cmd = [sys.executable, "-m", "streams", "worker"]
                cmd += ["--checkpoint", str(args.checkpoint), "--id", str(w)]
                workers.append(
                    subprocess.Popen(
                        cmd,
                        env={**os.environ, "JODIE_WEB_PORT": str(17066 + w)},
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                )
            recs: list[dict] = []
            while time.monotonic() - began < args.timeout:
                recs = list(tail(settings, "recommendations", idle_timeout_s=2.0))
                if len(recs) >= n:
                    break
                time.sleep(2.0)
            took = time.monotonic() - began
            # Each event's live rank, by log position (the seq the router gave it); the last
            # ones follow the last recommendations by a transaction.
            evaluations: dict[int, int] = {}
            every = settings.evaluate_every  # the workers' sample: seqs that are multiples
            expected = (n + every - 1) // every
            while len(evaluations) < expected and time.monotonic() - began < args.timeout:
                evaluations = {
                    int(e["seq"]): int(e["rank"])
                    for e in tail(settings, "evaluations", idle_timeout_s=2.0)
                }
        finally:
            for proc in workers:
                proc.send_signal(signal.SIGTERM)
            for proc in workers:
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()

    by_event = {r["event_id"]: r for r in recs}
    seqs = np.array(sorted(evaluations), dtype=np.int64)
    stream_ranks = np.array([evaluations[s] for s in seqs.tolist()], dtype=np.int64)

    began_offline = time.monotonic()
    ckpt = load_checkpoint(args.checkpoint)
    lists = ServedLists((None,), k=10)
    ranker = make_scorer(ckpt.config, ckpt.scorer_tensors)
    offline, _ = frozen_replay(
        ckpt.model.eval(), ckpt.states, log.slice(start, stop), ranker, 0, lists
    )
    offline_s = time.monotonic() - began_offline
    # The workers evaluate the events whose seq is a multiple of JODIE_EVALUATE_EVERY: the
    # stream's seqs count the events from the start, so seq k is the k-th event offline.
    offline_all = offline
    offline = offline_all[seqs[seqs < offline_all.shape[0]]]
    out = {
        "events": n,
        "recommendations": len(recs),
        "distinct_events": len(by_event),
        "workers": args.workers,
        "stream_wall_s": round(took, 1),
        "stream": {"mrr": mrr(stream_ranks), "recall_at_10": recall_at_k(stream_ranks, 10)},
        "evaluated": int(stream_ranks.shape[0]),
        "frozen": {"mrr": mrr(offline), "recall_at_10": recall_at_k(offline, 10)},
        "frozen_all_events": {
            "mrr": mrr(offline_all),
            "recall_at_10": recall_at_k(offline_all, 10),
        },
        "frozen_wall_s": round(offline_s, 1),
        "served_live": summarise(recs, [])["served"],
        "served_offline": {
            k: v for k, v in lists.summary().items() if k in ("covered", "by_horizon", "heuristic")
        },
    }
    out["abs_diff"] = {k: abs(out["stream"][k] - out["frozen"][k]) for k in ("mrr", "recall_at_10")}
    out["events_equal_rank"] = (
        float(np.mean(stream_ranks == offline)) if stream_ranks.shape == offline.shape else None
    )
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    script_main(main)

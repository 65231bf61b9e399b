"""Fuzzing at length: hostile messages among valid Wikipedia events through router and workers.

The longer mode of tests/streams/test_fuzz.py: --hostile messages of every kind in
streams.hostile, interleaved with --valid rows of the bundled file after --start (by default
where the checkpoint's states end), go to `interactions`; the router runs in this process and
--workers worker processes alongside it. Prints the per-kind table: messages sent by kind,
DLQ messages by reason against the expected counts, router and worker crashes,
recommendations, and the largest difference between the streamed states and the sequential
replay of the valid events alone. Exits 1 when any of it is off.

    jodie broker up
    python benchmarks/fuzz.py --checkpoint CKPT [--hostile 100000] [--valid 20000] [--workers 2]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from itertools import islice
from pathlib import Path

import numpy as np

from operators.dataset import bundled_wikipedia, iter_rows
from operators.model.checkpoint import load_checkpoint
from operators.model.online import OnlineJodie
from schemas import INTERACTION
from streams.cli.common import script_main
from streams.codecs import make_codec
from streams.hostile import MESSAGE_MAX_BYTES, Outcome, fingerprint, hostile_stream, report
from streams.peek import read_with_headers
from streams.produce import produce_messages, source_tag
from streams.router import Router, dlq_copy
from streams.state_export import collect
from streams.tail import tail
from streams.topics import scratch_topics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--hostile", type=int, default=100_000)
    parser.add_argument("--valid", type=int, default=20_000)
    parser.add_argument("--start", type=int, default=None, help="default: the checkpoint's")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=1800)
    args = parser.parse_args()

    ckpt = load_checkpoint(args.checkpoint)
    start = args.start if args.start is not None else int(ckpt.meta["log_offsets"]["events"])
    path = bundled_wikipedia()
    rows = list(islice(iter_rows(path), start, start + args.valid))
    began = time.monotonic()

    os.environ["JODIE_STATE_DIR"] = tempfile.mkdtemp(prefix="jodie-fuzz-")
    with scratch_topics("fuzz") as settings:
        codec = make_codec(settings, INTERACTION, settings.topic("interactions"))
        stream = hostile_stream(rows, source_tag(path), codec, args.hostile, seed=args.seed)
        produce_messages(settings, [(m.key, m.value) for m in stream.messages], MESSAGE_MAX_BYTES)
        print(f"sent {len(stream.messages)} messages in {time.monotonic() - began:.1f} s")
        workers: list[subprocess.Popen[bytes]] = []
        router_errors, exits = 0, 0
        recs: list[dict] = []
        try:
            for w in range(args.workers):
                cmd = [sys.executable, "-m", "streams", "worker"]
                cmd += ["--checkpoint", str(args.checkpoint), "--id", str(w)]
                env = {**os.environ, "JODIE_WEB_PORT": str(18066 + w)}
                workers.append(
                    subprocess.Popen(
                        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
                    )
                )
            try:
                stats = Router(settings, grace_s=0.2).run(
                    until_idle_s=1.0, max_seconds=args.timeout
                )
                sequenced = stats.sequenced
            except Exception as exc:  # the figure to report: any way the router stops
                print(f"router raised {type(exc).__name__}: {exc}")
                router_errors, sequenced = 1, 0
            deadline = time.monotonic() + args.timeout
            while time.monotonic() < deadline and any(w.poll() is None for w in workers):
                recs = list(tail(settings, "recommendations", idle_timeout_s=2.0))
                if len(recs) >= len(rows):
                    break
                time.sleep(2.0)
            exits = sum(w.poll() is not None for w in workers)
        finally:
            for proc in workers:
                proc.send_signal(signal.SIGTERM)
            for proc in workers:
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
        recs = list(tail(settings, "recommendations", idle_timeout_s=2.0))
        dlq = list(read_with_headers(settings, settings.topic("interactions.dlq")))
        got = Counter((h.get("reason", b"").decode(), fingerprint(k, v)) for k, v, h in dlq)
        want = Counter(
            (str(m.reason), fingerprint(*dlq_copy(m.key, m.value or b"")[:2]))
            for m in stream.hostile
        )
        streamed = collect(settings, args.checkpoint)

    online = OnlineJodie(ckpt.model, ckpt.states)
    for r in rows:
        online.observe(r.user_id, r.item_id, r.timestamp)
    diff = 0.0
    for side, store in (("user", online.states.users), ("item", online.states.items)):
        ids = streamed[f"{side}_ids"].tolist()
        known = [i for i in store.ids if not np.isnan(store.last_time[store.row(i)])]
        if sorted(ids) != sorted(known):
            diff = float("inf")  # streamed states for other entities than the replay's
            continue
        want_emb = np.stack([store.emb[store.row(i)].numpy() for i in ids])
        diff = max(diff, float(np.abs(streamed[f"{side}_embeddings"] - want_emb).max()))

    by_event = Counter(str(r["event_id"]) for r in recs)
    outcome = Outcome(
        dlq_by_reason=Counter(reason for reason, _ in got.elements()),
        dlq_unexpected=sum((got - want).values()) + sum((want - got).values()),
        sequenced=sequenced,
        recommendations=len(recs),
        distinct_recommended=len(by_event),
        router_errors=router_errors,
        worker_exits=exits,
        max_state_diff=diff,
        seconds=time.monotonic() - began,
    )
    print(report(stream, outcome))
    ok = (
        not router_errors
        and not exits
        and got == want
        and by_event == Counter(stream.valid_ids)
        and diff <= 1e-4
    )
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    script_main(main)

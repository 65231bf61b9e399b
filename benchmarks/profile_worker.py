"""Where one worker's time goes: cProfile of a worker applying N Wikipedia events.

On fresh topics of the local broker (`jodie broker up` first), produces and routes rows
[--start, --start + N) of the bundled file, then runs one worker in this process under
cProfile until it has applied all of them, and prints the wall time, the live MRR and the
functions by cumulative time.

    python benchmarks/profile_worker.py --checkpoint CKPT --events 10000
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import tempfile
import threading
import time
from pathlib import Path

from streams.cli.common import script_main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--start", type=int, default=125_979)
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--top", type=int, default=35)
    parser.add_argument("--sort", default="cumulative", help="pstats order: cumulative, tottime")
    args = parser.parse_args()
    os.environ["JODIE_STATE_DIR"] = tempfile.mkdtemp(prefix="jodie-profile-")

    from streams.produce import produce_rows
    from streams.router import Router
    from streams.topics import scratch_topics
    from streams.worker import Worker

    with scratch_topics("prof") as settings:
        produce_rows(settings, start=args.start, limit=args.events)
        Router(settings, grace_s=0.2).run(until_idle_s=0.5, max_seconds=300)
        worker = Worker(settings, 0, args.checkpoint)
        began = time.monotonic()

        def stop_when_done() -> None:
            while worker.stats.user_events < args.events and time.monotonic() - began < 600:
                time.sleep(0.2)
            worker.stop()

        threading.Thread(target=stop_when_done, daemon=True).start()
        profile = cProfile.Profile(time.process_time)
        profile.enable()
        worker.run()
        profile.disable()
        took = time.monotonic() - began
        online = worker.stats.ranks.summary()
        print(
            f"{worker.stats.user_events} events in {took:.1f} s "
            f"({worker.stats.user_events / took:,.0f} events/s, start-up included), "
            f"{worker.loop.stats.transactions} transactions, live MRR {online['mrr']:.4f}"
        )
        pstats.Stats(profile).sort_stats(args.sort).print_stats(args.top)


if __name__ == "__main__":
    script_main(main)

"""Local broker start-up: cold (jars downloaded from Maven Central) and warm, plus jar cache size.

Cold uses an empty jodie cache and an empty Maven local repository, so every jar comes from
Maven Central; warm starts the same broker again from its formatted storage. Ports 39092/3.

    python benchmarks/broker_start.py
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from deploy.kafka import broker
from streams.cli.common import script_main


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    scratch = Path(tempfile.mkdtemp(prefix="jodie-broker-bench-"))
    os.environ["MAVEN_OPTS"] = f"-Dmaven.repo.local={scratch / 'm2'}"
    cfg = broker.BrokerConfig(
        cache_dir=scratch / "cache",
        kafka_version="4.4.0",
        port=39092,
        controller_port=39093,
        heap="768m",
        start_timeout_s=180,
    )
    try:
        began = time.monotonic()
        broker.fetch_jars(cfg)
        fetched = time.monotonic() - began
        _, started = broker.up(cfg)
        cold = time.monotonic() - began
        assert started
        print(f"cold start: {cold:.1f} s (of which jar download {fetched:.1f} s)")
        print(f"jar cache: {_size(broker.jars_dir(cfg)) / 2**20:.1f} MiB")
        broker.down(cfg)
        began = time.monotonic()
        broker.up(cfg)
        print(f"warm start: {time.monotonic() - began:.1f} s")
    finally:
        broker.down(cfg, purge=True)


if __name__ == "__main__":
    script_main(main)

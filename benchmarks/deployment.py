"""Deployment: the Procfile under `honcho start` for --minutes; every process alive, lag bounded.

Runs `honcho start` with the project's Procfile (broker, router, two workers, the looping
producer at 500 events/s, the trainer) as a user would, on a pipeline of its own: a fresh
JODIE_TOPIC_PREFIX, and the workers' state and the model store under --out. The first
deployment promotes a trained checkpoint: --checkpoint, else JODIE_CHECKPOINT, else one
trained here first (`jodie train --epochs 1`, about two minutes).

Every 10 s it samples, from Kafka alone: whether each Procfile process is alive (honcho's
shell for that line; honcho names its pid when it starts it), the events sent to
`interactions`, the router's backlog (`interactions` not yet sequenced: its group's committed
offsets against the partitions' ends), the workers' inbox lag (their group's committed
offsets against the ends of user-inbox and item-inbox) and the recommendations committed (a
read_committed reader counting them). It prints a table, and a verdict: every process alive
at every sample, and the lag bounded — over the last half of the run the inbox lag grows at
most 2 % as fast as messages arrive in the inboxes (least-squares slope). At the end it stops
honcho and every process group it started (SIGTERM, then SIGKILL), and removes the local
broker's data if the run created it.

The Procfile starts the local broker itself, so none may run on JODIE_BROKER_PORT; pick free
ports for a side-by-side run:

    JODIE_BROKER_PORT=29092 JODIE_CONTROLLER_PORT=29093 JODIE_WEB_PORT=29094 \
        python benchmarks/deployment.py --minutes 10 --out deploy-10
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from deploy.kafka import broker as local
from streams.cli.common import script_main
from streams.runtime.clients import committed_reader
from streams.runtime.kafka import watermarks
from streams.settings import Settings, read_settings
from streams.topics import app_id

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_S = 10.0
PROCESSES = ("broker", "router", "worker0", "worker1", "producer", "trainer")
BOUNDED_SHARE = 0.02  # lag growth, as a share of the inboxes' arrival rate, still "bounded"
_STARTED = re.compile(r"\b(\w+)(?:\.\d+)? started \(pid=(\d+)\)")
_STOPPED = re.compile(r"\b(\w+)(?:\.\d+)? stopped \(rc=(-?\d+)\)")


@dataclass
class Sample:
    t_s: float
    alive: dict[str, bool]
    sent: int | None = None
    backlog: int | None = None  # interactions not yet sequenced by the router
    inbox_in: int | None = None  # messages written to the inboxes so far
    lag: int | None = None  # inbox messages the workers have not committed
    recommended: int = 0
    load: float = 0.0  # the machine's 1-minute load average (other work slows the pipeline)


@dataclass
class Honcho:
    """`honcho start` in a session of its own, its output in a file."""

    proc: subprocess.Popen[bytes]
    log: Path
    pids: dict[str, int] = field(default_factory=dict)
    stopped: dict[str, int] = field(default_factory=dict)

    def scan(self) -> None:
        text = self.log.read_text(errors="replace")
        for name, pid in _STARTED.findall(text):
            self.pids[name] = int(pid)
        for name, rc in _STOPPED.findall(text):
            self.stopped[name] = int(rc)

    def alive(self, name: str) -> bool:
        pid = self.pids.get(name)
        if pid is None or name in self.stopped:
            return False
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return False
        return state != "Z"

    def stop(self) -> None:
        """SIGTERM to honcho (it stops its processes), then SIGKILL to any group left."""
        groups = [self.proc.pid, *self.pids.values()]
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=30)
        for pgid in groups:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                continue
        if self.proc.poll() is None:
            self.proc.wait(timeout=30)


class Counter:
    """Counts the committed messages of a topic, read_committed, in a thread."""

    def __init__(self, settings: Settings, topic: str) -> None:
        self.settings, self.topic, self.count = settings, topic, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="counter", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        consumer = committed_reader(self.settings, group_id=f"deploy-count-{uuid.uuid4().hex[:8]}")
        consumer.subscribe([self.topic])
        try:
            while not self._stop.is_set():
                for msg in consumer.consume(10_000, timeout=1.0):
                    err = msg.error()
                    if err is None:
                        self.count += 1
                    elif err.code() not in (
                        KafkaError._PARTITION_EOF,
                        KafkaError.UNKNOWN_TOPIC_OR_PART,
                    ):
                        raise KafkaException(err)
        finally:
            consumer.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


class Lags:
    """Consumer groups' committed offsets against the ends of their topics.

    One consumer per group asks for its committed offsets; none of them ever subscribes,
    so none joins the group it reads.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.router = committed_reader(settings, group_id=f"{settings.topic_prefix}jodie-router")
        self.workers = committed_reader(settings, group_id=f"{app_id(settings)}-workers")

    def of(self, group: Consumer, topics: list[str]) -> tuple[int, int]:
        """(messages in ``topics``, those the group has not committed), over all partitions.

        The commits are read before the ends, so a commit made in between cannot pass them.
        """
        parts: list[TopicPartition] = []
        for topic in topics:
            meta = group.list_topics(topic, timeout=10).topics[topic]
            if meta.error is not None:
                raise KafkaException(meta.error)
            parts += [TopicPartition(topic, p) for p in sorted(meta.partitions)]
        committed = group.committed(parts, 10)
        ends = [watermarks(group, tp)[1] for tp in parts]
        lag = sum(end - max(c.offset, 0) for end, c in zip(ends, committed, strict=True))
        return sum(ends), lag

    def sample(self, row: Sample) -> None:
        topic = self.settings.topic
        try:
            sent, backlog = self.of(self.router, [topic("interactions")])
            inbox_in, lag = self.of(self.workers, [topic("user-inbox"), topic("item-inbox")])
        except KafkaException:
            return  # topics not there yet: figures left blank
        row.sent, row.backlog, row.inbox_in, row.lag = sent, backlog, inbox_in, lag

    def close(self) -> None:
        self.router.close()
        self.workers.close()


def train(out: Path) -> Path:
    print(f"training a checkpoint (1 epoch) into {out} ...", flush=True)
    subprocess.run(
        [sys.executable, "-m", "streams", "train", "--epochs", "1", "--out", str(out)],
        check=True,
        cwd=ROOT,
    )
    return out


@contextmanager
def honcho(env: dict[str, str], log: Path) -> Iterator[Honcho]:
    with log.open("wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "honcho", "start", "-f", str(ROOT / "Procfile")],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    run = Honcho(proc, log)
    try:
        yield run
    finally:
        run.stop()


def fmt(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def verdict(rows: list[Sample]) -> tuple[bool, bool, str]:
    """(all alive, lag bounded, the figures behind the second)."""
    all_alive = all(all(r.alive.values()) for r in rows)
    half = [r for r in rows if r.t_s >= rows[-1].t_s / 2 and r.lag is not None]
    if len(half) < 3:
        return all_alive, False, "too few samples with a lag in the last half"
    t = np.array([r.t_s for r in half])
    lag = np.array([r.lag for r in half], dtype=float)
    arrived = np.array([r.inbox_in for r in half], dtype=float)
    slope = float(np.polyfit(t, lag, 1)[0])
    rate = float((arrived[-1] - arrived[0]) / max(t[-1] - t[0], 1e-9))
    bounded = rate > 0 and slope <= BOUNDED_SHARE * rate
    return (
        all_alive,
        bounded,
        f"last half: inbox lag {slope:+,.0f} messages/s against {rate:,.0f} messages/s "
        f"arriving in the inboxes (bounded: growth at most {BOUNDED_SHARE:.0%} of arrivals)",
    )


def watch(run: Honcho, settings: Settings, seconds: float) -> list[Sample]:
    """A sample every SAMPLE_S for ``seconds``, printed as it comes; the Kafka readers start
    once the broker answers and are closed before the broker stops."""
    rows: list[Sample] = []
    lags: Lags | None = None
    counter: Counter | None = None
    began = time.monotonic()
    try:
        next_at = began + SAMPLE_S
        while time.monotonic() < began + seconds:
            time.sleep(max(0.0, next_at - time.monotonic()))
            next_at += SAMPLE_S
            if lags is None and local.probe(settings.bootstrap_servers):
                lags = Lags(settings)
                counter = Counter(settings, settings.topic("recommendations"))
            run.scan()
            r = Sample(
                time.monotonic() - began,
                {n: run.alive(n) for n in PROCESSES},
                recommended=0 if counter is None else counter.count,
                load=os.getloadavg()[0],
            )
            if lags is not None:
                lags.sample(r)
            rows.append(r)
            down = [n for n, ok in r.alive.items() if not ok]
            print(
                f"{r.t_s:6.0f} s  alive {len(PROCESSES) - len(down)}/{len(PROCESSES)}"
                f"{' (down: ' + ', '.join(down) + ')' if down else ''}  sent {fmt(r.sent)}  "
                f"router backlog {fmt(r.backlog)}  inbox lag {fmt(r.lag)}  "
                f"recommended {fmt(r.recommended)}  load {r.load:.1f}",
                flush=True,
            )
    finally:
        if counter is not None:
            counter.stop()
        if lags is not None:
            lags.close()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None, help="logs, state and model store")
    args = parser.parse_args()

    settings = read_settings()
    cfg = local.BrokerConfig.from_settings(settings)
    if local.status(cfg).running:
        sys.exit(
            f"a local broker already runs on port {settings.broker_port}; the Procfile starts "
            "its own: stop it (jodie broker down) or set JODIE_BROKER_PORT / "
            "JODIE_CONTROLLER_PORT to free ports"
        )
    broker_existed = cfg.home.exists()
    out = args.out or Path(tempfile.mkdtemp(prefix="jodie-deploy-"))
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = args.checkpoint or (
        Path(os.environ["JODIE_CHECKPOINT"]) if os.environ.get("JODIE_CHECKPOINT") else None
    )
    if checkpoint is None:
        checkpoint = train(out / "model")
    prefix = f"deploy-{uuid.uuid4().hex[:6]}-"
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "JODIE_CHECKPOINT": str(checkpoint.resolve()),
        "JODIE_TOPIC_PREFIX": prefix,
        "JODIE_STATE_DIR": str((out / "state").resolve()),
        "JODIE_MODEL_STORE": str((out / "store").resolve()),
    }
    run_settings = Settings(topic_prefix=prefix)
    print(
        f"honcho start: topics {prefix}*, broker 127.0.0.1:{settings.broker_port}, workers' "
        f"HTTP from port {settings.web_port}, logs in {out / 'honcho.log'}; "
        f"{args.minutes:g} minutes, a sample every {SAMPLE_S:g} s",
        flush=True,
    )
    try:
        with honcho(env, out / "honcho.log") as run:
            rows = watch(run, run_settings, args.minutes * 60)
    finally:
        if not broker_existed:
            shutil.rmtree(cfg.home, ignore_errors=True)
    report(rows, out)
    return 0


def report(rows: list[Sample], out: Path) -> None:
    head = ["sent", "ev/s", "backlog", "inbox lag", "recommended", "rec/s", "load"]
    widths = [9, 6, 9, 10, 12, 6, 5]
    print("\n   t s  " + " ".join(f"{n[:7]:>7}" for n in PROCESSES), end="  ")
    print(" ".join(f"{h:>{w}}" for h, w in zip(head, widths, strict=True)))
    prev: Sample | None = None
    for r in rows:
        alive = " ".join(f"{'up' if r.alive[n] else 'DOWN':>7}" for n in PROCESSES)
        dt = r.t_s - prev.t_s if prev else r.t_s
        sent_rate = (
            f"{((r.sent or 0) - (prev.sent or 0 if prev else 0)) / dt:6.0f}"
            if r.sent is not None
            else f"{'-':>6}"
        )
        rec_rate = f"{(r.recommended - (prev.recommended if prev else 0)) / dt:6.0f}"
        print(
            f"{r.t_s:6.0f}  {alive}  {fmt(r.sent):>9} {sent_rate} {fmt(r.backlog):>9} "
            f"{fmt(r.lag):>10} {r.recommended:>12,} {rec_rate} {r.load:5.1f}"
        )
        prev = r
    all_alive, bounded, why = verdict(rows)
    print(f"\nall processes alive at every sample: {'yes' if all_alive else 'NO'}")
    print(f"inbox lag bounded: {'yes' if bounded else 'NO'} ({why})")
    (out / "samples.json").write_text(json.dumps([vars(r) for r in rows], indent=1))


if __name__ == "__main__":
    sys.exit(script_main(main))

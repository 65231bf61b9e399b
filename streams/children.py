"""Pipeline processes started by another Python process, as an operator starts them.

The benchmarks and the integration tests run the router, the workers and the producer as
``python -m streams ...`` children: this is where such a child is started with its output in
a log file, stopped (SIGTERM, then SIGKILL), and where a free loopback port is picked.

A benchmark run in the background (``nohup``, ``&``) ignores SIGINT, so it is stopped with
SIGTERM, whose default ends Python without running ``finally`` blocks and leaves the
children running: ``stop_children_on_sigterm`` turns it into ``SystemExit``.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

#: Seconds a child gets to stop after SIGTERM before it is killed.
STOP_TIMEOUT_S = 30.0


class ChildExited(RuntimeError):
    """A child stopped while it was expected to run."""


@dataclass
class Child:
    """A process started by ``spawn``, its combined output in ``log``."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    started: float  # wall clock

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def check(self) -> None:
        """``ChildExited`` (with the end of its log) if it is no longer running."""
        code = self.proc.poll()
        if code is not None:
            raise ChildExited(f"{self.name} exited with {code}:\n{self.tail()}")

    def tail(self, lines: int = 40) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        stop(self.proc, timeout_s)


def spawn(
    name: str,
    args: Sequence[str],
    log_dir: Path,
    env: Mapping[str, str] | None = None,
    append: bool = False,
) -> Child:
    """``python -m streams *args`` with stdout and stderr in ``log_dir/name.log`` (appended
    to with ``append``); ``env``: its whole environment (default: this process's)."""
    log = log_dir / f"{name}.log"
    with log.open("ab" if append else "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "streams", *args],
            env=None if env is None else dict(env),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return Child(name, proc, log, time.time())


def stop(proc: subprocess.Popen[bytes], timeout_s: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM (and SIGCONT: a paused process handles it only then), SIGKILL after
    ``timeout_s``; returns once it has exited."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.send_signal(signal.SIGCONT)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout_s)


def child_pids(pid: int) -> list[int]:
    """The live children of a process (Linux /proc; a worker's: its live evaluation's
    process, ``JODIE_EVALUATE_APART``), empty when unreadable."""
    pids: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                pids += [int(p) for p in (task / "children").read_text().split()]
            except (OSError, ValueError):
                continue
    except OSError:
        return []
    return sorted(set(pids))


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def stop_children_on_sigterm() -> None:
    """From now on SIGTERM raises ``SystemExit`` in the main thread, so the ``finally``
    blocks that stop the children run as they do on Ctrl-C."""

    def leave(signum: int, _frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, leave)

"""Child processes of the benchmarks and tests: started with a log, stopped, and stopped too
when their parent is stopped with SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from streams.children import ChildExited, free_port, spawn, stop


def test_a_child_logs_to_its_file_and_its_exit_is_reported(tmp_path: Path) -> None:
    child = spawn("help", ["--help"], tmp_path)
    child.proc.wait(timeout=120)
    assert not child.alive()
    assert "Usage" in (tmp_path / "help.log").read_text()
    with pytest.raises(ChildExited, match="help exited with 0"):
        child.check()
    again = spawn("help", ["--help"], tmp_path, append=True)
    again.proc.wait(timeout=120)
    assert (tmp_path / "help.log").read_text().count("Usage") == 2


def test_stop_ends_a_running_process_by_sigterm() -> None:
    proc = subprocess.Popen(["sleep", "60"])
    began = time.monotonic()
    stop(proc, timeout_s=10)
    assert proc.returncode == -signal.SIGTERM
    assert time.monotonic() - began < 10


def test_sigterm_runs_the_finally_blocks_that_stop_the_children(tmp_path: Path) -> None:
    script = tmp_path / "parent.py"
    script.write_text(
        textwrap.dedent(
            """
            import subprocess, sys, time
            from streams.children import stop, stop_children_on_sigterm
            stop_children_on_sigterm()
            child = subprocess.Popen(["sleep", "60"], stdout=subprocess.DEVNULL)
            try:
                print(child.pid, flush=True)
                time.sleep(60)
            finally:
                stop(child)
                print("stopped", child.returncode, flush=True)
            """
        )
    )
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    child_pid = int(parent.stdout.readline())
    parent.send_signal(signal.SIGTERM)
    out, _ = parent.communicate(timeout=30)
    assert parent.returncode == 128 + signal.SIGTERM
    assert out.strip() == f"stopped {-signal.SIGTERM}"
    with pytest.raises(ProcessLookupError):  # reaped: gone
        os.kill(child_pid, 0)


def test_free_port_can_be_bound() -> None:
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))

"""`jodie dashboard`'s mistakes are one line and exit 2, never a traceback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid

import pytest

from streams.settings import Settings


def _dashboard(*args: str, prefix: str = "", **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "streams", "dashboard", *args],
        env={**os.environ, "JODIE_TOPIC_PREFIX": prefix, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_no_broker() -> None:
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    done = _dashboard("--port", "0", JODIE_BOOTSTRAP=f"127.0.0.1:{port}")
    assert done.returncode == 2, done.stderr
    assert f"error: no broker answers at 127.0.0.1:{port}" in done.stderr
    assert "jodie broker up" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.kafka
def test_missing_topics(broker: Settings) -> None:
    done = _dashboard("--port", "0", prefix=f"none{uuid.uuid4().hex[:6]}-")
    assert done.returncode == 2, done.stderr
    assert "error: no topic" in done.stderr and "jodie topics apply" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.kafka
def test_a_taken_port(kafka: Settings) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = _dashboard("--port", str(port), prefix=kafka.topic_prefix)
    assert done.returncode == 2, done.stderr
    assert f"127.0.0.1:{port}" in done.stderr and "--port" in done.stderr
    assert "Traceback" not in done.stderr

"""A user's mistake, through the real CLI: one line saying what is wrong and what to do, exit
code 2, never a traceback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from typer.testing import Result

from streams.settings import Settings
from tests.streams.cli.conftest import Jodie


def assert_one_line(result: Result, *expected: str) -> str:
    # SystemExit is how typer ends a command; anything else escaped the error mapping.
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and "Traceback" not in result.output
    for text in expected:
        assert text in lines[0]
    return lines[0]


# (arguments, what the line must say); {tmp} is a fresh folder, {empty} a folder in it that
# is not a checkpoint.
MISTAKES = [
    (["produce", "{tmp}/events.csv"], "file '{tmp}/events.csv' does not exist"),
    (["produce", "--after", "{tmp}/model"], "'--after': dir '{tmp}/model' does not exist"),
    (["produce", "--rate", "fast"], "'--rate'"),
    (["evaluate", "--checkpoint", "{tmp}/model"], "'--checkpoint': dir '{tmp}/model' does not"),
    (["evaluate", "--checkpoint", "{empty}"], "not a checkpoint directory; give a directory"),
    (["plot", "--checkpoint", "{tmp}/model", "--out", "{tmp}/plots"], "'--checkpoint'"),
    (["train", "--scorer", "fancy", "--out", "{tmp}/m"], "'fancy' is not one of 'history'"),
    (["evaluate", "--baseline", "recency", "--scorer", "fancy"], "'fancy' is not one of"),
    (["evaluate", "--protocol", "live"], "'live' is not one of 'frozen', 'paper'"),
    (["evaluate", "--baseline", "recency", "--data", "{tmp}/x.csv"], "'--data': file '{tmp}/x"),
    (["train", "--data", "{tmp}/x.csv", "--out", "{tmp}/m"], "'--data': file '{tmp}/x.csv'"),
    (["evaluate"], "--checkpoint is required unless --baseline is given"),
    (["train", "--epochs", "0", "--out", "{tmp}/m"], "'--epochs': Input should be greater"),
    (["trainer", "--epochs", "0"], "'--epochs'"),
    (["topics", "show", "nosuchtopic"], "'nosuchtopic' is not a topic of the pipeline; one of"),
    (["topics", "show", "--sample", "-1"], "'--sample'"),
    (["recommendations", "--limit", "0"], "'--limit'"),
    (["worker"], "give exactly one of --checkpoint and --model"),
    (["worker", "--checkpoint", "{empty}"], "not a checkpoint directory; give a directory"),
    (["state", "export", "--out", "{tmp}/s.npz"], "give exactly one of --checkpoint"),
    (["dlq", "show", "--reason", "duplicat"], "'duplicat' is not one of"),
    (["dlq", "replay", "--from", "{tmp}/fixed.jsonl"], "'--from': file '{tmp}/fixed.jsonl'"),
    (["nosuchcommand"], "No such command 'nosuchcommand'"),
]


@pytest.mark.parametrize(("args", "says"), MISTAKES, ids=[" ".join(a) for a, _ in MISTAKES])
def test_a_mistake_is_one_line(jodie: Jodie, tmp_path: Path, args: list[str], says: str) -> None:
    (tmp_path / "empty").mkdir()
    fill = {"tmp": str(tmp_path), "empty": str(tmp_path / "empty")}
    assert_one_line(jodie([a.format(**fill) for a in args]), says.format(**fill))


def test_a_bad_setting_is_one_line(jodie: Jodie) -> None:
    assert_one_line(jodie(["models", "list"], {"JODIE_PARTITIONS": "many"}), "JODIE_PARTITIONS")


@pytest.mark.kafka
@pytest.mark.parametrize(
    "args",
    [
        ["produce", "--limit", "5"],
        ["models", "list"],
        ["recommendations", "--limit", "3"],
        ["topics", "show", "interactions.log"],
        ["dlq", "show"],
        ["state", "export", "--model", "jodie", "--out", "states.npz"],
    ],
    ids=lambda a: " ".join(a),
)
def test_a_missing_topic_is_one_line(broker: Settings, jodie: Jodie, args: list[str]) -> None:
    """Not a wait for the topic to appear (the producer waited 30 s, then a traceback)."""
    prefix = f"nx{uuid.uuid4().hex[:8]}-"
    line = assert_one_line(jodie(args, {"JODIE_TOPIC_PREFIX": prefix}), f"topic {prefix}")
    assert "does not exist" in line
    assert "JODIE_TOPIC_PREFIX=" in line or "jodie topics apply" in line


def test_no_broker_is_one_line(jodie: Jodie) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"JODIE_BROKER_PORT": str(port), "JODIE_BOOTSTRAP": None}
    for args in (["models", "list"], ["produce", "--limit", "5"], ["dlq", "show"]):
        assert_one_line(
            jodie(args, env), f"no broker answers at 127.0.0.1:{port}", "jodie broker up"
        )


@pytest.mark.kafka
def test_mistakes_about_what_a_topic_holds(kafka: Settings, jodie: Jodie, tmp_path: Path) -> None:
    env = {"JODIE_TOPIC_PREFIX": kafka.topic_prefix}
    assert_one_line(
        jodie(["recommendations", "--user", "nobody"], env),
        "no recommendation for user 'nobody'",
    )
    assert_one_line(
        jodie(["models", "show", "v9"], env), "no version v9", "`jodie models list` shows"
    )
    assert_one_line(
        jodie(["state", "export", "--model", "jodie", "--out", str(tmp_path / "s.npz")], env),
        "no event stamped with a model version; for workers serving a checkpoint",
    )
    fixed = tmp_path / "fixed.jsonl"
    fixed.write_text('{"event": {"event_id": "e1", "user_id": "1"}}\n')
    assert_one_line(
        jodie(["dlq", "replay", "--from", str(fixed)], env),
        f"{fixed}:1: not an event to re-send",
    )


def test_the_installed_command_prints_no_traceback(tmp_path: Path) -> None:
    """The console script's path (python -m streams), not only the app object."""
    missing = tmp_path / "events.csv"
    run = subprocess.run(
        [sys.executable, "-m", "streams", "produce", str(missing)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2
    assert run.stderr.splitlines() == [
        f"error: Invalid value for 'path': file '{missing}' does not exist. "
        "(see `jodie produce --help`)"
    ]
    assert run.stdout == ""


# (benchmark, variables, how its one line starts); {port}: a port nothing listens on.
BENCHMARK_MISTAKES = [
    # stream_throughput used to wait on its clients without a broker instead of saying so.
    ("stream_throughput.py", {}, "error: no broker answers at 127.0.0.1:{port}; start it with"),
    ("stream_throughput.py", {"JODIE_PARTITIONS": "lots"}, "error: JODIE_PARTITIONS='lots': "),
    ("fuzz.py", {}, "error: {tmp}: no checkpoint.json; not a checkpoint directory; give a"),
]


@pytest.mark.parametrize(("script", "extra", "says"), BENCHMARK_MISTAKES)
def test_a_benchmark_run_by_mistake_says_so_in_one_line(
    script: str, extra: dict[str, str], says: str, tmp_path: Path
) -> None:
    """Benchmarks end a user's mistake as commands do (``script_main``): one line, exit 2."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = Path(__file__).resolve().parents[3]
    env = {k: v for k, v in os.environ.items() if not k.startswith("JODIE_")}
    env |= {"JODIE_BROKER_PORT": str(port), "PYTHONPATH": str(root), **extra}
    run = subprocess.run(
        [sys.executable, str(root / "benchmarks" / script), "--checkpoint", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=root,
    )
    assert run.returncode == 2, run.stderr[-2000:]
    lines = run.stderr.splitlines()
    assert len(lines) == 1, run.stderr[-2000:]
    assert lines[0].startswith(says.format(port=port, tmp=tmp_path)), lines[0]


@pytest.mark.parametrize(
    "script", ["repeat_signal.py", "transition_signal.py", "quality_ceiling.py"]
)
def test_a_signal_benchmark_given_a_missing_file_names_it(script: str, tmp_path: Path) -> None:
    """The scripts that read interaction logs refuse a path that is no file before reading
    anything: argparse's usage error (exit 2) names it, no traceback."""
    root = Path(__file__).resolve().parents[3]
    missing = tmp_path / "nosuch.csv"
    run = subprocess.run(
        [sys.executable, str(root / "benchmarks" / script), "--data", str(missing)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(root)},
        cwd=root,
    )
    assert run.returncode == 2, run.stderr[-2000:]
    assert "Traceback" not in run.stderr
    assert run.stderr.splitlines()[-1].endswith(f"argument --data: {missing}: no such file")

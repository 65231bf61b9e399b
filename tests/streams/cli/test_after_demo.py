"""The README's "After the demo" commands work as written, in the environment the demo's last
lines print, against a pipeline run as the demo runs it (so README, demo and CLI cannot drift
apart)."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.streams.cli.conftest import STREAMED, Jodie, Pipeline

pytestmark = pytest.mark.kafka

ROOT = Path(__file__).resolve().parents[3]


def readme_commands() -> list[str]:
    """The shell block of the README's "After the demo" section, comments left out."""
    section = (ROOT / "README.md").read_text().split("\n### After the demo\n", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line.split("  #", 1)[0].strip() for line in block.splitlines() if line.strip()]


def demo_last_lines(env: dict[str, str]) -> list[str]:
    """What demo.sh prints once done (from its `# What to export` comment to its end), run by
    bash as the demo runs it, in a demo environment ``env``."""
    script = (ROOT / "deploy" / "demo.sh").read_text()
    tail = script[script.index("# What to export") :]
    venv = Path(sys.prefix)
    where = f"ROOT={shlex.quote(str(ROOT))}; VENV={shlex.quote(str(venv))}"
    run = subprocess.run(
        ["bash", "-c", f"set -euo pipefail; {where}\n{tail}"],
        env={**os.environ, **env, "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    return [line.strip() for line in run.stdout.splitlines()]


def test_the_readme_commands_work_with_what_the_demo_prints(
    pipeline: Pipeline, jodie: Jodie
) -> None:
    settings = pipeline.settings
    ports = (
        f"JODIE_BROKER_PORT={settings.broker_port} JODIE_CONTROLLER_PORT={settings.controller_port}"
    )
    printed = demo_last_lines(pipeline.env)

    # The exact environment the pipeline ran with, and the stop command on its ports.
    (export,) = [line for line in printed if line.startswith("export JODIE_")]
    demo_env = dict(word.split("=", 1) for word in shlex.split(export)[1:])
    assert demo_env == {
        **pipeline.env,
        "JODIE_BROKER_PORT": str(settings.broker_port),
        "JODIE_CONTROLLER_PORT": str(settings.controller_port),
    }
    stop = printed[printed.index("Stop the broker with:") + 1]
    assert stop == f"{ports} {shlex.quote(str(Path(sys.prefix) / 'bin' / 'jodie'))} broker down"

    commands = readme_commands()
    readme_env = dict(word.split("=", 1) for word in shlex.split(commands[0])[1:])
    assert commands[0].startswith("export ") and readme_env.keys() == demo_env.keys()
    # Not run here: it would stop the tests' broker.
    assert commands[-1] == "jodie broker down"
    outputs = {}
    for command in commands[1:-1]:
        args = shlex.split(command)
        assert args[0] == "jodie", command
        result = jodie(args[1:], demo_env)
        assert result.exit_code == 0 and result.exception is None, (command, result.output)
        outputs[" ".join(args[1:3])] = result.stdout.splitlines()

    (serving,) = outputs["models list"]
    assert serving.startswith("* v1  trained from a file  valid MRR ")
    # One JSON line, however long: never wrapped at a console width when not a terminal.
    (summary,) = outputs["recommendations --summary"]
    assert len(summary) > 80 and json.loads(summary)["recommendations"] == STREAMED
    user = outputs["recommendations --user"]
    assert 1 <= len(user) <= 3 and all(line.startswith("user 1087  after ") for line in user)

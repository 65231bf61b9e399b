"""The benchmarks that need no broker run end to end on small inputs.

They import the operators and the stream's records directly, so a change of those (a renamed
field, a new argument) can break a benchmark without breaking any other test: it happened to
``row_codec.py`` when ``EntityState.count`` became ``events``. Each runs here as a user runs
it, with arguments small enough for the suite; its figures are not checked, only that it
prints them and ends well.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from operators.dataset import bundled_wikipedia
from tests.streams.harness import HISTORY, make_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "v1")


def _cases(checkpoint: Path) -> dict[str, list[str]]:
    wikipedia = str(bundled_wikipedia())
    return {
        "row_codec.py": ["--rows", "20", "--waiting", "3"],
        "processor_speed.py": [
            *("--checkpoint", str(checkpoint), "--start", str(HISTORY)),
            *("--events", "300", "--batch", "200"),
        ],
        "ranking_blocks.py": [
            *("--checkpoint", str(checkpoint), "--start", str(HISTORY)),
            *("--events", "300", "--batch", "200", "--rounds", "2", "--sizes", "4096", "64"),
        ],
        "model_calls.py": [
            *("--checkpoint", str(checkpoint), "--start", str(HISTORY)),
            *("--events", "300", "--batch", "200", "--largest", "4", "--seconds", "0.002"),
        ],
        "catchup_speed.py": ["--history", "2000", "--events", "300"],
        "repeat_signal.py": ["--data", wikipedia],
        "transition_signal.py": ["--data", wikipedia],
        "quality_ceiling.py": ["--data", wikipedia],
        "cores.py": ["--seconds", "0.3", "--most", "2"],
    }


@pytest.mark.parametrize(
    "script",
    [
        "row_codec.py",
        "processor_speed.py",
        "ranking_blocks.py",
        "model_calls.py",
        "catchup_speed.py",
        "repeat_signal.py",
        "transition_signal.py",
        "quality_ceiling.py",
        "cores.py",
    ],
)
def test_a_benchmark_without_a_broker_runs(script: str, checkpoint: Path, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JODIE_")}
    env |= {"PYTHONPATH": str(ROOT), "JODIE_STATE_DIR": str(tmp_path / "state")}
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *_cases(checkpoint)[script]],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=tmp_path,
    )
    assert run.returncode == 0, (run.stdout[-2000:], run.stderr[-3000:])
    assert run.stdout.strip(), run.stderr[-2000:]

"""The layers point one way: operators/ and schemas/ import without Kafka clients or streams/."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_BLOCKER = """
import importlib.abc, sys
BLOCKED = ("confluent_kafka", "rocksdict", "streams")
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"layering violation: {name} imported")
        return None
sys.meta_path.insert(0, Block())
import importlib
for module in sys.argv[1:]:
    importlib.import_module(module)
print("imported", len(sys.argv) - 1)
"""


def _modules(package: str) -> list[str]:
    found = [package]
    for info in pkgutil.walk_packages([str(ROOT / package)], prefix=f"{package}."):
        found.append(info.name)
    return found


def test_pure_layers_import_without_kafka_clients() -> None:
    modules = _modules("schemas") + _modules("operators")
    assert len(modules) > 3
    proc = subprocess.run(
        [sys.executable, "-c", _BLOCKER, *modules],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"imported {len(modules)}" in proc.stdout


def test_the_blocker_does_block() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _BLOCKER, "streams.runtime.clients"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode != 0
    assert "layering violation" in proc.stderr

"""The layers point one way: operators/ and schemas/ import without Kafka clients or streams/;
the JODIE application (streams/app) without Kafka clients, RocksDB or the runtime; the runtime
without anything of JODIE; the settings without deploy/."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# argv: the blocked module prefixes (comma-separated), then the modules to import.
_BLOCKER = """
import importlib.abc, sys
BLOCKED = tuple(sys.argv[1].split(","))
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in BLOCKED):
            raise ImportError(f"layering violation: {name} imported")
        return None
sys.meta_path.insert(0, Block())
import importlib
for module in sys.argv[2:]:
    importlib.import_module(module)
print("imported", len(sys.argv) - 2)
"""
KAFKA_AND_STREAMS = ("confluent_kafka", "rocksdict", "streams")


def _modules(package: str) -> list[str]:
    found = [package]
    folder = ROOT.joinpath(*package.split("."))
    for info in pkgutil.walk_packages([str(folder)], prefix=f"{package}."):
        found.append(info.name)
    return found


def _import(blocked: tuple[str, ...], modules: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _BLOCKER, ",".join(blocked), *modules],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )


def test_pure_layers_import_without_kafka_clients() -> None:
    modules = _modules("schemas") + _modules("operators")
    assert len(modules) > 3
    proc = _import(KAFKA_AND_STREAMS, modules)
    assert proc.returncode == 0, proc.stderr
    assert f"imported {len(modules)}" in proc.stdout


def test_the_blocker_does_block() -> None:
    proc = _import(KAFKA_AND_STREAMS, ["streams.runtime.clients"])
    assert proc.returncode != 0
    assert "layering violation" in proc.stderr


def test_settings_import_without_deploy() -> None:
    proc = _import(("deploy",), ["streams.settings"])
    assert proc.returncode == 0, proc.stderr


def test_the_application_imports_without_kafka_or_the_runtime() -> None:
    modules = _modules("streams.app")
    assert "streams.app.processor" in modules
    proc = _import(("confluent_kafka", "rocksdict", "streams.runtime"), modules)
    assert proc.returncode == 0, proc.stderr
    assert f"imported {len(modules)}" in proc.stdout


_RUNTIME_IMPORTS = """
import importlib, pkgutil, sys
import streams.runtime as runtime
for info in pkgutil.walk_packages(runtime.__path__, prefix="streams.runtime."):
    importlib.import_module(info.name)
ours = ("streams", "operators", "schemas", "deploy", "torch", "numpy", "pydantic")
print(sorted(
    m for m in sys.modules
    if m.split(".")[0] in ours and m != "streams" and not m.startswith("streams.runtime")
))
"""


def test_the_runtime_knows_nothing_of_jodie() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _RUNTIME_IMPORTS],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"

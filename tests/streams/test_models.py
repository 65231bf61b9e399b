"""The model registry on the real broker: announce, list, promote, roll back, refuse tampering."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from operators.model.exceptions import CheckpointError
from streams.exceptions import RegistryError
from streams.models import Registry, checkpoint_digest, verified
from streams.settings import Settings
from tests.streams.harness import make_checkpoint, route, stop, wait_for

pytestmark = pytest.mark.kafka


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("ckpts")
    return make_checkpoint(root / "a", 300, "a"), make_checkpoint(root / "b", 600, "b")


def test_announce_promote_rollback(
    kafka: Settings, checkpoints: tuple[Path, Path], tmp_path: Path
) -> None:
    a, b = checkpoints
    registry = Registry(kafka)
    store = tmp_path / "store"
    v1 = registry.announce(a, store=store)
    v2 = registry.announce(b, store=store)
    assert (v1["version"], v2["version"]) == ("v1", "v2")
    assert [r["version"] for r in registry.versions()] == ["v1", "v2"]
    assert registry.show("v2")["sha256"] == checkpoint_digest(b)
    assert verified(v2) == store / "jodie" / "v2"  # the store's copy is what workers load
    assert registry.serving() is None
    with pytest.raises(RegistryError):
        registry.rollback()  # nothing served yet

    registry.promote("v1")
    assert registry.promote("v2")["previous_version"] == "v1"
    assert registry.serving()["version"] == "v2"  # type: ignore[index]
    back = registry.rollback()
    assert (back["version"], back["previous_version"]) == ("v1", "v2")
    assert registry.serving()["version"] == "v1"  # type: ignore[index]
    with pytest.raises(RegistryError):
        registry.announce(a, version="v1", store=store)  # versions are immutable
    with pytest.raises(RegistryError):
        registry.promote("v9")


def test_a_tampered_checkpoint_is_refused(
    kafka: Settings, checkpoints: tuple[Path, Path], tmp_path: Path
) -> None:
    a, _b = checkpoints
    registry = Registry(kafka, name="tamper")
    record = registry.announce(a, store=tmp_path / "store")
    copy = tmp_path / "store" / "tamper" / record["version"]
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError):
        registry.promote(record["version"])
    # A manifest rewritten to match the changed file does not pass either: the announced
    # digest covers the manifest.
    from operators.model.checkpoint import sha256_file

    meta_path = copy / "checkpoint.json"
    meta = json.loads(meta_path.read_text())
    meta["sha256"]["model.safetensors"] = sha256_file(weights)
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="does not match"):
        registry.promote(record["version"])
    assert registry.serving() is None
    # Announcing a directory whose files do not match its own manifest is refused too.
    data[0] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError):
        Registry(kafka, name="tamper2").announce(copy, store=tmp_path / "store2")


def test_a_worker_serves_the_promoted_version(
    kafka: Settings, checkpoints: tuple[Path, Path], tmp_path: Path
) -> None:
    a, _b = checkpoints
    registry = Registry(kafka)
    store = tmp_path / "store"
    registry.announce(a, store=store)
    registry.promote("v1")
    events = 60
    route(kafka, 300, events, model="jodie")  # checkpoint "a" holds the first 300 events
    env = {
        **os.environ,
        "JODIE_TOPIC_PREFIX": kafka.topic_prefix,
        "JODIE_STATE_DIR": str(tmp_path / "state"),
        "JODIE_WEB_PORT": "16166",
    }
    log = (tmp_path / "worker.log").open("ab")
    cmd = [sys.executable, "-m", "streams", "worker", "--model", "jodie", "--id", "0"]
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        recs = wait_for(kafka, events, timeout_s=180)
    finally:
        stop(proc)
    assert len(recs) == events, (tmp_path / "worker.log").read_text()[-2000:]
    assert {r["model_version"] for r in recs} == {"v1"}

"""The model registry on the real broker: announce, list, promote, roll back, refuse tampering."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import SecretStr

from operators.model.exceptions import CheckpointError
from streams.exceptions import RegistryError, UntrustedModelError
from streams.models import Registry, checkpoint_digest, verified
from streams.settings import Settings
from tests.streams.harness import make_checkpoint, route, stop, wait_for

pytestmark = pytest.mark.kafka


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("ckpts")
    return make_checkpoint(root / "a", 300, "a"), make_checkpoint(root / "b", 600, "b")


def _with_store(settings: Settings, store: Path, **kw: object) -> Settings:
    return settings.model_copy(update={"model_store": store, **kw})


def test_announce_promote_rollback(
    kafka: Settings, checkpoints: tuple[Path, Path], tmp_path: Path
) -> None:
    a, b = checkpoints
    store = tmp_path / "store"
    kafka = _with_store(kafka, store)
    registry = Registry(kafka)
    v1 = registry.announce(a)
    v2 = registry.announce(b)
    assert (v1["version"], v2["version"]) == ("v1", "v2")
    assert [r["version"] for r in registry.versions()] == ["v1", "v2"]
    assert registry.show("v2")["sha256"] == checkpoint_digest(b)
    # The store's copy is what workers load.
    assert verified(v2, kafka) == (store / "jodie" / "v2").resolve()
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
        registry.announce(a, version="v1")  # versions are immutable
    with pytest.raises(RegistryError):
        registry.promote("v9")


def test_a_tampered_checkpoint_is_refused(
    kafka: Settings, checkpoints: tuple[Path, Path], tmp_path: Path
) -> None:
    a, _b = checkpoints
    kafka = _with_store(kafka, tmp_path / "store")
    registry = Registry(kafka, name="tamper")
    record = registry.announce(a)
    copy = tmp_path / "store" / "tamper" / record["version"]
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError):
        registry.promote(record["version"])
    # A manifest rewritten to match the changed file does not pass either: the announced
    # digest covers every file, the manifest included.
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
        Registry(_with_store(kafka, tmp_path / "store2"), name="tamper2").announce(copy)


def test_signed_announcements_and_records_under_a_foreign_key(
    kafka: Settings, checkpoints: tuple[Path, Path], tmp_path: Path
) -> None:
    """On the topic: with a signing key, promote refuses what was announced without it; a
    record is believed only under its own key."""
    a, b = checkpoints
    plain = _with_store(kafka, tmp_path / "store")
    keyed = _with_store(kafka, tmp_path / "store", model_signing_key=SecretStr("shared secret"))
    unsigned = Registry(plain).announce(a)
    signed = Registry(keyed).announce(b)
    assert unsigned["signature"] is None and signed["signature"]
    with pytest.raises(UntrustedModelError, match="unsigned"):
        Registry(keyed).promote(unsigned["version"])
    assert Registry(keyed).serving() is None
    assert Registry(keyed).promote(signed["version"])["signature"] == signed["signature"]
    # v1's record written again under v9's key: not v9.
    Registry(keyed)._write("jodie@v9", unsigned)
    with pytest.raises(RegistryError, match="no version v9"):
        Registry(keyed).show("v9")


def test_a_worker_serves_the_promoted_version(
    kafka: Settings, checkpoints: tuple[Path, Path], tmp_path: Path
) -> None:
    a, _b = checkpoints
    store = tmp_path / "store"
    registry = Registry(_with_store(kafka, store))
    registry.announce(a)
    registry.promote("v1")
    events = 60
    route(kafka, 300, events, model="jodie")  # checkpoint "a" holds the first 300 events
    env = {
        **os.environ,
        "JODIE_TOPIC_PREFIX": kafka.topic_prefix,
        "JODIE_STATE_DIR": str(tmp_path / "state"),
        "JODIE_WEB_PORT": "16166",
        "JODIE_MODEL_STORE": str(store),  # the worker loads only from its store
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

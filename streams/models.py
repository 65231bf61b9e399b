"""The model registry on the compacted `models` topic: announce, list, promote, roll back.

Two kinds of records, both Avro ModelAnnouncement, keyed so that compaction keeps what matters:

- ``<name>@<version>``: one per announced version (its URI, digest, log position, metrics),
  kept forever;
- ``<name>``: the promoted version — a copy of its announcement with ``previous_version`` set
  to the one it replaced, so ``rollback`` knows where to go back to.

A checkpoint lives in the model store (``JODIE_MODEL_STORE``, a local directory by default):
announcing copies it there. Its digest is the sha256 of its manifest (the sha256 of every
sealed file), so a changed file, or a manifest changed to match, is refused wherever the
checkpoint is loaded from — at announcement, at promotion and by the workers.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from operators.model.checkpoint import read_meta, verify
from operators.model.exceptions import CheckpointError
from schemas import MODEL_ANNOUNCEMENT
from streams.codecs import make_codec
from streams.exceptions import RegistryError
from streams.peek import read_all
from streams.runtime.clients import idempotent_producer
from streams.settings import Settings


def checkpoint_digest(path: str | Path) -> str:
    """sha256 of a checkpoint's manifest, after checking every file against it."""
    meta = verify(path)
    manifest = json.dumps(meta["sha256"], sort_keys=True).encode()
    return hashlib.sha256(manifest).hexdigest()


def local_path(uri: str) -> Path:
    """The directory behind a model URI (``file://`` or a plain path)."""
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        return Path(parsed.path if parsed.scheme else uri)
    raise RegistryError(f"{uri}: only local directories (or file:// URIs) are supported")


def verified(announcement: dict[str, Any]) -> Path:
    """The checkpoint directory of an announcement, refused unless its digest matches."""
    path = local_path(announcement["uri"])
    actual = checkpoint_digest(path)
    if actual != announcement["sha256"]:
        raise CheckpointError(
            f"{path}: digest {actual} does not match {announcement['sha256']} announced for "
            f"{announcement['name']} {announcement['version']}; refusing it"
        )
    return path


@dataclass
class Registry:
    settings: Settings
    name: str = "jodie"

    @property
    def topic(self) -> str:
        return self.settings.topic("models")

    def _records(self) -> dict[str, dict[str, Any]]:
        codec = make_codec(self.settings, MODEL_ANNOUNCEMENT, self.topic)
        latest: dict[str, dict[str, Any]] = {}
        for key, value, _p, _o in read_all(self.settings, self.topic):
            if key is not None:
                latest[key.decode()] = codec.decode(value)
        return latest

    def _write(self, key: str, record: dict[str, Any]) -> None:
        codec = make_codec(self.settings, MODEL_ANNOUNCEMENT, self.topic)
        producer = idempotent_producer(self.settings)
        producer.produce(self.topic, key=key.encode(), value=codec.encode(record))
        if producer.flush(30) != 0:
            raise RegistryError(f"could not write to {self.topic}")

    def versions(self) -> list[dict[str, Any]]:
        """Every announced version of this model, oldest first."""
        prefix = f"{self.name}@"
        found = [r for k, r in self._records().items() if k.startswith(prefix)]
        return sorted(found, key=lambda r: (r["created_at_ms"], r["version"]))

    def show(self, version: str) -> dict[str, Any]:
        record = self._records().get(f"{self.name}@{version}")
        if record is None:
            raise RegistryError(f"no version {version} of {self.name} on {self.topic}")
        return record

    def serving(self) -> dict[str, Any] | None:
        """The promoted version's record, or None before any promotion."""
        return self._records().get(self.name)

    def announce(
        self, checkpoint: Path, version: str | None = None, store: Path | None = None
    ) -> dict[str, Any]:
        """Copy a verified checkpoint into the store and announce it (not promoted yet)."""
        digest = checkpoint_digest(checkpoint)
        known = {r["version"] for r in self.versions()}
        if version is None:
            n = len(known) + 1
            while f"v{n}" in known:
                n += 1
            version = f"v{n}"
        elif version in known:
            raise RegistryError(f"{self.name} {version} is already announced")
        root = (store or self.settings.model_store) / self.name / version
        if root.exists():
            shutil.rmtree(root)
        root.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(checkpoint, root)
        if checkpoint_digest(root) != digest:  # the copy is what workers will load
            raise CheckpointError(f"{root}: the copy does not match {checkpoint}")
        meta = read_meta(root)
        offsets = meta.get("log_offsets", {})
        # Where in each partition of the log a worker catching this version up starts
        # reading (only a checkpoint replayed from the log has a position there).
        resume = meta.get("source", {}).get("partition_offsets", {}) if "seq" in offsets else {}
        metrics = {
            k: float(v)
            for k, v in meta.get("metrics", {}).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        record = {
            "name": self.name,
            "version": version,
            "uri": root.resolve().as_uri(),
            "sha256": digest,
            "log_offsets": [
                {"partition": int(p), "offset": int(o)} for p, o in sorted(resume.items())
            ],
            "metrics": metrics,
            "created_at_ms": int(time.time() * 1000),
            "log_seq": int(offsets.get("seq", -1)),
            "previous_version": None,
        }
        self._write(f"{self.name}@{version}", record)
        return record

    def promote(self, version: str) -> dict[str, Any]:
        """Make ``version`` the serving one (its checkpoint is verified first)."""
        record = self.show(version)
        verified(record)
        current = self.serving()
        if current is not None and current["version"] == version:
            return current
        promoted = {**record, "previous_version": current["version"] if current else None}
        self._write(self.name, promoted)
        return promoted

    def rollback(self) -> dict[str, Any]:
        """Promote the version that served before the current one."""
        current = self.serving()
        if current is None or current.get("previous_version") is None:
            raise RegistryError(f"{self.name}: no earlier promoted version to roll back to")
        return self.promote(current["previous_version"])

"""The model registry on the compacted `models` topic: announce, list, promote, roll back.

Two kinds of records, both Avro ModelAnnouncement, keyed so that compaction keeps what matters:

- ``<name>@<version>``: one per announced version (its URI, digest, log position, metrics),
  kept forever;
- ``<name>``: the promoted version — a copy of its announcement with ``previous_version`` set
  to the one it replaced, so ``rollback`` knows where to go back to.

A checkpoint lives in the model store (``JODIE_MODEL_STORE``, a local directory by default):
announcing copies it there.

Whoever can write the topic must not choose what the workers load. Every place that loads an
announced checkpoint — the workers (streams.switch), the router (streams.bounds) and
``promote`` — goes through ``verified``, which refuses an announcement unless

- its model name and version are plain names (``NAME``: no path separator, no ``..``, no
  control character, at most 128 characters);
- with ``JODIE_MODEL_SIGNING_KEY`` set, it carries the HMAC-SHA256 of its name, version and
  digest under that key (``announce`` signs with it);
- its URI is a local directory inside ``JODIE_MODEL_STORE`` or a root of
  ``JODIE_MODEL_ALLOW``, symlinks resolved;
- its digest equals the one recomputed from the files (every file, checkpoint.json with the
  config and Δ statistics included: operators.model.checkpoint.directory_digest), never one
  written inside the checkpoint;
- its log position is the one its checkpoint records (a worker catches up from it).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

from pydantic import SecretStr

from operators.model.checkpoint import directory_digest, read_meta, verify
from operators.model.exceptions import CheckpointError
from schemas import MODEL_ANNOUNCEMENT
from streams.codecs import make_codec
from streams.exceptions import RegistryError, UnservableModelError, UntrustedModelError
from streams.peek import read_all
from streams.runtime.clients import idempotent_producer
from streams.settings import Settings

_log = logging.getLogger("jodie.models")

#: What a model name or version may be: it becomes a folder of the store and part of a key.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def checked_name(kind: str, value: Any) -> str:
    """``value`` if it is a plain name (``NAME``, no ``..``); RegistryError otherwise."""
    if not isinstance(value, str) or NAME.fullmatch(value) is None or ".." in value:
        raise RegistryError(
            f"bad {kind} {value!r}: use 1 to 128 letters, digits, '.', '_' or '-', starting "
            "with a letter or digit, without '..'"
        )
    return value


def checkpoint_digest(path: str | Path) -> str:
    """The digest a checkpoint is announced with (every file, checkpoint.json included),
    after checking its files against its own manifest."""
    verify(path)
    return directory_digest(path)


def signature(key: SecretStr, name: str, version: str, digest: str) -> str:
    """HMAC-SHA256 (hex) of ``[name, version, digest]`` as compact JSON under ``key``."""
    message = json.dumps([name, version, digest], separators=(",", ":")).encode()
    return hmac.new(key.get_secret_value().encode(), message, hashlib.sha256).hexdigest()


def checkpoint_location(uri: str, settings: Settings) -> Path:
    """The directory behind an announced URI, resolved, if it lies inside the model store or
    a root of JODIE_MODEL_ALLOW; UntrustedModelError otherwise."""
    if any(ord(c) < 32 or ord(c) == 127 for c in uri):
        raise UntrustedModelError(f"{uri!r}: a control character in a model URI; refusing it")
    parsed = urlparse(uri)
    if parsed.scheme == "":
        path = Path(uri)
    elif parsed.scheme == "file" and parsed.netloc in ("", "localhost") and not parsed.query:
        path = Path(url2pathname(parsed.path))
    else:
        raise UntrustedModelError(
            f"{uri}: only local directories (file:// URIs) can be loaded; announce the "
            "checkpoint with `jodie models announce`, which copies it into JODIE_MODEL_STORE"
        )
    if not path.is_absolute():
        raise UntrustedModelError(f"{uri}: a relative model URI; announce it again")
    # Resolved, so that neither '..' nor a symlink inside a root leads out of it.
    path = path.resolve()
    roots = [settings.model_store, *settings.model_allow]
    if not any(_inside(path, root) for root in roots):
        raise UntrustedModelError(
            f"{uri}: outside JODIE_MODEL_STORE ({settings.model_store}) and JODIE_MODEL_ALLOW; "
            "announce it with `jodie models announce`, or add its folder to JODIE_MODEL_ALLOW"
        )
    return path


def _inside(path: Path, root: Path) -> bool:
    """Whether resolved ``path`` lies strictly inside ``root`` (resolved here)."""
    root = root.resolve()
    return path != root and path.is_relative_to(root)


def _position(meta: dict[str, Any]) -> tuple[int, list[dict[str, int]]]:
    """A checkpoint's log position as announced: the seq its states are at (-1: trained from
    a file) and, per partition of the log, the offset a worker catching it up starts from
    (only a checkpoint replayed from the log has a position there)."""
    offsets = meta.get("log_offsets", {})
    resume = meta.get("source", {}).get("partition_offsets", {}) if "seq" in offsets else {}
    return int(offsets.get("seq", -1)), [
        {"partition": int(p), "offset": int(o)}
        for p, o in sorted(resume.items(), key=lambda kv: int(kv[0]))
    ]


#: Scorers the workers rank with exactly as `jodie evaluate` does (streams.app.serving).
SERVED_SCORERS = ("plain", "history", "ranker")


def verified(announcement: dict[str, Any], settings: Settings) -> Path:
    """The checkpoint directory of an announcement, refused unless it passes every check in
    this module's docstring. The one gate before anything announced is loaded."""
    name = checked_name("model name", announcement["name"])
    version = checked_name("version", announcement["version"])
    label = f"{name} {version}"
    key = settings.model_signing_key
    if key is not None:
        given = announcement.get("signature")
        if not given:
            raise UntrustedModelError(
                f"{label} is unsigned and JODIE_MODEL_SIGNING_KEY is set; announce it again "
                "with the key set"
            )
        want = signature(key, name, version, announcement["sha256"])
        if not hmac.compare_digest(str(given).encode(), want.encode()):
            raise UntrustedModelError(
                f"{label}: its signature is not valid under JODIE_MODEL_SIGNING_KEY; announce "
                "it again with the key every process shares"
            )
    path = checkpoint_location(announcement["uri"], settings)
    actual = checkpoint_digest(path)
    if actual != announcement["sha256"]:
        raise CheckpointError(
            f"{path}: the digest of its files, {actual}, does not match the "
            f"{announcement['sha256']} announced for {label}; announce a checkpoint you trust"
        )
    meta = read_meta(path)
    scorer = meta.get("model_config", {}).get("scorer", "history")
    if scorer not in SERVED_SCORERS:
        # Workers would rank it by distance alone while evaluating it with its ranker: what
        # users got would not be what `jodie evaluate` measured.
        raise UnservableModelError(
            f"{label} ranks with the {scorer!r} scorer, which the workers do not serve (they "
            f"serve {', '.join(SERVED_SCORERS)}); train it with one of them to deploy it"
        )
    seq, offsets = _position(meta)
    if (announcement["log_seq"], announcement["log_offsets"]) != (seq, offsets):
        raise UntrustedModelError(
            f"{label}: the announced log position is not its checkpoint's; announce it again"
        )
    return path


def _matches_key(key: str, record: dict[str, Any]) -> bool:
    """A record is only believed under its own key: a version's, or its model's serving one."""
    return key in (f"{record['name']}@{record['version']}", record["name"])


@dataclass
class Registry:
    settings: Settings
    name: str = "jodie"

    def __post_init__(self) -> None:
        checked_name("model name", self.name)

    @property
    def topic(self) -> str:
        return self.settings.topic("models")

    def _records(self) -> dict[str, dict[str, Any]]:
        codec = make_codec(self.settings, MODEL_ANNOUNCEMENT, self.topic)
        latest: dict[str, dict[str, Any]] = {}
        # All of it or a ReadError: a read cut short by a slow broker would show an older
        # promotion as the serving one (a trainer would judge against it, a worker load it).
        for key, value, _p, _o in read_all(self.settings, self.topic, complete=True):
            if key is None:
                continue
            record = codec.decode(value)
            if not _matches_key(key.decode(), record):
                # Written by hand under another key: it could pass one version off as another.
                _log.warning(
                    "%s: ignoring the record under key %r, which names %s %s",
                    self.topic,
                    key,
                    record["name"],
                    record["version"],
                )
                continue
            latest[key.decode()] = record
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
        record = self._records().get(f"{self.name}@{checked_name('version', version)}")
        if record is None:
            raise RegistryError(
                f"no version {version} of {self.name} on {self.topic}; "
                "`jodie models list` shows the versions"
            )
        return record

    def serving(self) -> dict[str, Any] | None:
        """The promoted version's record, or None before any promotion."""
        return self._records().get(self.name)

    def announce(self, checkpoint: Path, version: str | None = None) -> dict[str, Any]:
        """Copy a verified checkpoint into the store and announce it (not promoted yet);
        signed when JODIE_MODEL_SIGNING_KEY is set."""
        if version is not None:
            # Before anything touches the store: the version names a folder in it.
            checked_name("version", version)
        digest = checkpoint_digest(checkpoint)
        known = {r["version"] for r in self.versions()}
        if version is None:
            n = len(known) + 1
            while f"v{n}" in known:
                n += 1
            version = f"v{n}"
        elif version in known:
            raise RegistryError(
                f"{self.name} {version} is already announced; give another --version"
            )
        store = self.settings.model_store
        root = store / self.name / version
        if not _inside(root.resolve(), store):
            # Plain names cannot lead out, but a symlinked folder in the store could, and
            # what is there gets deleted below.
            raise UntrustedModelError(f"{root}: leads out of JODIE_MODEL_STORE; remove the link")
        if root.resolve() != Path(checkpoint).resolve():
            if root.exists():
                shutil.rmtree(root)  # left by an announcement that did not complete
            root.parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(checkpoint, root)
        meta = read_meta(root)
        log_seq, log_offsets = _position(meta)
        metrics = {
            k: float(v)
            for k, v in meta.get("metrics", {}).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        key = self.settings.model_signing_key
        record = {
            "name": self.name,
            "version": version,
            "uri": root.resolve().as_uri(),
            "sha256": digest,
            "log_offsets": log_offsets,
            "metrics": metrics,
            "created_at_ms": int(time.time() * 1000),
            "log_seq": log_seq,
            "previous_version": None,
            "signature": None if key is None else signature(key, self.name, version, digest),
        }
        verified(record, self.settings)  # the copy is what workers will load: check it as they do
        self._write(f"{self.name}@{version}", record)
        return record

    def promote(self, version: str) -> dict[str, Any]:
        """Make ``version`` the serving one (its checkpoint is verified first)."""
        record = self.show(version)
        verified(record, self.settings)
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
            raise RegistryError(
                f"{self.name}: no earlier promoted version to roll back to; "
                "`jodie models promote V` serves a version"
            )
        return self.promote(current["previous_version"])

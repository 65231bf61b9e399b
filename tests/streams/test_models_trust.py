"""The registry's trust checks, without a broker: where an announced checkpoint may live, which
names it may have, that its digest covers every file, and its signature."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr
from typer.testing import CliRunner

from operators.model.checkpoint import sha256_file
from operators.model.exceptions import CheckpointError
from streams.bounds import model_features
from streams.exceptions import RegistryError, UnservableModelError, UntrustedModelError
from streams.models import Registry, checked_name, checkpoint_digest, signature, verified
from streams.settings import Settings
from streams.switch import catch_up
from tests.streams.harness import make_checkpoint


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint outside any store, at log position 50."""
    return make_checkpoint(tmp_path_factory.mktemp("src") / "ckpt", 50, with_seqs=True)


@pytest.fixture
def topic(monkeypatch: pytest.MonkeyPatch) -> dict[str, dict[str, Any]]:
    """The `models` topic, in memory: what the registry reads and writes."""
    records: dict[str, dict[str, Any]] = {}
    monkeypatch.setattr(Registry, "_records", lambda self: dict(records))
    monkeypatch.setattr(Registry, "_write", lambda self, k, r: records.__setitem__(k, r))
    return records


def _settings(tmp_path: Path, **kw: Any) -> Settings:
    return Settings(model_store=tmp_path / "store", **kw)


def _announce(settings: Settings, source: Path, version: str = "v1") -> dict[str, Any]:
    return Registry(settings).announce(source, version)


def test_an_announced_version_passes(topic: dict[str, Any], source: Path, tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    record = _announce(settings, source)
    path = verified(record, settings)
    assert path == (tmp_path / "store" / "jodie" / "v1").resolve()
    assert record["sha256"] == checkpoint_digest(source)
    assert (record["log_seq"], record["signature"]) == (50, None)
    assert model_features(record, settings) == 0
    assert Registry(settings).promote("v1")["version"] == "v1"


# --- where the checkpoint lives ---------------------------------------------------------------


def test_a_uri_outside_the_store_is_refused(
    topic: dict[str, Any], source: Path, tmp_path: Path
) -> None:
    settings = _settings(tmp_path)
    record = _announce(settings, source)
    # The very same files, where they were trained: their digest matches, their place not.
    outside = {**record, "uri": source.resolve().as_uri()}
    with pytest.raises(UntrustedModelError, match="outside JODIE_MODEL_STORE"):
        verified(outside, settings)
    # Promotion, the router and the workers all refuse it the same way.
    topic["jodie@v1"] = outside
    with pytest.raises(UntrustedModelError, match="outside JODIE_MODEL_STORE"):
        Registry(settings).promote("v1")
    with pytest.raises(UntrustedModelError, match="outside JODIE_MODEL_STORE"):
        model_features(outside, settings)
    with pytest.raises(UntrustedModelError, match="outside JODIE_MODEL_STORE"):
        catch_up(settings, outside)
    assert "jodie" not in topic  # nothing promoted
    # A root of JODIE_MODEL_ALLOW is trusted like the store.
    assert verified(outside, _settings(tmp_path, model_allow=(source.parent,))) == source.resolve()


@pytest.mark.parametrize(
    "uri",
    [
        "file:///etc",
        "file:///etc/passwd",
        "/etc",
        "file://{tmp}/store-sibling/jodie/v1",  # a sibling whose name starts like the store's
        "file://{tmp}/store/jodie/../../elsewhere",  # '..' out of the store
        "file://{tmp}/store",  # the store itself is no checkpoint
        "file://otherhost{tmp}/store/jodie/v1",
        "https://models.example/jodie/v1",
        "store/jodie/v1",  # relative: depends on where the worker runs
        "file://{tmp}/store/jodie/v1\x00",
    ],
)
def test_uris_that_lead_elsewhere_are_refused(
    topic: dict[str, Any], source: Path, tmp_path: Path, uri: str
) -> None:
    settings = _settings(tmp_path)
    record = _announce(settings, source)
    shutil.copytree(source, tmp_path / "store-sibling" / "jodie" / "v1")
    shutil.copytree(source, tmp_path / "elsewhere")
    with pytest.raises(UntrustedModelError):
        verified({**record, "uri": uri.format(tmp=tmp_path)}, settings)


def test_a_symlink_in_the_store_does_not_lead_out(
    topic: dict[str, Any], source: Path, tmp_path: Path
) -> None:
    settings = _settings(tmp_path)
    record = _announce(settings, source)
    (tmp_path / "store" / "jodie" / "v2").symlink_to(source)
    link = (tmp_path / "store" / "jodie" / "v2").absolute().as_uri()
    with pytest.raises(UntrustedModelError, match="outside JODIE_MODEL_STORE"):
        verified({**record, "uri": link}, settings)


# --- names ------------------------------------------------------------------------------------

BAD_NAMES = ["a/b", "/etc", "..", "../..", "v1/../..", "a..b", "a\x00b", "v1\n", "", "x" * 129]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_names_are_refused(
    topic: dict[str, Any], source: Path, tmp_path: Path, name: str
) -> None:
    settings = _settings(tmp_path)
    record = _announce(settings, source)
    with pytest.raises(RegistryError, match="bad version"):
        verified({**record, "version": name}, settings)
    with pytest.raises(RegistryError, match="bad model name"):
        verified({**record, "name": name}, settings)
    with pytest.raises(RegistryError, match="bad model name"):
        Registry(settings, name)
    with pytest.raises(RegistryError, match="bad version"):
        _announce(settings, source, version=name)
    with pytest.raises(RegistryError, match="bad version"):
        Registry(settings).promote(name)


@pytest.mark.parametrize("name", ["v1", "jodie", "2024-06-01_run.3", "A" + "x" * 127])
def test_plain_names_pass(name: str) -> None:
    assert checked_name("version", name) == name


@pytest.mark.parametrize("version", ["../..", "[/red]"])
def test_announce_version_dot_dot_deletes_nothing(
    source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, version: str
) -> None:
    """`jodie models announce --version ../..` once removed the folder two levels above the
    model's (here: `outside`, which holds the store). The refusal is one line, whatever the
    name holds (rich markup included)."""
    from streams.cli import app
    from streams.settings import get_settings

    outside = tmp_path / "outside"
    store = outside / "store"
    (outside / "keep.txt").parent.mkdir(parents=True)
    (outside / "keep.txt").write_text("not the registry's")
    monkeypatch.setenv("JODIE_MODEL_STORE", str(store))
    get_settings.cache_clear()  # read once per process: earlier tests read other values
    try:
        result = CliRunner().invoke(app, ["models", "announce", str(source), "--version", version])
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    assert result.output.count("\n") == 1 and f"error: bad version {version!r}" in result.output
    assert (outside / "keep.txt").read_text() == "not the registry's"
    assert not store.exists()


# --- the digest covers every file -------------------------------------------------------------


def test_an_edited_checkpoint_json_is_refused(
    topic: dict[str, Any], source: Path, tmp_path: Path
) -> None:
    """The Δ statistics live in checkpoint.json, which its own manifest does not cover."""
    settings = _settings(tmp_path)
    record = _announce(settings, source)
    meta_path = tmp_path / "store" / "jodie" / "v1" / "checkpoint.json"
    meta = json.loads(meta_path.read_text())
    meta["model_config"]["delta_user_mean"] *= 10
    meta_path.write_text(json.dumps(meta, indent=2, sort_keys=True))
    with pytest.raises(CheckpointError, match=r"does not match the \w+ announced for jodie v1"):
        verified(record, settings)
    with pytest.raises(CheckpointError):
        Registry(settings).promote("v1")
    with pytest.raises(CheckpointError):
        model_features(record, settings)
    with pytest.raises(CheckpointError):
        catch_up(settings, record)


def test_a_changed_weights_file_is_refused(
    topic: dict[str, Any], source: Path, tmp_path: Path
) -> None:
    settings = _settings(tmp_path)
    record = _announce(settings, source)
    copy = tmp_path / "store" / "jodie" / "v1"
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        verified(record, settings)  # its own manifest already says so
    # The manifest rewritten to match: now only the announced digest tells.
    meta = json.loads((copy / "checkpoint.json").read_text())
    meta["sha256"]["model.safetensors"] = sha256_file(weights)
    (copy / "checkpoint.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="announced for jodie v1"):
        verified(record, settings)
    # And a digest taken from the tampered files is refused by the signature, when signed.
    forged = {**record, "sha256": checkpoint_digest(copy)}
    verified(forged, settings)  # unsigned: a writer of the topic could do this...
    with pytest.raises(UntrustedModelError, match="unsigned"):
        verified(forged, _settings(tmp_path, model_signing_key="k"))  # ...not with a key


def test_an_extra_file_is_refused(topic: dict[str, Any], source: Path, tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    record = _announce(settings, source)
    (tmp_path / "store" / "jodie" / "v1" / "extra.safetensors").write_bytes(b"\0")
    with pytest.raises(CheckpointError, match="announced for jodie v1"):
        verified(record, settings)


def test_an_announced_log_position_must_be_the_checkpoints(
    topic: dict[str, Any], source: Path, tmp_path: Path
) -> None:
    """Workers catch a version up from its announced position: it cannot be made up."""
    settings = _settings(tmp_path)
    record = _announce(settings, source)
    with pytest.raises(UntrustedModelError, match="log position"):
        verified({**record, "log_seq": 10}, settings)
    with pytest.raises(UntrustedModelError, match="log position"):
        verified({**record, "log_offsets": [{"partition": 0, "offset": 99}]}, settings)


# --- what the workers serve ------------------------------------------------------------------


def test_a_checkpoint_with_a_ranker_the_workers_do_not_serve_is_refused(
    topic: dict[str, Any], source: Path, tmp_path: Path
) -> None:
    """Workers rank with the scorers they know (plain, history, the learned ranker): a
    checkpoint of another would be ranked by distance alone while `jodie evaluate` measured
    its own ranker."""
    ranker = tmp_path / "ranker"
    shutil.copytree(source, ranker)
    meta = json.loads((ranker / "checkpoint.json").read_text())
    meta["model_config"]["scorer"] = "boosted-trees"
    (ranker / "checkpoint.json").write_text(json.dumps(meta))
    settings = _settings(tmp_path)
    with pytest.raises(UnservableModelError, match="'boosted-trees' scorer, which the workers"):
        _announce(settings, ranker, "v2")
    assert topic == {}  # nothing announced
    # A record of it written by other means is refused by every loader as well.
    record = _announce(settings, source)
    shutil.copyfile(
        ranker / "checkpoint.json", tmp_path / "store" / "jodie" / "v1" / "checkpoint.json"
    )
    served = {**record, "sha256": checkpoint_digest(tmp_path / "store" / "jodie" / "v1")}
    with pytest.raises(UnservableModelError):
        verified(served, settings)
    with pytest.raises(UnservableModelError):
        catch_up(settings, served)


def test_a_learned_ranker_checkpoint_is_served(
    topic: dict[str, Any], source: Path, tmp_path: Path
) -> None:
    """The learned ranker is served as it is evaluated (streams.app.serving): announced and
    verified like any other version."""
    ranker = tmp_path / "ranker"
    shutil.copytree(source, ranker)
    meta = json.loads((ranker / "checkpoint.json").read_text())
    meta["model_config"]["scorer"] = "ranker"
    (ranker / "checkpoint.json").write_text(json.dumps(meta))
    settings = _settings(tmp_path)
    record = _announce(settings, ranker, "v2")
    assert verified(record, settings) == (tmp_path / "store" / "jodie" / "v2").resolve()


# --- signatures -------------------------------------------------------------------------------


def test_with_a_key_only_a_right_signature_passes(
    topic: dict[str, Any], source: Path, tmp_path: Path
) -> None:
    keyed = _settings(tmp_path, model_signing_key="shared secret")
    record = _announce(keyed, source)
    assert record["signature"] == signature(
        SecretStr("shared secret"), "jodie", "v1", record["sha256"]
    )
    assert verified(record, keyed) == (tmp_path / "store" / "jodie" / "v1").resolve()
    assert Registry(keyed).promote("v1")["signature"] == record["signature"]

    with pytest.raises(UntrustedModelError, match="unsigned and JODIE_MODEL_SIGNING_KEY is set"):
        verified({**record, "signature": None}, keyed)
    other_key = _settings(tmp_path, model_signing_key="another secret")
    with pytest.raises(UntrustedModelError, match="signature is not valid"):
        verified(record, other_key)
    with pytest.raises(UntrustedModelError, match="signature is not valid"):
        verified({**record, "signature": "00" * 32}, keyed)
    # A signature covers its name and version: it cannot vouch for another one.
    shutil.copytree(tmp_path / "store" / "jodie" / "v1", tmp_path / "store" / "jodie" / "v2")
    moved = {**record, "version": "v2", "uri": (tmp_path / "store/jodie/v2").resolve().as_uri()}
    with pytest.raises(UntrustedModelError, match="signature is not valid"):
        verified(moved, keyed)

    # An unsigned announcement: refused by promote (and everyone) once the key is set.
    unsigned = _announce(_settings(tmp_path), source, version="v3")
    assert unsigned["signature"] is None
    with pytest.raises(UntrustedModelError, match="unsigned"):
        Registry(keyed).promote("v3")
    with pytest.raises(UntrustedModelError, match="unsigned"):
        model_features(unsigned, keyed)
    with pytest.raises(UntrustedModelError, match="unsigned"):
        catch_up(keyed, unsigned)
    # Without a key, signatures are not checked.
    assert verified(unsigned, _settings(tmp_path))
    assert verified(record, _settings(tmp_path))

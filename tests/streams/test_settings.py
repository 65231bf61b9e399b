"""Settings come from JODIE_* variables."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from streams.settings import Settings


def test_env_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JODIE_BROKER_PORT", "19999")
    monkeypatch.setenv("JODIE_PARTITIONS", "8")
    monkeypatch.setenv("JODIE_TOPIC_PREFIX", "x-")
    monkeypatch.delenv("JODIE_BOOTSTRAP", raising=False)
    s = Settings()
    assert s.partitions == 8
    assert s.bootstrap_servers == "127.0.0.1:19999"
    assert s.topic("interactions") == "x-interactions"


def test_explicit_bootstrap_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JODIE_BOOTSTRAP", "kafka-1:9092,kafka-2:9092")
    assert Settings().bootstrap_servers == "kafka-1:9092,kafka-2:9092"


def test_settings_are_frozen_and_typed(monkeypatch: pytest.MonkeyPatch) -> None:
    s = Settings()
    with pytest.raises(ValidationError):
        s.partitions = 3  # type: ignore[misc]
    monkeypatch.setenv("JODIE_PARTITIONS", "many")
    with pytest.raises(ValidationError):
        Settings()


def test_a_bad_variable_is_one_line_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from streams.cli import app
    from streams.exceptions import SettingsError
    from streams.settings import get_settings

    monkeypatch.setenv("JODIE_EVALUATE_EVERY", "0")
    get_settings.cache_clear()  # read once per process: earlier tests read good ones
    try:
        with pytest.raises(SettingsError, match="JODIE_EVALUATE_EVERY='0'"):
            get_settings()
        result = CliRunner().invoke(app, ["metrics"])
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    assert "JODIE_EVALUATE_EVERY='0': Input should be greater than or equal to 1" in result.output


def test_model_allow_is_path_like_and_the_signing_key_secret(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from pathlib import Path

    assert Settings().model_allow == ()
    monkeypatch.setenv("JODIE_MODEL_ALLOW", "/srv/models::/mnt/ckpt")
    monkeypatch.setenv("JODIE_MODEL_SIGNING_KEY", "s3cret")
    s = Settings()
    assert s.model_allow == (Path("/srv/models"), Path("/mnt/ckpt"))
    assert s.model_signing_key is not None and "s3cret" not in repr(s)
    monkeypatch.setenv("JODIE_MODEL_SIGNING_KEY", "")  # a secret that did not arrive
    with pytest.raises(ValidationError, match="unset it to turn signing off"):
        Settings()

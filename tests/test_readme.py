"""The README stays true: every setting documented, the two commands are the scripts CI runs."""

from __future__ import annotations

from pathlib import Path

from streams.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_every_setting_is_documented() -> None:
    for name in Settings.model_fields:
        assert f"`JODIE_{name.upper()}`" in README, f"JODIE_{name.upper()} missing from README"


def test_ci_runs_the_readme_test_command() -> None:
    assert "bash deploy/test.sh" in README and "bash deploy/demo.sh" in README
    assert "deploy/test.sh" in (ROOT / ".ci" / "run").read_text()

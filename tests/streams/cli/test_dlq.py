"""`jodie dlq show` and `jodie dlq replay` on the rejected events of a real pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from schemas.codec import INTERACTION
from streams.codecs import make_codec
from streams.peek import read_with_headers
from streams.produce import produce_messages, produce_rows
from streams.router import Router, RouterStats
from streams.settings import Settings
from tests.streams.cli.conftest import RESENT, Jodie, Pipeline

pytestmark = pytest.mark.kafka


def test_show_lists_each_rejected_event_with_its_reason(pipeline: Pipeline, jodie: Jodie) -> None:
    result = jodie(["dlq", "show"], pipeline.env)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == RESENT + 1
    duplicates = [line for line in lines if line.startswith("duplicate  event ")]
    assert len(duplicates) == RESENT
    assert all("was already sequenced" in line for line in duplicates)
    (malformed,) = [line for line in lines if line.startswith("malformed  not an event")]
    assert "single-object" in malformed
    assert (
        result.stderr == f"rejected events shown: {RESENT + 1} (duplicate {RESENT}, malformed 1)\n"
    )


def test_show_selects_by_reason_and_limit(pipeline: Pipeline, jodie: Jodie) -> None:
    result = jodie(["dlq", "show", "--reason", "duplicate", "--limit", "2", "--json"], pipeline.env)
    assert result.exit_code == 0, result.output
    shown = [json.loads(line) for line in result.stdout.splitlines()]
    assert [m["reason"] for m in shown] == ["duplicate", "duplicate"]
    for m in shown:
        assert m["event"]["user_id"] == m["key"]
        assert m["source"].startswith(pipeline.settings.topic("interactions") + "/")


def test_replay_resends_the_original_bytes_and_a_fixed_file(
    kafka: Settings, jodie: Jodie, tmp_path: Path
) -> None:
    """A pipeline of its own (no worker): three events sent twice, and one with a timestamp
    that is not a number. Replayed, rejected copies are rejected again as duplicates, byte for
    byte; the bad event, its timestamp fixed by hand in `dlq show --json`'s line, is
    sequenced."""
    env = {"JODIE_TOPIC_PREFIX": kafka.topic_prefix}
    produce_rows(kafka, start=0, limit=3)
    produce_rows(kafka, start=0, limit=3)
    codec = make_codec(kafka, INTERACTION, kafka.topic("interactions"))
    bad = {
        "event_id": "late-1",
        "user_id": "u-late",
        "item_id": "i-late",
        "timestamp": float("nan"),
        "features": [],
        "state_label": None,
    }
    produce_messages(kafka, [(b"u-late", codec.encode(bad))])
    assert _route(kafka).rejected_by_reason == {"duplicate": 3, "bad_timestamp": 1}
    first = _dlq(kafka)

    result = jodie(["dlq", "replay", "--reason", "duplicate", "--limit", "2"], env)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {
        "topic": kafka.topic("interactions"),
        "sent": 2,
        "skipped": {},
    }
    stats = _route(kafka)
    assert stats.rejected_by_reason == {"duplicate": 2} and stats.sequenced == 0
    duplicates = [m for m in first if m[2] == b"duplicate"]
    assert _dlq(kafka) == first + duplicates[:2]  # the same keys and bytes again

    shown = jodie(["dlq", "show", "--json", "--reason", "bad_timestamp"], env)
    (letter,) = [json.loads(line) for line in shown.stdout.splitlines()]
    assert letter["event"]["timestamp"] == "NaN" and "not finite" in letter["detail"]
    letter["event"]["timestamp"] = 100.0
    fixed = tmp_path / "fixed.jsonl"
    fixed.write_text(json.dumps(letter) + "\n")
    result = jodie(["dlq", "replay", "--from", str(fixed)], env)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["sent"] == 1
    stats = _route(kafka)
    assert stats.sequenced == 1 and stats.rejected == 0


def _route(settings: Settings) -> RouterStats:
    return Router(settings, grace_s=0.2).run(until_idle_s=1.0, max_seconds=120)


def _dlq(settings: Settings) -> list[tuple[bytes | None, bytes, bytes]]:
    """Key, value and reason of each DLQ message."""
    return [
        (k, v, h["reason"])
        for k, v, h in read_with_headers(settings, settings.topic("interactions.dlq"))
    ]

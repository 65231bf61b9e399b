"""The trainer process on the real broker: retrain from the log, announce, promote or not."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from operators.model.checkpoint import load_checkpoint
from operators.model.config import ModelConfig, TrainConfig
from streams.models import Registry, verified
from streams.settings import Settings
from streams.trainer import due, log_size, train_once
from tests.streams.harness import route

pytestmark = pytest.mark.kafka

TINY = TrainConfig(
    epochs=1,
    model=ModelConfig(embedding_dim=16, user_static_dim=8, item_static_dim=8, scorer="plain"),
)


def test_retrains_announces_and_promotes_only_what_validates(
    kafka: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JODIE_MODEL_STORE", str(tmp_path / "store"))
    settings = Settings()
    route(settings, 0, 1500)
    first = train_once(settings, TINY)
    registry = Registry(settings)
    assert first.promoted and first.serving_mrr is None  # nothing served yet
    assert registry.serving()["version"] == "v1"  # type: ignore[index]
    assert first.record["log_seq"] == 1500  # the states are at the end of the log
    ckpt = load_checkpoint(verified(first.record, settings))
    assert ckpt.last_seq is not None and int(ckpt.last_seq.users.max()) == 1499

    # More events; a second run that would have to beat the serving version by 1.0 on the
    # hold-out is announced but not promoted.
    route(settings, 1500, 500)
    second = train_once(settings, TINY, margin=-1.0)
    assert not second.promoted
    assert second.candidate is not None and second.serving is not None
    assert second.serving_mrr == second.serving.mrr
    assert [r["version"] for r in registry.versions()] == ["v1", "v2"]
    assert registry.serving()["version"] == "v1"  # type: ignore[index]
    assert second.record["log_seq"] == 2000


def test_promotes_only_a_candidate_that_beats_the_serving_version_on_the_same_holdout(
    kafka: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Serving: a model that never learned (lr 0). A trained candidate ranks the newest events
    better and is promoted; an untrained one after it is refused. Both sides of each
    comparison are scored on the same hold-out events, each with its own ranker."""
    monkeypatch.setenv("JODIE_MODEL_STORE", str(tmp_path / "store"))
    monkeypatch.setenv("JODIE_HOLDOUT_EVENTS", "300")
    settings = Settings()
    untrained = dataclasses.replace(TINY, lr=0.0)
    route(settings, 0, 1500)
    assert train_once(settings, untrained).promoted  # nothing served yet
    route(settings, 1500, 500)
    better = train_once(settings, TINY)
    assert better.candidate is not None and better.serving is not None
    # The hold-out: the newest 300 of the 2,000 events, after v1's log position (1,500).
    assert better.candidate.first_seq == better.serving.first_seq == 1700
    assert better.candidate.n_events == better.serving.n_events == 300
    print(f"\nhold-out MRR: trained {better.candidate.mrr:.4f}, untrained {better.serving.mrr:.4f}")
    assert better.candidate.mrr > better.serving.mrr and better.promoted
    assert Registry(settings).serving()["version"] == "v2"  # type: ignore[index]
    route(settings, 2000, 500)
    worse = train_once(settings, untrained)
    assert worse.candidate is not None and worse.serving is not None
    assert worse.candidate.first_seq == worse.serving.first_seq == 2200
    print(f"hold-out MRR: untrained {worse.candidate.mrr:.4f}, serving {worse.serving.mrr:.4f}")
    assert worse.candidate.mrr < worse.serving.mrr and not worse.promoted
    assert Registry(settings).serving()["version"] == "v2"  # type: ignore[index]


def test_the_log_size_counts_at_least_the_events(kafka: Settings) -> None:
    assert log_size(kafka) == 0
    route(kafka, 0, 300)
    assert log_size(kafka) >= 300  # events plus transaction markers


@pytest.mark.parametrize(
    ("grown", "elapsed", "every_seconds", "want"),
    [
        (999, 0.0, None, False),
        (1000, 0.0, None, True),
        (5, 59.0, 60.0, False),
        (5, 60.0, 60.0, True),
        (0, 3600.0, 60.0, False),  # nothing new: no run, however long
    ],
)
def test_due(grown: int, elapsed: float, every_seconds: float | None, want: bool) -> None:
    assert due(grown, elapsed, 1000, every_seconds) is want

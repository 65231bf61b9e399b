"""The worker's figures as Prometheus families: what WorkerStats counts, under stable names,
and nothing made up before it is measured."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from streams.app.metrics import WorkerCollector
from streams.app.processor import WorkerStats
from streams.app.serving import Serving
from streams.runtime.loop import LoopStats
from streams.settings import Settings
from tests.streams.harness import make_checkpoint


def _scrape(collector: WorkerCollector) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    registry = CollectorRegistry()
    registry.register(collector)
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_before_anything_is_measured_no_figure_is_made_up() -> None:
    got = _scrape(WorkerCollector(WorkerStats(), lambda: None))
    assert got[("jodie_events_applied_total", (("side", "user"),))] == 0
    assert got[("jodie_live_ranked_events_total", ())] == 0
    assert not [
        k for k in got if k[0] in ("jodie_live_mrr", "jodie_served_mrr", "jodie_model_info")
    ]


def test_counts_ranks_and_served_lists_are_exposed(tmp_path: Path) -> None:
    settings = Settings(topic_prefix="unit-")
    serving = Serving.load(settings, make_checkpoint(tmp_path / "v1", version="v1"))
    stats = WorkerStats()
    stats.user_events, stats.item_events, stats.messages = 5, 4, 12
    stats.quarantined = {"quarantined": 2, "unreadable_inbox": 1}
    for rank in (1, 4, 20):
        stats.ranks.add(rank)
    stats.served.event("u", "a", ["a", "b"])
    stats.served.event("u", "b", ["b"])  # b was second in the list served before: 1/2
    got = _scrape(WorkerCollector(stats, lambda: serving))
    assert got[("jodie_events_applied_total", (("side", "user"),))] == 5
    assert got[("jodie_events_applied_total", (("side", "item"),))] == 4
    assert got[("jodie_inbox_messages_total", ())] == 12
    assert got[("jodie_quarantined_events_total", (("reason", "quarantined"),))] == 2
    assert got[("jodie_quarantined_events_total", (("reason", "unreadable_inbox"),))] == 1
    assert got[("jodie_live_ranked_events_total", ())] == 3
    assert got[("jodie_live_mrr", (("span", "all"),))] == pytest.approx((1 + 1 / 4 + 1 / 20) / 3)
    assert got[("jodie_live_recall_at_10", (("span", "recent"),))] == pytest.approx(2 / 3)
    assert got[("jodie_served_events_total", ())] == 1
    assert got[("jodie_served_mrr", (("ranker", "model"),))] == 0.5
    assert got[("jodie_served_recall", (("ranker", "model"),))] == 1.0
    assert got[("jodie_model_info", (("epoch", "unstamped"), ("version", "v1")))] == 1
    assert got[("jodie_items_indexed", ())] == len(serving.index) > 0


def test_pre_state_ages_are_summarised_in_milliseconds() -> None:
    stats = WorkerStats()
    snapshot = stats.snapshot(None, LoopStats())
    assert snapshot["pre_states"] == {
        "taken": 0,
        "age_ms_p50": None,
        "age_ms_p99": None,
        "age_ms_max": None,
    }
    stats.pre_states = 101
    stats.pre_state_ages.extend([0.001 * i for i in range(101)])  # 0 to 100 ms
    got = stats.snapshot(None, LoopStats())["pre_states"]
    assert got == {"taken": 101, "age_ms_p50": 50.0, "age_ms_p99": 99.0, "age_ms_max": 100.0}

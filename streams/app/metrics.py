"""The JODIE worker's figures as Prometheus metric families, read from its counters at scrape.

Figures not measured yet (MRR before the first ranked event) are left out rather than shown
as NaN: in Prometheus an absent series reads as "no data", a NaN as a value.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from streams.app.epochs import label
from streams.app.processor import WorkerStats
from streams.app.serving import Serving


class WorkerCollector(Collector):
    """Events applied, quarantined events by reason, live and served ranking quality, the
    model versions served: everything ``WorkerStats`` counts, under ``namespace``."""

    def __init__(
        self, stats: WorkerStats, serving: Callable[[], Serving | None], namespace: str = "jodie"
    ) -> None:
        """``serving``: the latest epoch's serving, or None before any (a callable, since a
        model switch replaces it)."""
        self.stats = stats
        self.serving = serving
        self.ns = namespace

    def collect(self) -> Iterator[Metric]:
        s, ns, serving = self.stats, self.ns, self.serving()
        applied = CounterMetricFamily(
            f"{ns}_events_applied",
            "Events applied to this worker's rows, by side.",
            labels=["side"],
        )
        applied.add_metric(["user"], s.user_events)
        applied.add_metric(["item"], s.item_events)
        yield applied
        yield CounterMetricFamily(
            f"{ns}_inbox_messages", "Inbox messages processed (events and pre-states).", s.messages
        )
        yield CounterMetricFamily(
            f"{ns}_unstamped_skipped",
            "Inbox messages of events routed before any model version was promoted.",
            s.unstamped,
        )
        quarantined = CounterMetricFamily(
            f"{ns}_quarantined_events",
            "Events set aside to the dead-letter topic (interactions.dlq), by reason.",
            labels=["reason"],
        )
        for reason, n in sorted(dict(s.quarantined).items()):
            quarantined.add_metric([reason], n)
        yield quarantined
        yield from self._live(s)
        yield from self._served(s.served.summary())
        yield from self._model(serving, list(s.epochs))

    def _live(self, s: WorkerStats) -> Iterator[Metric]:
        ns, ranks = self.ns, s.ranks.summary()
        yield CounterMetricFamily(
            f"{ns}_live_ranked_events",
            "Events ranked by the live evaluation (the true item among all items, at the event).",
            ranks["events"],
        )
        mrr = GaugeMetricFamily(
            f"{ns}_live_mrr",
            "Live MRR of the true item's rank: over all ranked events (span=all) or the "
            "latest ones (span=recent).",
            labels=["span"],
        )
        recall = GaugeMetricFamily(
            f"{ns}_live_recall_at_10",
            "Live Recall@10: over all ranked events (span=all) or the latest ones (span=recent).",
            labels=["span"],
        )
        if ranks["events"]:
            mrr.add_metric(["all"], ranks["mrr"])
            recall.add_metric(["all"], ranks["recall_at_10"])
        if ranks["window"]:
            mrr.add_metric(["recent"], ranks["window_mrr"])
            recall.add_metric(["recent"], ranks["window_recall_at_10"])
        yield mrr
        yield recall

    def _served(self, served: dict[str, Any]) -> Iterator[Metric]:
        ns, k = self.ns, served["k"]
        yield CounterMetricFamily(
            f"{ns}_served_events",
            "Events whose user had been served a list before (the served figures' count).",
            served["events"],
        )
        recall = GaugeMetricFamily(
            f"{ns}_served_recall",
            f"Share of events whose item was in the {k} items served to its user before it: "
            "the model's list (ranker=model) and recent-then-popular's (ranker=heuristic).",
            labels=["ranker"],
        )
        mrr = GaugeMetricFamily(
            f"{ns}_served_mrr",
            "Mean of 1/position of each event's item in the list served before it (0: absent).",
            labels=["ranker"],
        )
        if served["events"]:
            recall.add_metric(["model"], served["recall"])
            recall.add_metric(["heuristic"], served["heuristic"]["recall"])
            mrr.add_metric(["model"], served["mrr"])
            mrr.add_metric(["heuristic"], served["heuristic"]["mrr"])
        yield recall
        yield mrr

    def _model(self, serving: Serving | None, epochs: list[dict[str, Any]]) -> Iterator[Metric]:
        ns = self.ns
        info = InfoMetricFamily(
            f"{ns}_model", "The model version serving the latest epoch.", labels=["epoch"]
        )
        if serving is not None:
            info.add_metric([label(serving.epoch)], {"version": serving.version})
        yield info
        yield GaugeMetricFamily(
            f"{ns}_items_indexed",
            "Items in the candidate index of the latest epoch.",
            len(serving.index) if serving is not None else 0,
        )
        catch_up = GaugeMetricFamily(
            f"{ns}_epoch_catch_up_seconds",
            "Seconds each served epoch's checkpoint took to catch up over the log.",
            labels=["epoch", "version"],
        )
        for e in epochs:
            catch_up.add_metric([label((e["version"], e["since"])), e["version"]], e["catch_up_s"])
        yield catch_up
        if serving is not None:
            live = serving.live
            yield GaugeMetricFamily(
                f"{ns}_evaluation_pending",
                "User events applied but not ranked yet (waiting for item states).",
                live.pending(),
            )
            yield CounterMetricFamily(
                f"{ns}_evaluation_unranked",
                "User events the live evaluation could not rank (their item states were gone).",
                live.unranked,
            )

"""What the dashboard knows of the pipeline, built from its topics' records; Kafka-free.

The reader (``streams.dashboard.reader``) hands each decoded record in with the time Kafka
stamped it; the server asks for ``overview()`` and ``user(...)`` as JSON-ready dicts. Memory
is bounded whatever the stream's length: time series keep a window of seconds, user views
the most recently active users, joins and item vectors a bounded number of entries.

Live quality. A worker ranks each evaluated event's item against every known item
(``evaluations``, ``operators.evaluation.live``); the dashboard ranks the same event with
the recency baseline (``operators.evaluation.baselines``: the user's items by recency, then
the others by popularity), learned from the ``interactions.log`` events it has read, and
charts the MRR and Recall@10 of both over the latest evaluated events. The served-list
figures (``operators.evaluation.served.ServedTally``) compare the lists users were sent with
the recent-then-popular heuristic at the same moments.
"""

from __future__ import annotations

import math
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from operators.evaluation.baselines import BaselineRanker
from operators.evaluation.served import ServedTally
from schemas import recommendation_vectors
from streams.dashboard.plane import Plane
from streams.dashboard.series import Series


@dataclass(frozen=True)
class BoardConfig:
    """Bounds and sampling of the dashboard's aggregates."""

    window_s: int = 600  # seconds of time series kept
    max_users: int = 2000  # users whose view is kept (the most recently active)
    trajectory: int = 64  # points of a user's trajectory kept
    recent_items: int = 10  # of a user's latest items
    quality_window: int = 200  # evaluated events behind each point of the quality chart
    evaluate_every: int = 10  # the workers' sample (JODIE_EVALUATE_EVERY): baseline ranks
    k: int = 10  # Recall@k, and the served lists' length
    max_items: int = 50_000  # items whose latest vector and count are kept
    max_pending: int = 100_000  # baseline ranks / evaluations waiting for each other
    plane_fit_on: int = 512  # vectors the trajectory plane is fitted on, per model version


@dataclass
class _User:
    events: int = 0
    last_seen: float = 0.0
    recent: deque[tuple[str, float, int]] = field(default_factory=deque)  # item, time, seq
    latest: dict[str, Any] | None = None
    trajectory: deque[tuple[float, str, str, str, np.ndarray]] = field(default_factory=deque)
    evaluations: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=10))


@dataclass
class _Quality:
    """Sums over evaluated events that have both ranks."""

    n: int = 0
    model_rr: float = 0.0
    model_hits: int = 0
    base_rr: float = 0.0
    base_hits: int = 0

    def add(self, model_rank: int, base_rank: int, k: int) -> None:
        self.n += 1
        self.model_rr += 1.0 / model_rank
        self.model_hits += model_rank <= k
        self.base_rr += 1.0 / base_rank
        self.base_hits += base_rank <= k

    def summary(self) -> dict[str, Any]:
        n = self.n
        return {
            "events": n,
            "model_mrr": self.model_rr / n if n else None,
            "model_recall": self.model_hits / n if n else None,
            "baseline_mrr": self.base_rr / n if n else None,
            "baseline_recall": self.base_hits / n if n else None,
        }


class Board:
    """The dashboard's state; every ``on_*`` takes one record and the time (epoch seconds)
    Kafka stamped it with. Not thread-safe: the caller holds one lock around it."""

    def __init__(self, config: BoardConfig | None = None) -> None:
        self.config = c = config or BoardConfig()
        self.throughput = Series(c.window_s)  # log, recs, evals, dlq per second
        self.lag = Series(c.window_s)  # router, workers (gauges)
        self.quality_series = Series(c.window_s)  # per second: quality sums
        self.quality = _Quality()
        self.model_only = 0  # evaluations whose event the baseline never saw
        self.baseline = BaselineRanker("recency", max_users=100 * c.max_users)
        self.served = ServedTally(c.k, max_users=100 * c.max_users)
        self._baseline_at: OrderedDict[int, int] = OrderedDict()  # seq → baseline rank
        self._waiting: OrderedDict[int, tuple[float, int]] = OrderedDict()  # seq → (t, rank)
        self._first_seq: int | None = None
        self.users: OrderedDict[str, _User] = OrderedDict()
        # item → (latest vector, the version that computed it, events in the log read)
        self.items: OrderedDict[str, tuple[np.ndarray | None, str, int]] = OrderedDict()
        self.planes: OrderedDict[str, Plane] = OrderedDict()
        self.totals: Counter[str] = Counter()
        self.undecodable: Counter[str] = Counter()
        self.versions: dict[str, dict[str, Any]] = {}  # "name@version" → announcement
        self.serving: dict[str, dict[str, Any]] = {}  # model name → promoted record
        self.promotions: deque[dict[str, Any]] = deque(maxlen=50)
        self.switches: deque[dict[str, Any]] = deque(maxlen=50)
        self._epoch: tuple[str, int] | None = None
        self.recs_by_version: Counter[str] = Counter()
        self.dlq_reasons: Counter[str] = Counter()
        self.dlq_recent: deque[dict[str, Any]] = deque(maxlen=20)
        self.workers: list[dict[str, Any]] = []
        self.lag_error: str | None = None
        self.last_record = 0.0
        self.meta: dict[str, Any] = {}  # what the page shows of the pipeline (prefix, brokers)

    # -- records ---------------------------------------------------------------------------
    def on_log(self, record: dict[str, Any], t: float) -> None:
        """A SequencedInteraction of ``interactions.log``."""
        c = self.config
        seq = int(record["seq"])
        event = record["interaction"]
        user, item = str(event["user_id"]), str(event["item_id"])
        self._seen(t, "log")
        if self._first_seq is None or seq < self._first_seq:
            self._first_seq = seq
        if seq % c.evaluate_every == 0 or seq in self._waiting:
            rank = self.baseline.rank(user, item)
            waiting = self._waiting.pop(seq, None)
            if waiting is not None:
                self._join(waiting[0], waiting[1], rank)
            else:
                self._bounded_put(self._baseline_at, seq, rank)
        self.baseline.observe(user, item)
        vector, made_by, count = self.items.get(item, (None, "", 0))
        self._put_item(item, vector, made_by, count + 1)
        view = self._user(user, t)
        view.events += 1
        view.recent = deque(
            [(item, float(event["timestamp"]), seq), *(r for r in view.recent if r[0] != item)],
            maxlen=c.recent_items,
        )
        version, since = str(record.get("model_version") or ""), int(record.get("model_since", -1))
        # Events of an earlier epoch still come after a switch (other partitions): only a
        # later start is a switch.
        if version and (self._epoch is None or since > self._epoch[1]):
            self.switches.append({"t": t, "version": version, "since_seq": since})
            self._epoch = (version, since)

    def on_recommendation(self, record: dict[str, Any], t: float) -> None:
        """A Recommendation: the user's latest list, a trajectory point, the served tally."""
        c = self.config
        self._seen(t, "recs")
        user, version = str(record["user_id"]), str(record["model_version"])
        self.recs_by_version[version] += 1
        candidates = [(str(x["item_id"]), float(x["score"])) for x in record["candidates"]]
        if record.get("item_id"):
            self.served.event(user, str(record["item_id"]), [i for i, _ in candidates])
        view = self._user(user, t)
        projected, predicted = recommendation_vectors(record)
        view.latest = {
            "event_id": record["event_id"],
            "item_id": record.get("item_id", ""),
            "timestamp": float(record["timestamp"]),
            "model_version": version,
            "received": t,
            "state_change_probability": record.get("state_change_probability"),
            "candidates": candidates,
            "predicted_item": predicted,
        }
        vector = projected
        self._plane(version).offer(vector)
        view.trajectory.append(
            (
                float(record["timestamp"]),
                str(record["event_id"]),
                str(record.get("item_id", "")),
                version,
                vector.astype(np.float16),  # half the memory; a 2-D plot needs no more
            )
        )
        while len(view.trajectory) > c.trajectory:
            view.trajectory.popleft()

    def on_evaluation(self, record: dict[str, Any], t: float) -> None:
        """An Evaluation: the model's rank of the event's item, joined with the baseline's."""
        self._seen(t, "evals")
        seq, rank = int(record["seq"]), int(record["rank"])
        view = self.users.get(str(record["user_id"]))
        entry = {
            "event_id": record["event_id"],
            "item_id": record["item_id"],
            "rank": rank,
            "n_items": int(record["n_items"]),
            "baseline_rank": self._baseline_at.get(seq),
            "model_version": record["model_version"],
        }
        if view is not None:
            view.evaluations.appendleft(entry)
        base = self._baseline_at.pop(seq, None)
        if base is not None:
            self._join(t, rank, base)
        elif self._first_seq is not None and seq < self._first_seq:
            self.model_only += 1  # before the log events this dashboard read
        else:
            self._bounded_put(self._waiting, seq, (t, rank))

    def on_model(self, key: str, record: dict[str, Any], t: float) -> None:
        """A ModelAnnouncement: a version (key ``name@version``) or a promotion (``name``)."""
        self._seen(t, None)
        summary = {
            "name": record["name"],
            "version": record["version"],
            "log_seq": record.get("log_seq", -1),
            "metrics": {k: _finite(v) for k, v in (record.get("metrics") or {}).items()},
            "created_at": record.get("created_at_ms", 0) / 1000.0,
        }
        if "@" in key:
            self.versions[key] = summary
        else:
            previous = self.serving.get(key)
            if previous is None or previous["version"] != record["version"]:
                self.promotions.append(
                    {"t": t, **summary, "previous": record.get("previous_version")}
                )
            self.serving[key] = summary

    def on_dlq(self, reason: str, detail: str, source: str, t: float) -> None:
        """A rejected message of ``interactions.dlq`` (its headers)."""
        self._seen(t, "dlq")
        self.dlq_reasons[reason or "unknown"] += 1
        self.dlq_recent.appendleft(
            {"t": t, "reason": reason or "unknown", "detail": detail[:200], "source": source}
        )

    def on_item_vector(self, item: str, vector: np.ndarray, version: str) -> None:
        """An item's latest [i(t), ī] (``item-vectors``), computed by model ``version`` (""
        for the unstamped stream of workers serving one checkpoint)."""
        self._put_item(item, vector, version, self.items.get(item, (None, "", 0))[2])

    def on_lag(self, t: float, lags: dict[str, int | None], error: str | None = None) -> None:
        """Consumer groups' lag (messages) measured at ``t``: ``router``, ``workers``."""
        self.lag_error = error
        known = {k: float(v) for k, v in lags.items() if v is not None}
        if known:
            self.lag.set(t, **known)

    def on_undecodable(self, topic: str) -> None:
        self.undecodable[topic] += 1

    # -- helpers ---------------------------------------------------------------------------
    def _seen(self, t: float, counter: str | None) -> None:
        self.last_record = max(self.last_record, t)
        if counter is not None:
            self.totals[counter] += 1
            self.throughput.add(t, **{counter: 1.0})

    def _join(self, t: float, model_rank: int, base_rank: int) -> None:
        k = self.config.k
        self.quality.add(model_rank, base_rank, k)
        self.quality_series.add(
            t,
            n=1.0,
            model_rr=1.0 / model_rank,
            model_hits=float(model_rank <= k),
            base_rr=1.0 / base_rank,
            base_hits=float(base_rank <= k),
        )

    def _bounded_put(self, table: OrderedDict[int, Any], key: int, value: Any) -> None:
        table[key] = value
        while len(table) > self.config.max_pending:
            table.popitem(last=False)

    def _user(self, user: str, t: float) -> _User:
        view = self.users.get(user)
        if view is None:
            view = self.users[user] = _User(recent=deque(maxlen=self.config.recent_items))
            while len(self.users) > self.config.max_users:
                self.users.popitem(last=False)
        else:
            self.users.move_to_end(user)
        view.last_seen = max(view.last_seen, t)
        return view

    def _put_item(self, item: str, vector: np.ndarray | None, version: str, count: int) -> None:
        self.items[item] = (vector, version, count)
        self.items.move_to_end(item)
        while len(self.items) > self.config.max_items:
            self.items.popitem(last=False)

    def _plane(self, version: str) -> Plane:
        plane = self.planes.get(version)
        if plane is None:
            plane = self.planes[version] = Plane(self.config.plane_fit_on)
            while len(self.planes) > 8:
                self.planes.popitem(last=False)
        return plane

    # -- views -----------------------------------------------------------------------------
    def overview(self, now: float | None = None) -> dict[str, Any]:
        """Everything the page charts, JSON-ready (no NaN); the time series run to ``now``
        (epoch seconds) when the stream was active within their window."""
        latest_serving = max(self.serving.values(), key=lambda r: r["created_at"], default=None)
        served = self.served.summary()
        return {
            "pipeline": self.meta,
            "last_record": self.last_record or None,
            "totals": {
                "log": self.totals["log"],
                "recommendations": self.totals["recs"],
                "evaluations": self.totals["evals"],
                "dlq": self.totals["dlq"],
                "users": len(self.users),
                "items": len(self.items),
            },
            "undecodable": dict(self.undecodable),
            "throughput": self.throughput.frame(["log", "recs", "dlq"], until=now),
            "lag": {
                **self.lag.frame(["router", "workers"], fill=None, until=now),
                "error": self.lag_error,
            },
            "quality": {
                **self._quality_frame(),
                "window": self.config.quality_window,
                "k": self.config.k,
                "total": self.quality.summary(),
                "model_only": self.model_only,
                "evaluate_every": self.config.evaluate_every,
            },
            "served": {
                "events": served["events"],
                "model": {"mrr": _finite(served["mrr"]), "recall": _finite(served["recall"])},
                "heuristic": {
                    "mrr": _finite(served["heuristic"]["mrr"]),
                    "recall": _finite(served["heuristic"]["recall"]),
                },
            },
            "models": {
                "versions": sorted(self.versions.values(), key=lambda r: r["created_at"]),
                "serving": latest_serving,
                "promotions": list(self.promotions),
                "switches": list(self.switches),
                "recommendations_by_version": dict(self.recs_by_version),
            },
            "dlq": {
                "by_reason": dict(self.dlq_reasons.most_common()),
                "recent": list(self.dlq_recent),
            },
            "workers": self.workers,
            "active_users": list(reversed(list(self.users)[-12:])),
        }

    def _quality_frame(self) -> dict[str, list[Any]]:
        """Per second with evaluations, the MRR and Recall@k of model and baseline over the
        latest ``quality_window`` evaluated events up to that second."""
        names = ("n", "model_rr", "model_hits", "base_rr", "base_hits")
        buckets = self.quality_series.buckets()
        if not buckets:
            return {
                "t": [],
                "model_mrr": [],
                "model_recall": [],
                "baseline_mrr": [],
                "baseline_recall": [],
            }
        sums = np.array([[b.get(name, 0.0) for name in names] for _, b in buckets])  # (B, 5)
        cum = np.vstack([np.zeros((1, len(names))), np.cumsum(sums, axis=0)])  # (B + 1, 5)
        # For each second j, the latest buckets s..j holding at least `quality_window` events
        # (all of them when there are fewer): the largest s with cum[s] <= cum[j+1] - window.
        ends = np.arange(1, len(buckets) + 1)
        limit = cum[ends, 0] - self.config.quality_window
        starts = np.clip(np.searchsorted(cum[:, 0], limit, side="right") - 1, 0, None)
        window = cum[ends] - cum[starts]  # (B, 5)
        n = np.maximum(window[:, 0], 1.0)
        keep = window[:, 0] > 0
        seconds = np.array([second for second, _ in buckets])
        return {
            "t": seconds[keep].tolist(),
            "model_mrr": (window[:, 1] / n)[keep].tolist(),
            "model_recall": (window[:, 2] / n)[keep].tolist(),
            "baseline_mrr": (window[:, 3] / n)[keep].tolist(),
            "baseline_recall": (window[:, 4] / n)[keep].tolist(),
        }

    def find_users(self, prefix: str, limit: int = 20) -> list[str]:
        """Kept users whose id starts with ``prefix``, most recently active first."""
        found = []
        for user in reversed(self.users):
            if user.startswith(prefix):
                found.append(user)
                if len(found) == limit:
                    break
        return found

    def user(self, user_id: str) -> dict[str, Any] | None:
        """One user's view, JSON-ready; None when the user is not among the kept ones."""
        view = self.users.get(user_id)
        if view is None:
            return None
        return {
            "user_id": user_id,
            "events": view.events,
            "last_seen": view.last_seen,
            "recent_items": [
                {"item_id": i, "timestamp": ts, "seq": seq} for i, ts, seq in view.recent
            ],
            "latest": self._explained(view),
            "evaluations": list(view.evaluations),
            "trajectory": self._trajectory(view),
        }

    def _explained(self, view: _User) -> dict[str, Any] | None:
        """The latest list with what each candidate's score is made of that the dashboard can
        see: the squared distance of the item's latest vector to the predicted next item
        (the model's term), the item's place in the user's recent items, its events."""
        latest = view.latest
        if latest is None:
            return None
        recent = {item: j + 1 for j, (item, _, _) in enumerate(view.recent)}
        predicted: np.ndarray = latest["predicted_item"]
        top = latest["candidates"][0][1] if latest["candidates"] else 0.0
        candidates = []
        for rank, (item, score) in enumerate(latest["candidates"], start=1):
            vector, made_by, count = self.items.get(item, (None, "", 0))
            comparable = (
                vector is not None
                and vector.shape == predicted.shape
                and made_by in ("", latest["model_version"])  # one model's space
            )
            distance = float(np.square(vector - predicted).sum()) if comparable else None
            candidates.append(
                {
                    "rank": rank,
                    "item_id": item,
                    "score": _finite(score),
                    "below_top": _finite(top - score),
                    "distance": _finite(distance),
                    "recent_position": recent.get(item),
                    "events": count,
                }
            )
        return {
            **{k: v for k, v in latest.items() if k not in ("candidates", "predicted_item")},
            "state_change_probability": _finite(latest["state_change_probability"]),
            "candidates": candidates,
        }

    def _trajectory(self, view: _User) -> dict[str, Any]:
        """The user's points in their latest version's fixed plane (another version's
        embeddings live in another space, so they are counted, not drawn)."""
        if not view.trajectory:
            return {"points": [], "hidden": 0}
        version = view.trajectory[-1][3]
        mine = [p for p in view.trajectory if p[3] == version]
        plane = self._plane(version)
        xy = plane.project(np.stack([p[4].astype(np.float32) for p in mine]))
        return {
            "version": version,
            "points": [
                {"x": float(x), "y": float(y), "timestamp": ts, "event_id": e, "item_id": i}
                for (ts, e, i, _, _), (x, y) in zip(mine, xy.tolist(), strict=True)
            ],
            "hidden": len(view.trajectory) - len(mine),
            "plane": {
                "fitted_on": plane.fitted_on,
                "fixed": plane.fixed,
                "explained": [round(v, 4) for v in plane.explained],
            },
        }


def _finite(value: Any) -> float | None:
    """JSON has no NaN or infinity: those become null."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None

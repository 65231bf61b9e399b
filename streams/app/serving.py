"""What one worker serves with one model version: weights, baseline states, candidate index,
the live evaluation, and the one place where user-side outputs become recommendation records.

Lists are ranked by the model's default ranker, the one ``jodie evaluate`` reports
(``operators.evaluation.scorer``, fitted parameters from the checkpoint): with the history
scorer, score = −α‖j̃ − [j, j̄]‖² + b_pos + β·log(1 + n_user,j) + γ·log(1 + n_j) +
δ·log(1 + m_j(t)); with the learned ranker (``operators.evaluation.ranker``), −α‖·‖² plus its
item term w·x_j and its bonus for the user's own items, read from the user's row (history,
counts, times, habits). The index keeps each item's event count, decayed count and time beside its
vector (as its owner computed them after its latest event), so the popularity terms of an
item are as fresh as its vector; in the exact tier the list is the ranker's exact top k over
every indexed item (the item terms taken at each event's time).

Between events, ``rank_user`` answers an interactive query with the same ranker: the user's
state projected to a time ``t`` (by default the worker's stream time, ``clock``), as the
offline ``OnlineJodie.query`` would at that time. Queries run on other threads than the
processing: they read the index under ``lock``, which ``upsert`` holds to change it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from operators.evaluation.context import UserContext
from operators.evaluation.live import LiveRanks, Ranks
from operators.evaluation.ranker import LearnedRanker, item_features
from operators.evaluation.scorer import HistoryScorer, Scorer, log1p_count, make_scorer
from operators.model.checkpoint import Checkpoint, load_checkpoint
from operators.model.state import TREND_SECONDS, trend_at
from operators.model.static import static_embeddings
from operators.protocol.sides import CheckpointStates, EntityState, StreamModel, UserOutput
from operators.retrieval.cooccurrence import CooccurrenceCandidates
from operators.retrieval.tiered import TieredIndex
from streams.app.epochs import UNSTAMPED, Epoch, label
from streams.app.evaluation import RanksApart
from streams.settings import Settings


def model_version(ckpt: Checkpoint) -> str:
    meta = ckpt.meta
    version = meta.get("version")
    if isinstance(version, str) and version:
        return version
    return f"sha-{meta['sha256']['model.safetensors'][:12]}"


#: The learned ranker's item terms, as the answers to interactive queries explain them.
_LEARNED_ITEM_TERMS = (
    "w.(log(1 + events on j), log(1 + events on j decayed over one day), "
    "-log(1 + seconds since anyone touched j)/10)"
)


def ranking_key(ranker: Scorer, now: float) -> dict[str, Any]:
    """The ranker's scale and item-only term at time ``now``, as ``TieredIndex`` takes them
    (a function of the index's item attributes: count, decayed count, time); {} for plain."""
    if isinstance(ranker, LearnedRanker):

        def learned(attrs: np.ndarray) -> np.ndarray:
            return ranker.prior(_item_features(attrs, now))

        return {"scale": ranker.scale, "prior": learned}
    if not isinstance(ranker, HistoryScorer):
        return {}
    gamma, delta = float(ranker.gamma), float(ranker.delta)

    def prior(attrs: np.ndarray) -> np.ndarray:
        trend = trend_at(attrs[:, 1], attrs[:, 2], now)
        return gamma * np.log1p(attrs[:, 0]) + delta * np.log1p(trend)

    return {"scale": float(ranker.log_alpha.exp()), "prior": prior}


def _counted_at(attrs: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Items' index attributes (B, 3: count, decayed count, time) after one more event each
    at its time ``t`` (B,) (``operators.protocol.sides.counted``'s rule), when the index
    holds them from before: the item a user just touched, whose owner's vector has not come
    through yet, ranked with the counts and time it has after the event, as offline.
    Attributes at their ``t`` or later are already past it."""
    count, trend, last = attrs[:, 0], attrs[:, 1], attrs[:, 2]
    with np.errstate(invalid="ignore"):
        age = np.where(np.isnan(last), np.inf, t - last)
        after = np.column_stack([count + 1.0, trend * np.exp(-age / TREND_SECONDS) + 1.0, t])
        past = last >= t
    after[past] = attrs[past]
    return after


def _item_features(attrs: np.ndarray, now: float) -> np.ndarray:
    """The learned ranker's item features x (n, 3) of index attributes (n, 3: count, decayed
    count as of the item's time, time) at ``now``, as the offline scorer forms them."""
    return item_features(attrs[:, 0], trend_at(attrs[:, 1], attrs[:, 2], now), attrs[:, 2], now)


def _features_at(attrs: np.ndarray, t: np.ndarray) -> np.ndarray:
    """``_item_features`` of attributes (..., 3) at times ``t`` broadcast against their
    leading axes, float64 (..., 3): one numpy pass for many (query, item) pairs."""
    count, trend, last = attrs[..., 0], attrs[..., 1], attrs[..., 2]
    age = t - last
    decay = np.exp(-np.where(np.isnan(age), np.inf, np.maximum(age, 0.0)) / TREND_SECONDS)
    with np.errstate(invalid="ignore"):
        recency = np.nan_to_num(-np.log1p(np.maximum(age, 0.0)) / 10.0, nan=0.0)
    return np.stack(np.broadcast_arrays(np.log1p(count), np.log1p(trend * decay), recency), axis=-1)


def _term_parts(
    attrs: np.ndarray, t: np.ndarray, weights: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The three weighted terms of ``_terms_at``: the trend's and the recency's at times
    ``t`` (None for a recency of weight 0), the count's (time-free, once per row)."""
    count, trend, last = attrs[..., 0], attrs[..., 1], attrs[..., 2]
    w_count, w_trend, w_recency = weights.tolist()
    known = ~np.isnan(last)
    # A never-touched item's age is infinite, as ``trend_at`` takes it: its decay is 0.
    age = np.maximum(t - np.where(known, last, -np.inf), 0.0)
    by_trend = w_trend * np.log1p(trend * np.exp(-age / TREND_SECONDS))
    by_recency = None
    if w_recency:
        with np.errstate(invalid="ignore"):
            by_recency = w_recency * np.where(known, -np.log1p(age) / 10.0, 0.0)
    return by_trend, w_count * np.log1p(count), by_recency


def _terms_at(attrs: np.ndarray, t: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``_features_at(attrs, t) @ weights`` for rows (m, 3) at times ``t`` (q, 1), (q, m),
    or for each query's own rows (q, w, 3), (q, w), without the features: the count's term
    once per row, a term of weight 0 (the history scorer's recency) not at all. The same
    arithmetic on every pair; only the sum may round apart from the matrix product's, in
    the last bit."""
    terms, by_count, by_recency = _term_parts(attrs, t, weights)
    terms += by_count
    if by_recency is not None:
        terms += by_recency
    return terms


#: Item terms one call of ``TimedPriors`` computes at most (query times × items): about 20 ms.
TERMS_BUDGET = 2_000_000


class TimedPriors:
    """The ranker's item terms at each query's own time ``times`` (B,), for
    ``TieredIndex.recommend``'s ``priors``: (attributes (m, 3), queries) → (queries, m),
    computed for all the pairs at once.

    Queries × items may exceed ``budget`` (a catalogue of thousands of items in the exact
    tier, a batch of thousands of events): consecutive queries (a batch is in log order, so
    close in time) then share the terms at the latest of their times, in groups as small as
    the budget allows. Up to ``budget`` / items queries per call (2,000 on a catalogue of
    1,000 items) every query has its own. The exact tier asks for few terms per query
    (``upper`` and ``at``, see ``TieredIndex``): there every query has its own time."""

    def __init__(self, ranker: Scorer, times: np.ndarray, budget: int = TERMS_BUDGET) -> None:
        self.times = np.asarray(times, dtype=np.float64)
        self.budget = budget
        if isinstance(ranker, LearnedRanker):
            self.weights = ranker.net.item_weights.numpy().astype(np.float64)
        elif isinstance(ranker, HistoryScorer):
            self.weights = np.array([float(ranker.gamma), float(ranker.delta), 0.0])
        else:
            raise TypeError(f"{type(ranker).__name__} has no item terms")

    def __call__(self, attrs: np.ndarray, queries: slice) -> np.ndarray:
        times = self.times[queries]
        m = max(1, attrs.shape[0])
        group = -(-times.size * m // self.budget)  # queries per group, ≥ 1
        if group > 1:
            # The latest time of each run of ``group`` queries, repeated over the run.
            padded = np.pad(times, (0, -times.size % group), mode="edge")
            times = np.repeat(padded.reshape(-1, group).max(axis=1), group)[: times.size]
            ends = np.unique(times)
            terms = _terms_at(np.asarray(attrs, np.float64), ends[:, None], self.weights)
            return terms[np.searchsorted(ends, times)]
        t = times[:, None]  # (q, 1) against the rows (m,)
        return _terms_at(np.asarray(attrs, dtype=np.float64), t, self.weights)

    def upper(self, attrs: np.ndarray, queries: slice) -> np.ndarray:
        """(m,): no query of ``queries`` gives a row of ``attrs`` (m, 3) a term above this,
        at its own time or its run's. Each weighted term moves one way with the time (the
        item's age only grows), so its largest value over the queries is at their earliest
        or latest time; the bound sums those, with a margin for the rounding."""
        times = self.times[queries]
        ends = np.array([[times.min()], [times.max()]])
        trend, by_count, recency = _term_parts(np.asarray(attrs, np.float64), ends, self.weights)
        bound = trend.max(axis=0) + by_count
        if recency is not None:
            bound += recency.max(axis=0)
        return bound + 1e-9 * (1.0 + np.abs(bound))

    def at(self, attrs: np.ndarray, queries: slice | np.ndarray) -> np.ndarray:
        """(q, w): each query's terms of its own rows ``attrs`` (q, w, 3) at its own time
        (``queries``: a slice or the indices of the queries), with the arithmetic of
        ``__call__``."""
        t = self.times[queries][:, None]
        return _terms_at(np.asarray(attrs, dtype=np.float64), t, self.weights)

    def paired(self, attrs: np.ndarray) -> np.ndarray:
        """(B,) the terms of row b of ``attrs`` (B, 3) at query b's time."""
        return _features_at(np.asarray(attrs, dtype=np.float64), self.times) @ self.weights


@dataclass(slots=True)
class Recommendation:
    """One served list, as the processor writes it: the list's items and scores as two plain
    lists (a worker makes one per event, ten candidates each: a dict per candidate was a
    tenth of its CPU with the collections it set off), the Avro record on demand."""

    user_id: str
    event_id: str
    item_id: str
    timestamp: float
    model_version: str
    projected_user_f32: bytes
    predicted_item_f32: bytes
    #: the list, best first, and each item's score (higher is better)
    ids: list[str]
    scores: list[float]
    state_change_probability: float | None

    def record(self) -> dict[str, Any]:
        """The ``RECOMMENDATION`` record."""
        return {
            "user_id": self.user_id,
            "event_id": self.event_id,
            "item_id": self.item_id,
            "timestamp": self.timestamp,
            "model_version": self.model_version,
            "projected_user_f32": self.projected_user_f32,
            "predicted_item_f32": self.predicted_item_f32,
            "candidates": [
                {"item_id": i, "score": s} for i, s in zip(self.ids, self.scores, strict=True)
            ],
            "state_change_probability": self.state_change_probability,
        }


@dataclass(frozen=True)
class Ranked:
    """One item of an interactive answer: its score (higher is better) and the ranker's
    terms it is the sum of (see ``Serving.score_meaning``)."""

    item_id: str
    score: float
    terms: dict[str, float]


@dataclass
class Serving:
    """What one worker process serves: weights, baseline states, the candidate index."""

    settings: Settings
    checkpoint: Checkpoint
    version: str
    stream: StreamModel
    baseline: CheckpointStates
    index: TieredIndex
    candidates: int
    live: Ranks
    ranker: Scorer
    cooccurrence: CooccurrenceCandidates | None = None
    epoch: Epoch = UNSTAMPED
    #: Stream time: the latest event time among the indexed items (each item's vector comes
    #: with the time of its latest event, whichever worker applied it).
    clock: float = field(default=-np.inf)
    #: Held to change the index (``upsert``) and by the queries that read it from another
    #: thread than the processing one (``rank_user``, ``trending``); readers need not exclude
    #: each other.
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def load(cls, settings: Settings, checkpoint_dir: Path, version: str | None = None) -> Serving:
        ckpt = load_checkpoint(checkpoint_dir)
        cooccurrence = CooccurrenceCandidates() if settings.cooccurrence else None
        return cls.of(settings, ckpt, version or model_version(ckpt), cooccurrence)

    @classmethod
    def of(
        cls,
        settings: Settings,
        ckpt: Checkpoint,
        version: str,
        cooccurrence: CooccurrenceCandidates | None,
        epoch: Epoch = UNSTAMPED,
        apart: bool = False,
    ) -> Serving:
        """Serve ``ckpt``'s weights from its states; the co-occurrence model is shared by
        every epoch a worker serves (it is made of the log, not of weights). ``apart``: the
        live evaluation ranks in a process of its own (``streams.app.evaluation``; a
        worker's way, ``JODIE_EVALUATE_APART``), which ``close`` stops."""
        # Small batches, one at a time: BLAS and torch threads only add synchronisation (and
        # spin against the broker and the other workers for the same cores).
        torch.set_num_threads(1)
        threadpool_limits(1)
        cfg = ckpt.config
        dim = cfg.embedding_dim + cfg.item_static_dim
        baseline = CheckpointStates(ckpt)
        index = TieredIndex(
            dim,
            settings.index_exact_below,
            kind=settings.index_kind,
            nprobe=settings.index_nprobe,
            shortlist=settings.index_shortlist,
            n_attrs=3,  # count, decayed count, time of each item
        )
        ids, vectors = baseline.item_vectors()
        stats = np.stack(baseline.item_stats(ids), axis=1) if ids else np.zeros((0, 3))
        ranker = make_scorer(cfg, ckpt.scorer_tensors)
        if ids:
            # The approximate index folds the ranker's popularity terms into its vectors:
            # known before the items, it is built once, for them.
            index.set_key(**ranking_key(ranker, float(np.nanmax(stats[:, 2], initial=0.0))))
            index.upsert(ids, vectors, stats)
        # The log position the baseline states hold: an epoch's start, a checkpoint's O (one
        # trained from a file is served on a log that starts after it: position 0).
        start = (
            epoch[1] if epoch != UNSTAMPED else int(ckpt.meta.get("log_offsets", {}).get("seq", 0))
        )
        live = LiveRanks(
            ckpt.model, start, ids, vectors, stats, ranker, every=settings.evaluate_every
        )
        return cls(
            settings=settings,
            checkpoint=ckpt,
            version=version,
            stream=StreamModel(ckpt.model, settings.horizon_s),
            baseline=baseline,
            index=index,
            candidates=settings.candidates,
            live=RanksApart(live, f"live evaluation of {label(epoch)}") if apart else live,
            ranker=ranker,
            cooccurrence=cooccurrence,
            epoch=epoch,
            clock=float(np.nanmax(stats[:, 2], initial=-np.inf)),
        )

    def close(self) -> None:
        """Stop what runs beside the serving (the live evaluation's process, if apart)."""
        if isinstance(self.live, RanksApart):
            self.live.close()

    def upsert(
        self, ids: list[str], vectors: np.ndarray, stats: list[tuple[float, float, float]]
    ) -> None:
        """Items' latest vectors with their (count, decayed count, time) into the index."""
        attrs = np.asarray(stats, dtype=np.float64).reshape(len(ids), 3)
        with self.lock:
            self.index.upsert(ids, vectors, attrs)
        self.clock = max(self.clock, float(np.nanmax(attrs[:, 2], initial=-np.inf)))

    def _terms(
        self,
        users: list[EntityState],
        now: float,
        preds: np.ndarray,
        fresh: list[tuple[str, np.ndarray] | None],
        times: list[float],
        fresh_attrs: list[tuple[np.ndarray, np.ndarray] | None] | None = None,
    ) -> dict[str, Any]:
        """The ranker's terms as the index's key (see ``TieredIndex.recommend``) for these
        users' rows, predicting ``preds`` (B, D), each at its time ``times`` (the item terms
        of the whole key at ``now``); ``fresh`` as ``recommend`` takes it (the learned
        ranker's bonus reads the distance of each history item). ``fresh_attrs``: per user,
        the attributes the index holds for ``fresh``'s item and those it has at the user's
        time (see ``recommendations``): that item's bonus also carries the difference of its
        item terms, so it is ranked with its counts and time after the event."""
        terms = self._base_terms(users, now, preds, fresh, times, fresh_attrs)
        if not terms:
            return terms
        # Each user's item terms at its own time, as offline: the ranker's recency term moves
        # by minutes within a batch of events (the batch's prior only draws shortlists).
        priors = terms["priors"] = TimedPriors(self.ranker, np.asarray(times))
        if fresh_attrs is None:
            return terms
        held = np.array([a[0] if a is not None else (0.0, 0.0, np.nan) for a in fresh_attrs])
        after = np.array([a[1] if a is not None else (0.0, 0.0, np.nan) for a in fresh_attrs])
        deltas = (priors.paired(after) - priors.paired(held)).tolist()
        for b, (over, attrs) in enumerate(zip(fresh, fresh_attrs, strict=True)):
            if over is not None and attrs is not None:
                terms["bonus"][b][over[0]] = terms["bonus"][b].get(over[0], 0.0) + deltas[b]
        return terms

    def _base_terms(
        self,
        users: list[EntityState],
        now: float,
        preds: np.ndarray,
        fresh: list[tuple[str, np.ndarray] | None],
        times: list[float],
        fresh_attrs: list[tuple[np.ndarray, np.ndarray] | None] | None,
    ) -> dict[str, Any]:
        """``_terms`` with the item terms of every item as the index holds them."""
        ranker = self.ranker
        if isinstance(ranker, LearnedRanker):
            after = [None if a is None else a[1] for a in fresh_attrs or [None] * len(users)]
            contexts, attrs, distances = self._history_entries(users, preds, fresh, after)
            contexts = [replace(c, now=t) for c, t in zip(contexts, times, strict=True)]
            # Every entry's item features at its user's time, in one pass.
            xs = _features_at(attrs, np.asarray(times, dtype=np.float64)[:, None])
            values = ranker.history_bonuses(contexts, list(xs), list(distances))
            return {
                **ranking_key(ranker, now),
                "bonus": [
                    {
                        user.history[j]: float(value[j])
                        for j in np.flatnonzero(context.history >= 0).tolist()
                    }
                    for user, context, value in zip(users, contexts, values, strict=True)
                ],
            }
        if not isinstance(ranker, HistoryScorer):
            return {}
        histories = [(user.history, user.history_counts) for user in users]
        beta, bonus = float(ranker.beta), ranker.bonus.tolist()
        # One count at a time, as the scorer's numpy calls give it (log1p_count).
        return {
            **ranking_key(ranker, now),
            "bonus": [
                {
                    item: bonus[j] + beta * log1p_count(c)
                    for j, (item, c) in enumerate(zip(history, counts, strict=False))
                    if j < len(bonus)
                }
                for history, counts in histories
            ],
        }

    def _history_entries(
        self,
        users: list[EntityState],
        preds: np.ndarray,
        fresh: list[tuple[str, np.ndarray] | None],
        fresh_attrs: list[np.ndarray | None],
    ) -> tuple[list[UserContext], np.ndarray, np.ndarray]:
        """What the learned ranker's bonus reads of users' histories
        (``LearnedRanker.history_bonus``), gathered from the index at once: each user's row
        as a context (entry j's row is j, -1 where the index does not hold the item: left out,
        as padding; its time is set by the caller), each entry's item attributes (B, K, 3)
        and its squared distance from the user's prediction (B, K) (``fresh``'s vector for
        its item, and ``fresh_attrs`` for its attributes when given)."""
        k = self.stream.config.history_size
        b = len(users)
        lengths = np.array([min(len(user.history), k) for user in users], dtype=np.int64)
        at_user = np.repeat(np.arange(b), lengths)  # each entry's user and position
        at_entry = np.arange(at_user.size) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        found, flat_vectors, flat_attrs = self.index.lookup(
            [item for user in users for item in user.history[:k]]
        )
        held = np.zeros((b, k), dtype=bool)
        held[at_user, at_entry] = found
        vectors = np.zeros((b, k, preds.shape[1]), dtype=np.float32)
        vectors[at_user, at_entry] = flat_vectors
        attrs = np.zeros((b, k, flat_attrs.shape[1]))
        attrs[at_user, at_entry] = flat_attrs
        counts = np.zeros((b, k), dtype=np.int64)
        counts[at_user, at_entry] = [c for user in users for c in user.history_counts[:k]]
        counts[~held] = 0
        known = [len(user.history_times) == len(user.history) for user in users]
        times = np.full((b, k), np.nan)
        timed = np.repeat(np.asarray(known, dtype=bool), lengths)
        times[at_user[timed], at_entry[timed]] = [
            w for user, ok in zip(users, known, strict=True) if ok for w in user.history_times[:k]
        ]
        times[~held] = np.nan
        rows = np.where(held, np.arange(k)[None, :], -1)
        contexts = []
        for n, (user, over, over_attrs) in enumerate(zip(users, fresh, fresh_attrs, strict=True)):
            if over is not None and over[0] in user.history[:k]:
                j = user.history.index(over[0])
                vectors[n, j] = over[1]
                if over_attrs is not None:
                    attrs[n, j] = over_attrs
            contexts.append(
                UserContext(
                    rows[n],
                    counts[n],
                    times[n] if known[n] else None,
                    np.asarray(user.habits, dtype=np.float64) if user.habits else None,
                    user.events,
                    user.last_time,
                )
            )
        diff = vectors - preds.astype(np.float32)[:, None, :]
        return contexts, attrs, np.einsum("bkd,bkd->bk", diff, diff)

    def recommendations(self, outs: list[UserOutput]) -> list[Recommendation]:
        """Top candidates for each predicted item by the ranker: nearest neighbours ∪ the
        user's history ∪ items whose audiences resemble those of the user's recent items
        (co-occurrence, MinHash LSH), each candidate's score the ranker's."""
        if not outs:
            return []
        self._adopt_new_items(outs)
        preds = np.stack([o.predicted for o in outs])
        extra = self._extras([out.history for out in outs])
        # The item just touched at its state after the event (the index may hold an older one,
        # from before its owner's vector arrived): the most likely next item, ranked right.
        fresh = [None if o.item_vector is None else (o.event.item_id, o.item_vector) for o in outs]
        # The batch's prior, at its latest event time, draws the approximate tiers'
        # shortlists; each list's keys take its own event's time (``_terms``).
        now = max(o.event.timestamp for o in outs)
        times = [o.event.timestamp for o in outs]
        held, before = self.index.held_attributes([o.event.item_id for o in outs])
        after = _counted_at(before, np.asarray(times, dtype=np.float64))
        fresh_attrs = [
            (was, now_) if f is not None and ok else None
            for f, ok, was, now_ in zip(fresh, held.tolist(), before, after, strict=True)
        ]
        terms = self._terms([o.post_user for o in outs], now, preds, fresh, times, fresh_attrs)
        ranked = self.index.recommend(preds, self.candidates, extra, fresh=fresh, **terms)
        return [
            Recommendation(
                out.event.user_id,
                out.event.event_id,
                out.event.item_id,
                out.event.timestamp,
                self.version,
                f4_bytes(out.projected),
                f4_bytes(pred),
                ids,
                (-dist).tolist(),
                out.state_change_probability,
            )
            for out, pred, (ids, dist) in zip(outs, preds, ranked, strict=True)
        ]

    def _adopt_new_items(self, outs: list[UserOutput]) -> None:
        """Items this index has never held enter it with the vector the user side computed.

        An item new to the catalogue and owned by another worker reaches this index only
        when its owner's vector comes through ``item-vectors``, a transaction or more later;
        until then the user who just touched it would be served a list without it, though it
        is the most likely next item (measured with two workers on Wikipedia: 93 % of the
        events whose item the offline list held and the live one missed). Its counts are
        taken as at a first event (count 1, decayed count 1, now) until the owner's vector,
        with the true counts, replaces it.
        """
        new: dict[str, tuple[np.ndarray, float]] = {}
        for out in outs:
            item = out.event.item_id
            if out.item_vector is not None and item not in self.index:
                # the batch's latest state of the item wins
                new[item] = (out.item_vector, out.event.timestamp)
        if new:
            self.upsert(
                list(new),
                np.stack([vector for vector, _t in new.values()]),
                [(1.0, 1.0, t) for _vector, t in new.values()],
            )

    def _extras(self, histories: list[tuple[str, ...]]) -> list[list[str]]:
        """Per user, candidates besides the nearest neighbours: its history and the items
        whose audiences resemble those of its recent items. Empty lists in the exact tier,
        which ranks every item (the co-occurrence feed still observes every event there, so
        it is ready when the catalogue outgrows that tier)."""
        if not self.index.approximate:
            return [[] for _history in histories]
        if self.cooccurrence is None:
            return [list(history) for history in histories]
        limit = 2 * self.candidates
        return [
            [*history, *self.cooccurrence.candidates(history[:3], limit=limit)]
            for history in histories
        ]

    @property
    def score_meaning(self) -> str:
        """What a score of this version's ranker is, in one line."""
        if isinstance(self.ranker, HistoryScorer):
            return (
                "score = distance + history + popularity + trend = -a*|j~ - [j, j_static]|^2 "
                "+ (b_pos + beta*log(1 + the user's events on j)) + gamma*log(1 + events on j) "
                "+ delta*log(1 + events on j decayed over one day, at the projected time); "
                "j~ is the item the model predicts for the user projected to that time; higher "
                "is better; the terms are fitted as log-odds that j comes next, b_0 (the user's "
                "last item) then raised by the margin whose lists served best on validation"
            )
        if isinstance(self.ranker, LearnedRanker):
            return (
                "score = distance + history + item = -a*|j~ - [j, j_static]|^2 + (a learned "
                "bonus for the user's own items: position, the user's events on j, time since "
                f"the user last touched j, the user's habits) + {_LEARNED_ITEM_TERMS}; j~ is "
                "the item the model predicts for the user projected to that time; higher is "
                "better; fitted as log-odds that j comes next"
            )
        return (
            "score = distance = -|j~ - [j, j_static]|^2: minus the squared distance from the "
            "item the model predicts for the user projected to that time; higher is better"
        )

    @property
    def cold_start_meaning(self) -> str:
        """What a score of ``trending`` is, in one line."""
        if isinstance(self.ranker, LearnedRanker):
            return (
                f"cold start (the user is unknown): the ranker's item terms, item = "
                f"{_LEARNED_ITEM_TERMS} at that time; higher is better"
            )
        if self._popularity() == (0.0, 1.0):
            return (
                "cold start (the user is unknown): the ranker has no popularity terms, so "
                "trend = log(1 + events on j decayed over one day, at that time); higher is "
                "better"
            )
        return (
            "cold start (the user is unknown): the ranker's popularity terms, "
            "popularity + trend = gamma*log(1 + events on j) + delta*log(1 + events "
            "on j decayed over one day, at that time); higher is better"
        )

    def rank_user(
        self,
        user_id: str,
        state: EntityState,
        derived: EntityState | None,
        t: float,
        k: int,
    ) -> list[Ranked]:
        """The ranker's top ``k`` for a user between events, projected to time ``t``.

        ``state`` is the user's, ``derived`` its last item's state just after the user's last
        event (its table row keeps it); the last item is predicted from as it is now: the
        index's vector when it is at least as recent, else ``derived``. Candidates and scores
        are those of ``recommendations``; each item's score comes with its terms.
        """
        cfg = self.stream.config
        previous: tuple[str, np.ndarray] | None = None
        fresh: tuple[str, np.ndarray] | None = None
        if state.history:
            last = state.history[0]
            with self.lock:
                indexed = self.index.get(last)
            known = derived if derived is not None and derived.embedding is not None else None
            if indexed is not None and (known is None or indexed[1][2] >= known.last_time):
                previous = (last, indexed[0][: cfg.embedding_dim])
            elif known is not None:
                # The index holds an older vector (its owner's has not arrived yet).
                emb = np.asarray(known.embedding, dtype=np.float32)
                static = (
                    indexed[0][cfg.embedding_dim :]
                    if indexed is not None
                    else static_embeddings("item", [last], cfg.item_static_dim)[0]
                )
                previous, fresh = (last, emb), (last, np.concatenate([emb, static]))
        _projected, predicted = self.stream.predict_at(user_id, state, previous, t)
        with self.lock:
            extra = self._extras([state.history])
            terms = self._terms([state], t, predicted[None, :], [fresh], [t])
            [(ids, keys)] = self.index.recommend(
                predicted[None, :], k, extra, fresh=[fresh], **terms
            )
            scores = [-float(key) for key in keys.tolist()]
            if isinstance(self.ranker, LearnedRanker):
                bonus = [terms["bonus"][0].get(item, 0.0) for item in ids]
                items = self.ranker.prior(_item_features(self.index.attributes_of(ids), t))
                return [
                    Ranked(item, score, {"distance": score - b - x, "history": b, "item": x})
                    for item, score, b, x in zip(ids, scores, bonus, items.tolist(), strict=True)
                ]
            if not isinstance(self.ranker, HistoryScorer):
                return [Ranked(i, s, {"distance": s}) for i, s in zip(ids, scores, strict=True)]
            bonus = [terms["bonus"][0].get(item, 0.0) for item in ids]
            popular = self._popularity_terms(
                ids, t, float(self.ranker.gamma), float(self.ranker.delta)
            )
        # The distance term is what the others leave of the score: the terms add up to it.
        return [
            Ranked(
                item,
                score,
                {"distance": score - b - p - r, "history": b, "popularity": p, "trend": r},
            )
            for item, score, b, (p, r) in zip(ids, scores, bonus, popular, strict=True)
        ]

    def _popularity(self) -> tuple[float, float]:
        """(γ, δ) of the ranker's popularity terms; (0, 1) for a ranker without them (a cold
        start then ranks by the decayed counts alone)."""
        ranker = self.ranker
        if isinstance(ranker, HistoryScorer) and (float(ranker.gamma), float(ranker.delta)) != (
            0.0,
            0.0,
        ):
            return float(ranker.gamma), float(ranker.delta)
        return 0.0, 1.0

    def _popularity_terms(
        self, ids: list[str], t: float, gamma: float, delta: float
    ) -> list[tuple[float, float]]:
        """(γ·log(1 + events), δ·log(1 + decayed events at ``t``)) of these indexed items."""
        stats = self.index.attributes_of(ids)  # (n, 3)
        count, trend, last = stats[:, 0], stats[:, 1], stats[:, 2]
        popularity = gamma * np.log1p(count)
        recent = delta * np.log1p(trend_at(trend, last, t))
        return list(zip(popularity.tolist(), recent.tolist(), strict=True))

    def trending(self, t: float, k: int) -> list[Ranked]:
        """A cold start: the ``k`` items the ranker's popularity terms favour at time ``t``,
        γ·log(1 + events on j) + δ·log(1 + events on j decayed over a day); with a ranker
        without them, log(1 + the decayed count) alone."""
        if isinstance(self.ranker, LearnedRanker):
            with self.lock:
                values = self.ranker.prior(_item_features(self.index.attributes(), t))
                top = self.index.top_by(values, k)
            return [Ranked(item, value, {"item": value}) for item, value in top]
        gamma, delta = self._popularity()
        with self.lock:
            stats = self.index.attributes()
            count, trend, last = stats[:, 0], stats[:, 1], stats[:, 2]
            values = gamma * np.log1p(count) + delta * np.log1p(trend_at(trend, last, t))
            top = self.index.top_by(values, k)
            terms = self._popularity_terms([item for item, _v in top], t, gamma, delta)
        return [
            Ranked(item, value, {"popularity": p, "trend": r})
            for (item, value), (p, r) in zip(top, terms, strict=True)
        ]


_F4 = np.dtype("<f4")


def f4_bytes(vector: np.ndarray) -> bytes:
    """A vector as little-endian float32 bytes, copied once (``astype`` copies even when the
    vector is float32 already, as it is on the hot path)."""
    return vector.tobytes() if vector.dtype == _F4 else vector.astype(_F4).tobytes()

"""The served ranker between events (interactive queries) ranks as the offline replay does."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from operators.evaluation.ranker import LearnedRanker, item_features
from operators.evaluation.scorer import HistoryScorer
from operators.evaluation.served import served_scores
from operators.model.checkpoint import load_checkpoint
from operators.model.online import OnlineJodie
from operators.model.state import trend_at
from operators.protocol.sides import CheckpointStates, EntityState, EventData
from schemas.codec import RECOMMENDATION, Codec
from schemas.wire import RecommendationWriter
from streams.app.serving import Serving, TimedPriors
from streams.settings import Settings
from tests.streams.harness import assert_ranked_as_offline, make_checkpoint, offline_ranking


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "v1")


def _busiest_users(checkpoint: Path, n: int) -> list[str]:
    users = load_checkpoint(checkpoint).states.users
    counts = {u: int(users.history_counts[row].sum()) for row, u in enumerate(users.ids)}
    return sorted(counts, key=lambda u: (-counts[u], u))[:n]


@pytest.mark.parametrize("hours", [0.0, 1.0, 48.0])
def test_a_user_projected_between_events_is_ranked_as_offline(
    checkpoint: Path, hours: float
) -> None:
    serving = Serving.load(Settings(), checkpoint)
    baseline = CheckpointStates(serving.checkpoint)
    ckpt = load_checkpoint(checkpoint)
    online = OnlineJodie(ckpt.model, ckpt.states)
    for user in _busiest_users(checkpoint, 3):
        state = baseline.user(user)
        t = state.last_time + hours * 3600
        ranked = serving.rank_user(user, state, None, t, k=10)
        assert len(ranked) == 10
        assert_ranked_as_offline(
            [(r.item_id, r.score) for r in ranked], offline_ranking(checkpoint, online, user, t)
        )
        for r in ranked:  # the terms explain the score: they add up to it
            assert set(r.terms) == {"distance", "history", "popularity", "trend"}
            assert sum(r.terms.values()) == pytest.approx(r.score, abs=1e-9)
            assert r.terms["distance"] <= 1e-6
        assert ranked[0].terms["history"] > 0  # the history ranker's bonus for a recent item


def test_a_newer_state_of_the_last_item_than_the_index_holds_is_used(checkpoint: Path) -> None:
    serving = Serving.load(Settings(), checkpoint)
    baseline = CheckpointStates(serving.checkpoint)
    user = _busiest_users(checkpoint, 1)[0]
    state = baseline.user(user)
    last = baseline.item(state.history[0])
    t = state.last_time + 600
    # What the user's row keeps of its last item after its event: here a state the index
    # has not seen (its owner's vector not arrived), later than the indexed one.
    moved = np.roll(np.asarray(last.embedding), 1)
    derived = EntityState(moved, state.last_time + 1.0)
    stale = serving.rank_user(user, state, None, t, k=5)
    fresh = serving.rank_user(user, state, derived, t, k=5)
    assert [r.score for r in fresh] != [r.score for r in stale]
    old = EntityState(moved, -np.inf)  # older than the index: the index's vector is used
    assert serving.rank_user(user, state, old, t, k=5) == stale


def test_a_cold_start_lists_the_popular_and_trending_items(checkpoint: Path) -> None:
    serving = Serving.load(Settings(), checkpoint)
    t = serving.clock
    items = serving.trending(t, k=5)
    assert len(items) == 5
    assert [r.score for r in items] == sorted((r.score for r in items), reverse=True)
    states = load_checkpoint(checkpoint).states.items
    gamma, delta = 0.3, 0.5  # the harness's scorer
    prior = gamma * np.log1p(states.count) + delta * np.log1p(
        trend_at(states.trend, states.last_time, t)
    )
    assert [r.item_id for r in items] == [
        states.ids[r] for r in np.argsort(-prior, kind="stable")[:5]
    ]
    for r in items:
        assert sum(r.terms.values()) == pytest.approx(r.score)
    assert serving.clock == float(np.nanmax(states.last_time))


def test_an_item_new_to_the_index_is_in_the_list_of_the_user_who_touched_it(
    checkpoint: Path,
) -> None:
    serving = Serving.load(Settings(), checkpoint)
    baseline = CheckpointStates(serving.checkpoint)
    user = _busiest_users(checkpoint, 1)[0]
    state = baseline.user(user)
    t = state.last_time + 60.0
    # An item no one has touched yet, owned by another worker: its vector has not come
    # through item-vectors, so this index has never held it.
    assert "brand-new" not in serving.index
    event = EventData("e1", user, "brand-new", t, b"")
    [(_u, out, _i)] = serving.stream.apply_users(
        [state], [EntityState(None, float("nan"))], [event]
    )
    assert out.item_vector is not None
    [record] = serving.recommendations([out])
    listed = record.ids
    assert "brand-new" in listed
    # The Avro record of the list, and the writer's bytes, say the same.
    written = RecommendationWriter(Codec(RECOMMENDATION).header).record(
        record.user_id,
        record.event_id,
        record.item_id,
        record.timestamp,
        record.model_version,
        record.projected_user_f32,
        record.predicted_item_f32,
        record.ids,
        record.scores,
        record.state_change_probability,
    )
    assert written == Codec(RECOMMENDATION).encode(record.record())
    decoded = Codec(RECOMMENDATION).decode(written)
    assert [c["item_id"] for c in decoded["candidates"]] == listed
    assert [c["score"] for c in decoded["candidates"]] == pytest.approx(record.scores, rel=1e-6)
    vector, attrs = serving.index.get("brand-new")  # type: ignore[misc]
    assert np.array_equal(vector, out.item_vector)
    assert attrs.tolist() == [1.0, 1.0, t]
    # The owner's vector, with the true counts, replaces it; a known item is left alone.
    serving.upsert(["brand-new"], out.item_vector[None, :], [(3.0, 2.5, t)])
    serving.recommendations([out])
    assert serving.index.get("brand-new")[1].tolist() == [3.0, 2.5, t]  # type: ignore[index]


def test_extra_candidates_are_gathered_only_where_the_index_reads_them(checkpoint: Path) -> None:
    # The exact tier ranks every item, so per-event co-occurrence lookups would be pure cost
    # there; the approximate tier scores only its shortlist and these extras.
    serving = Serving.load(Settings(index_exact_below=1024), checkpoint)
    assert serving.cooccurrence is not None and not serving.index.approximate
    history = ("i1", "i2", "i3")
    for user in ("u1", "u2", "u3", "u4"):
        for item in ("i1", "i9"):
            serving.cooccurrence.observe(user, item)
    assert serving._extras([history]) == [[]]
    rng = np.random.default_rng(0)
    n = 1100 - len(serving.index)
    ids = [f"filler{j}" for j in range(n)]
    dim = serving.index.dim
    serving.upsert(ids, rng.standard_normal((n, dim)).astype(np.float32), [(1.0, 1.0, 0.0)] * n)
    assert serving.index.approximate
    [extra] = serving._extras([history])
    assert extra[:3] == list(history)
    assert "i9" in extra[3:]  # the same audience as i1


def test_the_history_bonus_takes_numpys_log1p_of_each_count(checkpoint: Path) -> None:
    # ``Serving._terms`` takes log1p one count at a time, for speed, where the scorer takes
    # numpy's on arrays: the scores served must not move by a bit. The C library's log1p
    # (math.log1p, used here before) differs from numpy's SIMD loop in the last bit on some
    # counts, 2, 13 and 47 among them on a CPU with AVX-512.
    serving = Serving.load(Settings(), checkpoint)
    ranker = serving.ranker
    assert isinstance(ranker, HistoryScorer)
    n = min(len(ranker.bonus), 5)
    counts = (2, 13, 47, 73, 184)[:n]
    history = tuple(f"i{k}" for k in range(n))
    user = EntityState(None, 0.0, history, counts)
    pred = np.zeros((1, serving.index.dim), dtype=np.float32)
    [bonus] = serving._terms([user], 0.0, pred, [None], [0.0])["bonus"]
    logs = np.log1p(np.asarray(counts, dtype=np.float64))
    beta, weights = float(ranker.beta), ranker.bonus.tolist()
    assert [bonus[item] for item in history] == [
        weights[j] + beta * float(logs[j]) for j in range(n)
    ]


# --- the learned ranker ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def ranker_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ranker") / "v1", scorer="ranker")


@pytest.mark.parametrize("hours", [0.0, 1.0, 48.0])
def test_the_learned_ranker_ranks_a_user_between_events_as_offline(
    ranker_checkpoint: Path, hours: float
) -> None:
    serving = Serving.load(Settings(), ranker_checkpoint)
    assert isinstance(serving.ranker, LearnedRanker)
    baseline = CheckpointStates(serving.checkpoint)
    ckpt = load_checkpoint(ranker_checkpoint)
    online = OnlineJodie(ckpt.model, ckpt.states)
    for user in _busiest_users(ranker_checkpoint, 3):
        state = baseline.user(user)
        assert state.history_times and state.habits and state.events  # the ranker's user terms
        t = state.last_time + hours * 3600
        ranked = serving.rank_user(user, state, None, t, k=10)
        assert len(ranked) == 10
        assert_ranked_as_offline(
            [(r.item_id, r.score) for r in ranked],
            offline_ranking(ranker_checkpoint, online, user, t),
        )
        for r in ranked:  # the terms explain the score: they add up to it
            assert set(r.terms) == {"distance", "history", "item"}
            assert sum(r.terms.values()) == pytest.approx(r.score, abs=1e-9)
        assert any(r.terms["history"] != 0 for r in ranked)


def test_the_learned_ranker_serves_after_an_event_the_list_jodie_evaluate_computes(
    ranker_checkpoint: Path,
) -> None:
    """The list emitted after an event is the offline served list (``served_scores``, what
    `jodie evaluate --served` measures) at the stream's horizon, scores included: whether the
    index already holds the touched item after the event (its owner's vector came through
    item-vectors) or still before it (the item's time and counts are then moved on by one
    event: with the ranker's recency term, a stale time would push the item just touched
    down the list)."""
    cases = [
        (u, j, owner)
        for u in _busiest_users(ranker_checkpoint, 3)
        for j in (0, -1)
        for owner in (True, False)
    ]
    for user, position, owner_arrived in cases:
        serving = Serving.load(Settings(), ranker_checkpoint)
        baseline = CheckpointStates(serving.checkpoint)
        state = baseline.user(user)
        item = state.history[position]  # the last item again, or an older one
        t = state.last_time + 900.0
        event = EventData(f"e-{user}-{item}", user, item, t, b"")
        [(post, out, _i)] = serving.stream.apply_users([state], [baseline.item(item)], [event])
        if owner_arrived:  # its vector and counts after the event, through item-vectors
            [(_item, vector, _u)] = serving.stream.apply_items(
                [baseline.item(item)], [state], [event]
            )
            serving.upsert([item], vector.vector[None, :], [(vector.events, vector.trend, t)])
        [record] = serving.recommendations([out])
        assert post.history[0] == item
        assert_ranked_as_offline(
            list(zip(record.ids, record.scores, strict=True)),
            _served_offline(ranker_checkpoint, serving, user, item, t),
        )


def test_the_learned_ranker_keys_each_list_of_a_batch_at_its_event_time(
    ranker_checkpoint: Path,
) -> None:
    """Events hours apart in one batch: each list takes the item terms (the recency of every
    item) at its own event's time, as offline, not at the batch's latest."""
    serving = Serving.load(Settings(), ranker_checkpoint)
    baseline = CheckpointStates(serving.checkpoint)
    users = _busiest_users(ranker_checkpoint, 3)
    states = [baseline.user(u) for u in users]
    t0 = max(s.last_time for s in states)
    events = [
        EventData(f"e{j}", u, s.history[0], t0 + 3600.0 * 5 * j, b"")
        for j, (u, s) in enumerate(zip(users, states, strict=True))
    ]
    applied = serving.stream.apply_users(states, [baseline.item(e.item_id) for e in events], events)
    records = serving.recommendations([out for _post, out, _i in applied])
    # A row written before rows kept the ranker's user state (no times, no habits) is served
    # all the same, with a history bonus from what the row has.
    [(_p, old, _i)] = serving.stream.apply_users(
        [states[0]._replace(history_times=(), habits=())],
        [baseline.item(events[0].item_id)],
        [events[0]],
    )
    times = old.post_user.history_times
    assert times[0] == events[0].timestamp and all(np.isnan(w) for w in times[1:])
    [legacy] = serving.recommendations([old])
    assert len(legacy.ids) == len(legacy.scores) == 10
    assert legacy.ids[0] == events[0].item_id
    for event, record in zip(events, records, strict=True):
        assert_ranked_as_offline(
            list(zip(record.ids, record.scores, strict=True)),
            _served_offline(
                ranker_checkpoint, serving, event.user_id, event.item_id, event.timestamp
            ),
        )


def _served_offline(checkpoint: Path, serving: Serving, user: str, item: str, t: float) -> dict:
    """Every known item's score in the list served to ``user`` right after its event on
    ``item`` at ``t``, by the offline replay from the checkpoint (``served_scores``)."""
    ckpt = load_checkpoint(checkpoint)
    online = OnlineJodie(ckpt.model, ckpt.states)
    online.observe(user, item, t)
    users, items = online.states.users, online.states.items
    [scores], _context = served_scores(
        ckpt.model,
        online.states,
        serving.ranker,
        users.row(user),  # type: ignore[arg-type]
        items.row(item),  # type: ignore[arg-type]
        t,
        (None,),
    )
    return {
        i: float(scores[row])
        for row, i in enumerate(items.ids)
        if not np.isnan(items.last_time[row])
    }


def test_a_cold_start_with_the_learned_ranker_lists_the_items_its_item_terms_favour(
    ranker_checkpoint: Path,
) -> None:
    serving = Serving.load(Settings(), ranker_checkpoint)
    ranker = serving.ranker
    assert isinstance(ranker, LearnedRanker)
    t = serving.clock + 600.0
    items = serving.trending(t, k=5)
    states = load_checkpoint(ranker_checkpoint).states.items
    known = ~np.isnan(states.last_time)
    x = item_features(
        states.count, trend_at(states.trend, states.last_time, t), states.last_time, t
    )
    prior = np.where(known, ranker.prior(x), -np.inf)
    want = [states.ids[r] for r in np.argsort(-prior, kind="stable")[:5]]
    assert [r.item_id for r in items] == want
    for r in items:
        assert set(r.terms) == {"item"} and r.terms["item"] == pytest.approx(r.score)
    assert "item terms" in serving.cold_start_meaning


def test_item_terms_at_each_query_time_share_a_time_past_their_budget(
    ranker_checkpoint: Path,
) -> None:
    """Per-query item terms cost queries × items: within the budget each query has its own
    time's; past it, runs of consecutive queries share the latest time of the run."""
    ranker = Serving.load(Settings(), ranker_checkpoint).ranker
    rng = np.random.default_rng(4)
    attrs = np.column_stack(
        [rng.integers(1, 50, 40), rng.uniform(0, 5, 40), rng.uniform(0, 90, 40)]
    )
    times = np.array([100.0, 130.0, 110.0, 400.0, 900.0])
    own = TimedPriors(ranker, times)
    terms = own(attrs, slice(0, 5))
    for b, t in enumerate(times):
        np.testing.assert_allclose(
            terms[b], TimedPriors(ranker, np.array([t]))(attrs, slice(0, 1))[0]
        )
    shared = TimedPriors(ranker, times, budget=3 * 40)(attrs, slice(0, 5))  # two per run
    for b, t in enumerate([130.0, 130.0, 400.0, 400.0, 900.0]):
        np.testing.assert_allclose(shared[b], own(attrs, slice(0, 5))[list(times).index(t)])


@pytest.mark.parametrize("scorer", ["history", "ranker"])
def test_item_terms_bound_themselves_over_the_queries_times(
    scorer: str, checkpoint: Path, ranker_checkpoint: Path
) -> None:
    """What lets the exact tier key most items by a bound (``TieredIndex``'s pruned path):
    each query's terms of its own rows (``at``) are those of ``__call__``, to the bit, and
    no query's term of an item exceeds the item's ``upper`` over the queries, however the
    learned ranker's recency and trend weigh the item's age; an item never touched has
    no age."""
    path = ranker_checkpoint if scorer == "ranker" else checkpoint
    ranker = Serving.load(Settings(), path).ranker
    rng = np.random.default_rng(9)
    n = 300
    attrs = np.column_stack(
        [rng.integers(0, 50, n), rng.uniform(0, 5, n), rng.uniform(0, 400_000, n)]
    )
    attrs[::7, 2] = np.nan
    times = np.sort(rng.uniform(100_000, 600_000, 50))
    priors = TimedPriors(ranker, times)
    full = priors(attrs, slice(0, 50))
    rows = rng.integers(0, n, size=(50, 12))
    np.testing.assert_array_equal(
        priors.at(attrs[rows], slice(0, 50)), full[np.arange(50)[:, None], rows]
    )
    np.testing.assert_array_equal(
        priors.at(attrs[rows[3:5]], np.array([3, 4])), full[[[3], [4]], rows[3:5]]
    )
    upper = priors.upper(attrs, slice(0, 50))
    assert (full <= upper[None, :]).all()
    # Tight where the terms do not move: an item never touched, or whose time is past all.
    assert np.allclose(upper[::7], full[:, ::7].max(axis=0), rtol=1e-8, atol=1e-8)

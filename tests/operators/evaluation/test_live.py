"""operators.evaluation.live: per-event ranks from a stream equal the frozen replay's ranks."""

from __future__ import annotations

import random

import numpy as np
import torch

from operators.evaluation.context import UserContext
from operators.evaluation.live import LiveRanks, Query, _sub_context
from operators.evaluation.protocols import frozen_replay
from operators.evaluation.scorer import HistoryScorer, PlainScorer
from operators.model.jodie import Jodie
from operators.model.state import States
from operators.protocol.sides import CheckpointStates, EntityState, EventData, StreamModel
from tests.operators.conftest import build_log, tiny_config


def _stream_outputs(
    model: Jodie, states: States, events: list[EventData]
) -> tuple[list[Query], list[tuple[int, str, np.ndarray]]]:
    """Apply ``events`` in order with the two stream sides, as the workers do; return the
    user side's queries and the item side's vectors, each tagged with the event's seq."""
    ckpt = CheckpointStates(_AsCheckpoint(states))  # type: ignore[arg-type]
    stream = StreamModel(model)
    users: dict[str, EntityState] = {}
    items: dict[str, EntityState] = {}
    queries, vectors = [], []
    for seq, e in enumerate(events):
        u = users.get(e.user_id) or ckpt.user(e.user_id)
        i = items.get(e.item_id) or ckpt.item(e.item_id)
        u_post, out, _ = stream.apply_user(u, i, e)
        i_post, vec, _ = stream.apply_item(i, u, e)
        users[e.user_id], items[e.item_id] = u_post, i_post
        queries.append(
            Query(
                seq,
                e.event_id,
                e.user_id,
                e.item_id,
                out.previous_item,
                out.pre_state,
                out.delta_user,
            )
        )
        vectors.append((seq, e.item_id, vec.vector))
    return queries, vectors


class _AsCheckpoint:
    """The two attributes CheckpointStates reads, from plain states."""

    def __init__(self, states: States) -> None:
        self.states = states
        self.last_seq = None


def _setup(seed: int, n_events: int) -> tuple[Jodie, States, list[EventData]]:
    torch.manual_seed(seed)
    model = Jodie(tiny_config(n_features=0)).eval()
    rng = np.random.default_rng(seed)
    users = [f"u{rng.integers(12)}" for _ in range(n_events)]
    items = [f"i{int(rng.zipf(1.6)) % 15}" for _ in range(n_events)]
    times = np.cumsum(rng.exponential(5.0, n_events))
    log = build_log(users, items, times.tolist())
    states = States.empty(8, 8, 8, 4)
    head = log.slice(0, n_events // 3)
    frozen_replay(model, states, head, PlainScorer())  # the "checkpoint" states
    return (
        model,
        states,
        [
            EventData(f"e{k}", users[k], items[k], float(times[k]), b"")
            for k in range(n_events // 3, n_events)
        ],
    )


def test_ranks_equal_the_frozen_replay_whatever_the_arrival_order() -> None:
    model, states, events = _setup(seed=1, n_events=300)
    checkpoint = states.copy()
    # offline: the frozen protocol's ranks of the same events
    log = build_log(
        [e.user_id for e in events], [e.item_id for e in events], [e.timestamp for e in events]
    )
    offline, _ = frozen_replay(model, states.copy(), log, PlainScorer())

    queries, vectors = _stream_outputs(model, checkpoint.copy(), events)
    known = CheckpointStates(_AsCheckpoint(checkpoint))  # type: ignore[arg-type]
    ids, start_vectors = known.item_vectors()
    for trial in range(3):
        live = LiveRanks(model, 0, list(ids), start_vectors.copy())
        inputs: list[tuple[str, object]] = [("q", q) for q in queries]
        inputs += [("v", v) for v in vectors]
        random.Random(trial).shuffle(inputs)
        got: dict[int, int] = {}
        for kind, body in inputs:
            if kind == "q":
                live.add(body)  # type: ignore[arg-type]
            else:
                live.item_vector(*body)  # type: ignore[misc]
            for r in live.ready():
                got[r.query.seq] = r.rank
        assert live.pending() == 0 and live.unranked == 0
        assert [got[k] for k in range(len(events))] == offline.tolist()


def test_queries_older_than_the_undo_window_are_counted_not_ranked() -> None:
    model, states, events = _setup(seed=2, n_events=60)
    queries, vectors = _stream_outputs(model, states.copy(), events)
    ids, start_vectors = CheckpointStates(_AsCheckpoint(states)).item_vectors()  # type: ignore[arg-type]
    live = LiveRanks(model, 0, list(ids), start_vectors, undo_window=5)
    for v in vectors:
        live.item_vector(*v)
    assert live.ready() == []
    assert live.watermark == len(events)
    live.add(queries[0])
    assert live.ready() == [] and live.unranked == 1
    live.add(queries[-1])
    assert [r.query.seq for r in live.ready()] == [len(events) - 1]


def test_a_new_user_and_an_unseen_item_rank_as_offline() -> None:
    torch.manual_seed(3)
    model = Jodie(tiny_config(n_features=0)).eval()
    events = [EventData("a", "u1", "i1", 1.0, b""), EventData("b", "u2", "i1", 2.0, b"")]
    queries, vectors = _stream_outputs(model, States.empty(8, 8, 8, 4), events)
    live = LiveRanks(model, 0, [], np.zeros((0, 16), np.float32))
    live.add(queries[1])
    live.add(queries[0])
    for v in reversed(vectors):
        live.item_vector(*v)
    ranked = {r.query.seq: (r.rank, r.n_items) for r in live.ready()}
    assert ranked == {0: (1, 0), 1: (1, 1)}  # unseen: n_known + 1; then the only item


def test_a_vector_that_never_comes_is_skipped_and_what_waited_on_it_counted() -> None:
    model, states, events = _setup(seed=4, n_events=90)
    queries, vectors = _stream_outputs(model, states.copy(), events)
    ids, start_vectors = CheckpointStates(_AsCheckpoint(states)).item_vectors()  # type: ignore[arg-type]
    live = LiveRanks(model, 0, list(ids), start_vectors, max_ahead=10)
    for q in queries[:3]:  # waiting before the gap: ranked (they need no vector past it)
        live.add(q)
    ranked = []
    for v in vectors[:5] + vectors[6:]:  # seq 5's vector was compacted away
        live.item_vector(*v)
        ranked += live.ready()
    assert [r.query.seq for r in ranked] == [0, 1, 2]
    assert live.watermark == len(events)  # skipped past the gap
    for q in queries[3:]:  # late: before the gap, the states cannot be reconstructed
        live.add(q)
    ranked = live.ready()
    assert live.unranked == 3  # seqs 3, 4, 5
    assert [r.query.seq for r in ranked] == list(range(6, len(events)))
    assert live.pending() == 0


def _ranks(
    live: LiveRanks, queries: list[Query], vectors: list[tuple[int, str, np.ndarray]]
) -> list[int]:
    got: dict[int, int] = {}
    half = len(vectors) // 2
    for v in vectors[:half]:
        live.item_vector(*v)
    assert live.ready() == []  # folds the first half
    for q in queries:  # the first half late: ranked with the undo records, rows patched
        live.add(q)
    for v in vectors[half:]:
        live.item_vector(*v)
    for r in live.ready():
        got[r.query.seq] = r.rank
    assert live.unranked == 0
    return [got[q.seq] for q in queries]


def test_bounded_ranks_equal_exact_ranks_with_ties() -> None:
    """The matrix-product distances decide only where the bound allows: the ranks equal the
    elementwise ones, exact ties included (copies of items score equal, never higher)."""
    model, states, events = _setup(seed=4, n_events=300)
    queries, vectors = _stream_outputs(model, states.copy(), events)
    ids, start = CheckpointStates(_AsCheckpoint(states)).item_vectors()  # type: ignore[arg-type]
    rng = np.random.default_rng(4)
    # Many more items: random ones, and exact copies of the known ones (ties).
    extra = rng.standard_normal((3000, start.shape[1])).astype(np.float32)
    copies = np.repeat(start, 20, axis=0)
    all_ids = [*ids, *(f"x{k}" for k in range(len(extra))), *(f"c{k}" for k in range(len(copies)))]
    all_vectors = np.concatenate([start, extra, copies])
    scorer = HistoryScorer(
        torch.tensor(0.2),
        torch.tensor([1.0, 0.5, 0.25, 0.1]),
        torch.tensor(0.3),
        torch.tensor(0.1),
        torch.tensor(0.05),
    )
    # With a history (its bonus is added by row, in the exact and the bounded scores alike).
    with_history = [
        q._replace(history=("i1", "c3", "i2"), history_counts=(3, 1, 2)) for q in queries
    ]
    for ranker, asked in ((PlainScorer(), queries), (scorer, with_history)):
        exact = LiveRanks(model, 0, all_ids, all_vectors.copy(), scorer=ranker, bounded_from=10**9)
        want = _ranks(exact, asked, vectors)
        for batch_from in (0, 10**9):  # queries scored together, or one by one
            bounded = LiveRanks(
                model,
                0,
                all_ids,
                all_vectors.copy(),
                scorer=ranker,
                bounded_from=0,
                batch_from=batch_from,
            )
            assert _ranks(bounded, asked, vectors) == want
        assert len(set(want)) > 10  # ranks that vary: the comparison means something


def test_a_context_for_one_row_places_its_history_as_for_several() -> None:
    """The true item is scored alone once per query; its context takes a shortcut."""
    context = UserContext(np.array([5, 2, 9, 2, -1, -1]), np.array([3, 1, 1, 1, 0, 0]))
    for row in (2, 5, 7):
        one = _sub_context(context, np.array([row]))
        # The general rule, with a second row that is nowhere in the history.
        two = _sub_context(context, np.array([row, 1000]))
        np.testing.assert_array_equal(one.history, two.history)
        assert one.history.dtype == np.int64
        np.testing.assert_array_equal(one.counts, context.counts)

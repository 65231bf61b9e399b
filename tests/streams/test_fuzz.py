"""Fuzzing the pipeline: 10,000 hostile messages among 5,000 valid Wikipedia events.

The hostile messages (streams.hostile: random bytes, mutated Avro, wrong framing, absurd
and non-finite values, empty, huge and control-character ids, feature arrays of the wrong
length or of 100,000 entries, re-sent events, events going back in time) are interleaved
with the rows after the checkpoint's history and sent to `interactions` on its partitions;
the router and a worker process run over them. Neither may stop; every hostile message must
be in `interactions.dlq` with the reason it was generated for; the valid rows must get one
recommendation each and end in the states of the sequential replay of just them (≤ 1e-4).
`pytest -s` prints the table (benchmarks/fuzz.py runs the same for longer).
"""

from __future__ import annotations

import time
from collections import Counter
from itertools import islice
from pathlib import Path

import pytest

from operators.dataset import bundled_wikipedia, iter_rows
from schemas import INTERACTION
from streams.codecs import make_codec
from streams.hostile import MESSAGE_MAX_BYTES, Outcome, fingerprint, hostile_stream, report
from streams.peek import read_with_headers
from streams.produce import produce_messages, source_tag
from streams.router import Router, dlq_copy, read_log
from streams.settings import Settings
from tests.streams.harness import (
    HISTORY,
    assert_equal_to_reference,
    make_checkpoint,
    reference,
    start_worker,
    stop,
    wait_for,
)

pytestmark = pytest.mark.kafka

N_VALID = 5_000
N_HOSTILE = 10_000
SEED = 20_240_611


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "v1")


def test_hostile_messages_go_to_the_dlq_and_the_valid_events_flow_as_if_alone(
    kafka: Settings, checkpoint: Path, tmp_path: Path
) -> None:
    if kafka.schema_registry_url:
        pytest.skip("the framing kinds are built for single-object framing")
    began = time.monotonic()
    path = bundled_wikipedia()
    rows = list(islice(iter_rows(path), HISTORY, HISTORY + N_VALID))
    codec = make_codec(kafka, INTERACTION, kafka.topic("interactions"))
    stream = hostile_stream(rows, source_tag(path), codec, N_HOSTILE, seed=SEED)
    assert len(stream.hostile) == N_HOSTILE and len(stream.valid_ids) == N_VALID
    # Everything is in the topic before the router starts: no valid event is late because of
    # the merge's grace period, so the log must be the valid rows in file order.
    produce_messages(kafka, [(m.key, m.value) for m in stream.messages], MESSAGE_MAX_BYTES)

    # The worker runs while the router routes, so it meets the stream as it is written.
    worker = start_worker(kafka, checkpoint, 0, tmp_path)
    try:
        stats = Router(kafka, grace_s=0.2).run(until_idle_s=1.0, max_seconds=300)
        wait_for(kafka, N_VALID, timeout_s=300)
        worker_exit = worker.poll()
    finally:
        stop(worker)
    log = (tmp_path / "worker-0.log").read_text()[-3000:]
    recs = wait_for(kafka, N_VALID, timeout_s=60)  # all of them, now that nothing more comes
    by_event = Counter(str(r["event_id"]) for r in recs)

    dlq = list(read_with_headers(kafka, kafka.topic("interactions.dlq")))
    got = Counter((h.get("reason", b"").decode(), fingerprint(k, v)) for k, v, h in dlq)
    want = Counter(
        (str(m.reason), fingerprint(*dlq_copy(m.key, m.value or b"")[:2])) for m in stream.hostile
    )
    by_reason = Counter(reason for reason, _ in got.elements())
    diff = assert_equal_to_reference(
        kafka, checkpoint, reference(checkpoint, range(HISTORY, HISTORY + N_VALID))
    )
    outcome = Outcome(
        dlq_by_reason=by_reason,
        dlq_unexpected=sum((got - want).values()) + sum((want - got).values()),
        sequenced=stats.sequenced,
        recommendations=len(recs),
        distinct_recommended=len(by_event),
        router_errors=0,  # Router.run returned
        worker_exits=int(worker_exit is not None),
        max_state_diff=diff,
        seconds=time.monotonic() - began,
    )
    print("\n" + report(stream, outcome))

    assert worker_exit is None, log  # never exited, so it was alive throughout
    assert stats.rejected_by_reason == dict(stream.by_reason())
    assert by_reason == stream.by_reason()
    assert got == want  # each hostile message, with its reason, as the router may keep it
    assert [e.event.event_id for e in read_log(kafka)] == stream.valid_ids
    assert by_event == Counter(stream.valid_ids), log  # one per valid event, none for others

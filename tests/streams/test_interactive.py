"""Interactive queries on a real pipeline (router + 2 workers on the real broker): any worker
answers for any user, forwarding to the owner, with the offline ranking of the user's state."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from operators.dataset import bundled_wikipedia, load_interactions
from schemas.codec import SEQUENCED_INTERACTION
from streams.client import Client
from streams.codecs import make_codec
from streams.peek import read_all
from streams.settings import Settings
from tests.streams.harness import (
    HISTORY,
    STREAM,
    assert_ranked_as_offline,
    free_port,
    make_checkpoint,
    offline_ranking,
    reference,
    route,
    start_worker,
    stop,
    wait_for,
    wait_until_assigned,
)

pytestmark = pytest.mark.kafka


def _get(url: str) -> tuple[int, dict[str, str], dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=30) as reply:
            return reply.status, dict(reply.headers), json.loads(reply.read())
    except urllib.error.HTTPError as reply:
        with reply:
            return reply.code, dict(reply.headers), json.loads(reply.read())


@pytest.fixture(scope="module")
def pipeline(
    broker: Settings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Settings, Path, list[str]]]:
    """The stream's events applied by two workers; (settings, checkpoint, worker URLs)."""
    from streams.topics import scratch_topics

    tmp = tmp_path_factory.mktemp("interactive")
    checkpoint = make_checkpoint(tmp / "v1")
    ports = [free_port(), free_port()]
    with scratch_topics("q") as kafka:
        # Worker n serves on JODIE_WEB_PORT + n.
        workers = [
            start_worker(kafka, checkpoint, n, tmp, env={"JODIE_WEB_PORT": str(ports[n] - n)})
            for n in (0, 1)
        ]
        try:
            wait_until_assigned(tmp, (0, 1), timeout_s=120)
            route(kafka)
            recs = wait_for(kafka, STREAM, timeout_s=240)
            assert len(recs) == STREAM, (tmp / "worker-1.log").read_text()[-3000:]
            yield kafka, checkpoint, [f"http://127.0.0.1:{port}" for port in ports]
        finally:
            for w in workers:
                stop(w)


def _stream() -> tuple[list[str], list[str], list[float]]:
    log = load_interactions(bundled_wikipedia())
    rows = range(HISTORY, HISTORY + STREAM)
    return (
        [log.user_ids[k] for k in rows],
        [log.item_ids[k] for k in rows],
        [float(log.timestamps[k]) for k in rows],
    )


def _last_seqs(kafka: Settings) -> tuple[dict[str, int], dict[str, int]]:
    """Each user's and item's last seq in interactions.log."""
    topic = kafka.topic("interactions.log")
    codec = make_codec(kafka, SEQUENCED_INTERACTION, topic)
    users: dict[str, int] = {}
    items: dict[str, int] = {}
    for _key, value, _p, _o in read_all(kafka, topic):
        record = codec.decode(value)
        event = record["interaction"]
        users[event["user_id"]] = max(users.get(event["user_id"], -1), record["seq"])
        items[event["item_id"]] = max(items.get(event["item_id"], -1), record["seq"])
    return users, items


def _both(urls: list[str], path: str) -> list[tuple[int, dict[str, str], dict[str, Any]]]:
    """The answers of both workers to one query, once they agree (the last item vectors
    from the other worker may still be reaching an index when the stream has just ended)."""
    answers = []
    for _ in range(30):
        answers = [_get(url + path) for url in urls]
        if answers[0][2] == answers[1][2]:
            break
        time.sleep(1.0)
    return answers


def test_any_worker_answers_with_the_owners_offline_ranking(
    pipeline: tuple[Settings, Path, list[str]],
) -> None:
    kafka, checkpoint, urls = pipeline
    users, items, times = _stream()
    last_user_seq, last_item_seq = _last_seqs(kafka)
    online = reference(checkpoint, range(HISTORY, HISTORY + STREAM))
    busiest = sorted(set(users), key=lambda u: (-users.count(u), u))[:6]
    owners = set()
    for user in busiest:
        (s0, h0, a0), (s1, h1, a1) = _both(urls, f"/users/{user}/recommendations?k=10")
        assert (s0, s1) == (200, 200), (a0, a1)
        assert a0 == a1  # the forwarded answer is the owner's
        # Exactly one of the two was forwarded, by the worker that does not own the user.
        forwarded = ["Via" in h0, "Via" in h1]
        assert sorted(forwarded) == [False, True]
        owner = a0["served_by"]
        assert owner == f"jodie-worker-{forwarded.index(False)}"
        owners.add(owner)
        # The state's log position and time: the user's last event in interactions.log.
        assert a0["log_seq"] == last_user_seq[user]
        assert a0["last_event_time"] == max(
            t for u, t in zip(users, times, strict=True) if u == user
        )
        assert a0["pending_events"] == 0
        # Projected to the stream time: the latest event time applied anywhere.
        assert a0["projected_to"] == max(times) and a0["time"] == "stream"
        assert a0["model_version"] == "test-v1" and a0["k"] == 10
        got = [(r["item_id"], r["score"]) for r in a0["recommendations"]]
        assert len(got) == 10
        assert_ranked_as_offline(got, offline_ranking(checkpoint, online, user, max(times)))
        # At a later time of the client's choosing, still the offline ranking.
        later = max(times) + 7200.0
        status, _h, at = _get(f"{urls[0]}/users/{user}/recommendations?k=5&at={later}")
        assert status == 200 and at["projected_to"] == later and at["time"] == "at"
        got = [(r["item_id"], r["score"]) for r in at["recommendations"]]
        assert_ranked_as_offline(got, offline_ranking(checkpoint, online, user, later))
    assert owners == {"jodie-worker-0", "jodie-worker-1"}  # both kinds of answer were seen

    item = items[-1]
    (s0, _h0, i0), (s1, _h1, i1) = _both(urls, f"/items/{item}")
    assert (s0, s1) == (200, 200) and i0 == i1
    row = online.states.items.row(item)
    assert row is not None
    assert i0["log_seq"] == last_item_seq[item]
    assert i0["count"] == int(online.states.items.count[row])
    assert i0["last_event_time"] == float(online.states.items.last_time[row])
    assert i0["trend"] == pytest.approx(float(online.states.items.trend[row]))


def test_forwarded_queries_at_once_get_the_owners_answers(
    pipeline: tuple[Settings, Path, list[str]],
) -> None:
    """Many queries at once at a worker that owns none of their users: each forwarded over
    the connections it keeps to the owner, each the owner's own answer to that user."""
    _kafka, _checkpoint, urls = pipeline
    users, _items, _times = _stream()
    path = "/users/{}/recommendations?k=5"
    owned_by_1 = []
    for user in sorted(set(users)):
        status, headers, _body = _get(urls[1] + path.format(user))
        if status == 200 and "Via" not in headers:
            owned_by_1.append(user)
        if len(owned_by_1) == 8:
            break
    assert len(owned_by_1) == 8
    asked = [owned_by_1[n % 8] for n in range(48)]
    for _ in range(30):  # the last item vectors may still be reaching worker 1's index
        owners = {user: _get(urls[1] + path.format(user))[2] for user in owned_by_1}
        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(lambda user: _get(urls[0] + path.format(user)), asked))
        if all(body == owners[user] for user, (_s, _h, body) in zip(asked, got, strict=True)):
            break
        time.sleep(1.0)
    for user, (status, headers, body) in zip(asked, got, strict=True):
        assert status == 200 and headers["Via"] == "1.1 jodie-worker-1", (user, body)
        assert body == owners[user]


def test_unknown_users_cold_starts_and_bad_parameters(
    pipeline: tuple[Settings, Path, list[str]],
) -> None:
    _kafka, _checkpoint, urls = pipeline
    for url in urls:  # asked of the owner or forwarded to it
        status, _h, body = _get(f"{url}/users/nobody-here/recommendations")
        assert status == 404 and "unknown user 'nobody-here'" in body["error"]
        status, _h, cold = _get(f"{url}/users/nobody-here/recommendations?k=4&cold_start=1")
        assert status == 200 and cold["cold_start"] is True and cold["log_seq"] is None
        scores = [r["score"] for r in cold["recommendations"]]
        assert len(scores) == 4 and scores == sorted(scores, reverse=True)
        for r in cold["recommendations"]:
            assert set(r["terms"]) == {"popularity", "trend"}
        assert _get(f"{url}/items/no-such-item")[0] == 404
        for bad in ("k=0", "k=abc", "k=1001", "k=", "at=nan", "at=soon"):
            status, _h, body = _get(f"{url}/users/nobody-here/recommendations?{bad}")
            assert status == 400, (bad, body)
            assert body["error"].startswith(("k must", "at must"))
    users, _items, times = _stream()
    status, _h, body = _get(f"{urls[0]}/users/{users[0]}/recommendations?at={min(times) - 1}")
    assert status == 400 and "before the user's last event" in body["error"]


def _jodie(*args: str, port: int) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "JODIE_WEB_PORT": str(port)}
    return subprocess.run(
        [sys.executable, "-m", "streams", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_jodie_recommend(pipeline: tuple[Settings, Path, list[str]]) -> None:
    _kafka, _checkpoint, urls = pipeline
    port0 = int(urls[0].rsplit(":", 1)[1])
    users, _items, _times = _stream()
    user = users[-1]
    done = _jodie("recommend", user, "-k", "3", "--json", "--workers", "2", port=port0)
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    _s, _h, answer = _get(f"{urls[0]}/users/{user}/recommendations?k=3")
    assert [r["item_id"] for r in printed["recommendations"]] == [
        r["item_id"] for r in answer["recommendations"]
    ]
    assert printed["log_seq"] == answer["log_seq"] and printed["k"] == 3
    # The client API asks the same way (one worker is enough: it forwards).
    with Client(_kafka) as client:
        got = client.query(user, 3, urls=[urls[1]])
    assert [r.item_id for r in got.recommendations] == [
        r["item_id"] for r in answer["recommendations"]
    ]

    text = _jodie("recommend", user, "-k", "2", "--workers", "2", port=port0)
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[0].startswith(f"user {user}  model test-v1  state at log seq ")
    assert lines[1].startswith("  1. item ") and "= distance " in lines[1]
    assert lines[-1].startswith("score = distance + history + popularity + trend")

    unknown = _jodie("recommend", "nobody-here", "--workers", "2", port=port0)
    assert unknown.returncode == 2 and unknown.stdout == ""
    assert unknown.stderr.count("\n") == 1 and "unknown user 'nobody-here'" in unknown.stderr
    cold = _jodie("recommend", "nobody-here", "--cold-start", "--workers", "2", port=port0)
    assert cold.returncode == 0 and "unknown user: items popular and trending now" in cold.stdout

    nobody = _jodie("recommend", user, "--workers", "1", port=free_port())
    assert nobody.returncode == 2 and nobody.stderr.count("\n") == 1
    assert "no worker answered" in nobody.stderr

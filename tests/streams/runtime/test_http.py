"""The HTTP endpoint serves the routes an application registers, and only those: exact pages
and patterns with path parameters, query strings and JSON errors; it sheds queries it cannot
answer in time (503 with Retry-After) and forwards on kept connections."""

from __future__ import annotations

import asyncio
import http.client
import json
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from streams.runtime.http import (
    Endpoint,
    HttpError,
    Peers,
    Request,
    Response,
    fetch,
    json_response,
    json_route,
)


def test_routes_are_served_and_others_are_not() -> None:
    counts = {"events": 0}
    http = Endpoint()
    http.route("/metrics", json_route(lambda: dict(counts)))
    assert http.serve(0)
    try:
        counts["events"] = 3
        with urllib.request.urlopen(f"http://127.0.0.1:{http.port}/metrics/") as reply:
            assert reply.headers["Content-Type"] == "application/json"
            assert json.loads(reply.read()) == {"events": 3}
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(f"http://127.0.0.1:{http.port}/other")
        assert missing.value.code == 404
    finally:
        http.close()


def test_a_taken_port_is_reported_not_raised() -> None:
    first = Endpoint()
    assert first.serve(0)
    try:
        assert not Endpoint().serve(first.port or 0)
    finally:
        first.close()


def test_json_routes_serve_what_is_not_measured_as_null() -> None:
    page = {"mrr": float("nan"), "nested": [{"r10": float("inf")}, 0.5], "n": 3}
    http = Endpoint()
    http.route("/metrics.json", json_route(lambda: page))
    assert http.serve(0)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{http.port}/metrics.json") as reply:
            text = reply.read().decode()
    finally:
        http.close()

    def refuse(constant: str) -> None:
        raise AssertionError(f"{constant} is not JSON")

    assert json.loads(text, parse_constant=refuse) == {
        "mrr": None,
        "nested": [{"r10": None}, 0.5],
        "n": 3,
    }


def _get(url: str) -> tuple[int, dict, dict]:
    try:
        with urllib.request.urlopen(url) as reply:
            return reply.status, dict(reply.headers), json.loads(reply.read())
    except urllib.error.HTTPError as reply:
        with reply:
            return reply.code, dict(reply.headers), json.loads(reply.read())


def test_patterns_take_path_parameters_and_query_strings() -> None:
    def echo(request: Request) -> Response:
        if request.arg("k") == "bad":
            raise HttpError(400, "k is bad", {"Retry-After": "1"}, hint="use a number")
        if request.arg("k") == "bug":
            raise ZeroDivisionError("a handler's bug")
        return json_response(
            {
                "user": request.params["user_id"],
                "k": request.arg("k", "10"),
                "cold": request.flag("cold_start"),
                "via": request.headers.get("via"),
            }
        )

    http = Endpoint()
    http.route("/metrics", json_route(lambda: {"events": 1}))
    http.get("/users/{user_id}/recommendations", echo)
    assert http.serve(0)
    base = f"http://127.0.0.1:{http.port}"
    try:
        assert _get(f"{base}/users/u%2F7/recommendations?k=3&cold_start=1")[2] == {
            "user": "u/7",
            "k": "3",
            "cold": True,
            "via": None,
        }
        assert _get(f"{base}/users/8/recommendations/?cold_start=0")[2]["cold"] is False
        assert _get(f"{base}/metrics?format=json")[2] == {"events": 1}
        status, headers, body = _get(f"{base}/users/8/recommendations?k=bad")
        assert (status, headers["Retry-After"], body) == (
            400,
            "1",
            {"error": "k is bad", "hint": "use a number"},
        )
        status, _headers, body = _get(f"{base}/users/8/recommendations?k=bug")
        assert status == 500 and "ZeroDivisionError" in body["error"]
        assert _get(f"{base}/users/8")[0] == 404
        assert _get(f"{base}/users//recommendations")[0] == 404
        reply = fetch(f"{base}/users/9/recommendations", 5.0, {"Via": "1.1 w-0"})
        assert reply.status == 200 and json.loads(reply.body)["via"] == "1.1 w-0"
        assert fetch(f"{base}/nothing", 5.0).status == 404
    finally:
        http.close()
    with pytest.raises(OSError):
        fetch(f"{base}/metrics", 2.0)


def _send(base: str, paths: list[str]) -> list[http.client.HTTPConnection]:
    """GET every path, each on its own connection, reading no answer yet."""
    connections = []
    for path in paths:
        connection = http.client.HTTPConnection("127.0.0.1", int(base.rsplit(":", 1)[1]), 10)
        connection.request("GET", path)
        connections.append(connection)
    return connections


def _answers(connections: list[http.client.HTTPConnection]) -> list[tuple[int, dict, dict]]:
    answers = []
    for connection in connections:
        reply = connection.getresponse()
        answers.append((reply.status, dict(reply.getheaders()), json.loads(reply.read())))
        connection.close()
    return answers


def _queued_behind_a_held_query(
    endpoint: Endpoint, paths: list[str], slow_s: float = 0.0
) -> list[tuple[int, dict, dict]]:
    """Serve ``endpoint`` with /users/{user_id} where /users/gate holds the endpoint's one
    thread and /users/slow takes ``slow_s``; while the gate holds it, send ``paths`` at once
    (they arrive together), then let it go. The answers to ``paths``, in order; the endpoint
    is closed."""
    entered, gate = threading.Event(), threading.Event()

    def handler(request: Request) -> Response:
        user = request.params["user_id"]
        if user == "gate":
            entered.set()
            assert gate.wait(10.0)
        elif user == "slow":
            time.sleep(slow_s)
        return json_response({"user": user})

    endpoint.get("/users/{user_id}", handler)
    assert endpoint.serve(0)
    base = f"http://127.0.0.1:{endpoint.port}"
    try:
        with ThreadPoolExecutor(1) as pool:
            held = pool.submit(_get, f"{base}/users/gate")
            assert entered.wait(10.0)
            sent = _send(base, paths)
            gate.set()
            assert held.result(timeout=10)[0] == 200
            return _answers(sent)
    finally:
        endpoint.close()


def test_a_full_queue_sheds_queries_with_503_and_retry_after_but_never_pages() -> None:
    endpoint = Endpoint(max_queue=2, max_wait_s=30.0)
    endpoint.route("/metrics", json_route(lambda: {"events": 1}))
    got = _queued_behind_a_held_query(endpoint, [f"/users/{n}" for n in range(4)] + ["/metrics"])
    # Two fit the queue; the next two find it full; the page is answered as it arrives.
    assert [status for status, _h, _b in got] == [200, 200, 503, 503, 200]
    assert [b["user"] for _s, _h, b in got[:2]] == ["0", "1"]
    for _status, headers, body in got[2:4]:
        assert headers["Retry-After"] == "1"
        assert body["error"].startswith("overloaded: 2 requests are waiting")
    assert got[4][2] == {"events": 1}
    assert endpoint.shed == 2


def test_a_query_that_waited_too_long_is_shed_not_answered_late() -> None:
    endpoint = Endpoint(max_queue=10, max_wait_s=0.2)
    got = _queued_behind_a_held_query(endpoint, ["/users/slow", "/users/late"], slow_s=0.5)
    (s1, _h1, b1), (s2, h2, b2) = got
    # Both were queued at once; the second's turn came 0.5 s later, past its 0.2 s.
    assert (s1, b1) == (200, {"user": "slow"})
    assert s2 == 503 and h2["Retry-After"] == "1" and "waited" in b2["error"]
    assert endpoint.shed == 1


def test_forwards_use_kept_connections_and_relay_the_owners_answer() -> None:
    owner = Endpoint(idle_s=0.3)
    owner.get("/users/{user_id}", lambda r: json_response({"user": r.params["user_id"]}))
    asker = Endpoint()

    async def forward(request: Request) -> Response:
        reply = await asker.peers.get(
            f"127.0.0.1:{owner.port}", request.target, 5.0, {"Via": "1.1 asker"}
        )
        return Response(reply.status, reply.body, reply.content_type, {"Via": "1.1 owner"})

    asker.get("/users/{user_id}", forward)
    assert owner.serve(0) and asker.serve(0)
    try:
        for user in ("a", "b%2Fc", "d"):
            direct = _get(f"http://127.0.0.1:{owner.port}/users/{user}")
            forwarded = _get(f"http://127.0.0.1:{asker.port}/users/{user}")
            assert forwarded[0] == direct[0] == 200
            assert forwarded[2] == direct[2] and forwarded[1]["Via"] == "1.1 owner"
        # Three direct connections and one kept for all three forwards.
        assert owner.accepted == 4
        # The owner closes the idle kept connection; the next forward notices, asks again.
        time.sleep(0.8)
        status, _headers, body = _get(f"http://127.0.0.1:{asker.port}/users/e")
        assert (status, body) == (200, {"user": "e"})
        assert owner.accepted == 5
        # Many at once: each answered with its own user's answer.
        with ThreadPoolExecutor(8) as pool:
            got = list(
                pool.map(lambda n: _get(f"http://127.0.0.1:{asker.port}/users/u{n}"), range(40))
            )
        assert [b["user"] for _s, _h, b in got] == [f"u{n}" for n in range(40)]
    finally:
        asker.close()
        owner.close()


def test_a_forward_to_an_endpoint_that_is_gone_raises_oserror() -> None:
    owner = Endpoint()
    assert owner.serve(0)
    address = f"127.0.0.1:{owner.port}"
    owner.close()
    peers = Peers()
    with pytest.raises(OSError):
        asyncio.run(peers.get(address, "/users/x", 2.0))

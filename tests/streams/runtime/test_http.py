"""The HTTP endpoint serves the routes an application registers, and only those: exact pages
and patterns with path parameters, query strings and JSON errors."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from streams.runtime.http import (
    Endpoint,
    HttpError,
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

"""The HTTP endpoint serves the routes an application registers, and only those."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from streams.runtime.http import Endpoint, json_route


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

"""The dashboard's HTTP side on 127.0.0.1: the page, its files and the JSON API."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from streams.dashboard.board import Board
from streams.dashboard.exceptions import DashboardError
from streams.dashboard.server import Server


@pytest.fixture
def served() -> Iterator[tuple[Board, str]]:
    board = Board()
    for seq, user in enumerate(["6170", "6171", "42"]):
        board.on_log(
            {"seq": seq, "interaction": {"user_id": user, "item_id": "x", "timestamp": 0.0}},
            1_700_000_000.0,
        )
    server = Server(board, threading.Lock(), port=0)
    server.start()
    try:
        yield board, f"http://127.0.0.1:{server.port}"
    finally:
        server.close()


def get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read()


def get_json(url: str) -> tuple[int, Any]:
    status, kind, body = get(url)
    assert kind == "application/json"
    return status, json.loads(body)


def test_the_page_and_its_files_come_from_the_package(served: tuple[Board, str]) -> None:
    _, base = served
    status, kind, page = get(base + "/")
    assert status == 200 and kind.startswith("text/html")
    assert b'<script src="/static/dashboard.js">' in page
    assert b"http" not in page.replace(b"http-equiv", b"")  # nothing fetched from elsewhere
    status, kind, script = get(base + "/static/dashboard.js")
    assert status == 200 and kind.startswith("text/javascript") and b"/api/overview" in script
    assert get(base + "/static/dashboard.css")[0] == 200
    assert get(base + "/static/../board.py")[0] == 404
    assert get_json(base + "/nothing")[0] == 404


def test_the_api_answers_json(served: tuple[Board, str]) -> None:
    _, base = served
    status, overview = get_json(base + "/api/overview")
    assert status == 200 and overview["totals"]["log"] == 3
    status, user = get_json(base + "/api/user?id=6170")
    assert status == 200 and user["user_id"] == "6170" and user["events"] == 1
    status, missing = get_json(base + "/api/user?id=6179")
    assert status == 404 and missing["similar"] == ["6171", "6170"]
    status, found = get_json(base + "/api/users?prefix=617")
    assert found == {"users": ["6171", "6170"]}


def test_a_taken_port_is_one_error(served: tuple[Board, str]) -> None:
    board, base = served
    port = int(base.rpartition(":")[2])
    with pytest.raises(DashboardError, match=f"127.0.0.1:{port}.*--port"):
        Server(board, threading.Lock(), port=port)

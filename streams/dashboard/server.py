"""The dashboard's HTTP side: the page and its static files, and the JSON API it polls.

- ``/``: the page; ``/static/NAME``: its script and style sheet (from the package, so
  nothing is fetched from elsewhere at run time);
- ``/api/overview``: every chart's data (``Board.overview``);
- ``/api/user?id=U``: one user's view, 404 (with similar ids) when the user is not kept;
- ``/api/users?prefix=P``: kept user ids starting with P, most recently active first.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlsplit

from streams.dashboard.board import Board
from streams.dashboard.exceptions import DashboardError

_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}


def _static() -> dict[str, tuple[bytes, str]]:
    """The page's files by name, read once from the package."""
    folder = resources.files("streams.dashboard") / "static"
    files = {}
    for entry in folder.iterdir():
        suffix = "." + entry.name.rpartition(".")[2]
        if entry.is_file() and suffix in _TYPES:
            files[entry.name] = (entry.read_bytes(), f"{_TYPES[suffix]}; charset=utf-8")
    return files


class Server:
    """Serves the page and the API for ``board`` (read under ``lock``) on ``host:port``
    (port 0: any free one; ``port`` tells which) in a daemon thread."""

    def __init__(
        self, board: Board, lock: threading.Lock, port: int, host: str = "127.0.0.1"
    ) -> None:
        files = _static()

        class Handle(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                url = urlsplit(self.path)
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                path = url.path.rstrip("/") or "/"
                if path == "/":
                    self._send(200, *files["index.html"])
                elif path.startswith("/static/") and path[len("/static/") :] in files:
                    self._send(200, *files[path[len("/static/") :]])
                elif path == "/api/overview":
                    with lock:
                        body: Any = board.overview(now=time.time() - 1)  # complete seconds
                    self._json(200, body)
                elif path == "/api/user":
                    user = query.get("id", "").strip()
                    with lock:
                        view = board.user(user)
                        similar = [] if view is not None else board.find_users(user[:2], 8)
                    if view is None:
                        self._json(404, {"error": f"no user {user!r} seen", "similar": similar})
                    else:
                        self._json(200, view)
                elif path == "/api/users":
                    with lock:
                        users = board.find_users(query.get("prefix", ""))
                    self._json(200, {"users": users})
                else:
                    self._json(404, {"error": f"no page {url.path}"})

            def _json(self, status: int, body: Any) -> None:
                data = json.dumps(body, allow_nan=False, separators=(",", ":")).encode()
                self._send(status, data, "application/json")

            def _send(self, status: int, data: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                return

        try:
            self._server = ThreadingHTTPServer((host, port), Handle)
        except OSError as exc:
            raise DashboardError(
                f"cannot serve on {host}:{port} ({exc.strerror}): pass another --port"
            ) from exc
        self._server.daemon_threads = True
        self.host = host
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="dashboard-http", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        if self._thread.is_alive():  # shutdown() waits for a loop that never started
            self._server.shutdown()
        self._server.server_close()

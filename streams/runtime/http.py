"""A small HTTP endpoint on which an application registers read-only routes (/metrics, ...).

Handlers run on the server's threads, next to the processing loop: they should read
snapshots (counters, copies), not structures the loop is changing.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_log = logging.getLogger("jodie.http")

#: A route's handler: () → (body, content type).
Handler = Callable[[], tuple[bytes, str]]


def finite(value: Any) -> Any:
    """``value`` with every NaN or infinite float replaced by None: JSON has no NaN, and a
    figure not measured yet reads as null to any JSON parser."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def dumps(value: Any) -> str:
    """``value`` as strict JSON (non-finite floats as null)."""
    return json.dumps(finite(value), allow_nan=False)


def json_route(snapshot: Callable[[], Any]) -> Handler:
    """A handler that serves ``snapshot()`` as strict JSON (non-finite floats as null)."""
    return lambda: (dumps(snapshot()).encode(), "application/json")


class Endpoint:
    """Routes by exact path (a trailing slash is ignored); any other path answers 404."""

    def __init__(self) -> None:
        self.routes: dict[str, Handler] = {}
        self._server: ThreadingHTTPServer | None = None

    def route(self, path: str, handler: Handler) -> None:
        self.routes[path.rstrip("/")] = handler

    def serve(self, port: int, host: str = "127.0.0.1") -> bool:
        """Serve in a daemon thread; False (logged) when the port cannot be had, since a
        missing metrics page must not stop the processing."""
        routes = self.routes

        class Handle(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                handler = routes.get(self.path.rstrip("/"))
                if handler is None:
                    self.send_error(404)
                    return
                body, content_type = handler()
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                return

        try:
            self._server = ThreadingHTTPServer((host, port), Handle)
        except OSError as exc:
            _log.warning("HTTP endpoint not served on %s:%d: %s", host, port, exc)
            return False
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return True

    @property
    def port(self) -> int | None:
        return self._server.server_address[1] if self._server is not None else None

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

"""A small HTTP endpoint on which an application registers read-only routes (/metrics, ...).

Two kinds of route: an exact path with a handler of no arguments (a page such as /metrics),
and a pattern with ``{name}`` segments (``/users/{user_id}/recommendations``) whose handler
takes the ``Request`` (path parameters, query string, headers) and returns a ``Response``
with its status. Exact paths are matched first; the query string never takes part in
matching. A handler raises ``HttpError`` for a client's mistake (400, 404, ...); any other
exception answers 500, logged, and the server goes on.

Handlers run on the server's threads, next to the processing loop: they should read
snapshots (counters, copies), or hold the lock the loop changes its state under.
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from streams.runtime.exceptions import StreamRuntimeError

_log = logging.getLogger("jodie.http")

#: A route's handler: () → (body, content type).
Handler = Callable[[], tuple[bytes, str]]

JSON = "application/json"


@dataclass(frozen=True)
class Request:
    """A GET request as a pattern route sees it: the path (without the query string), its
    ``{name}`` parameters (percent-decoded), the query string's values and the headers."""

    path: str
    params: Mapping[str, str]
    query: Mapping[str, list[str]] = field(default_factory=dict)
    headers: Mapping[str, str] = field(default_factory=dict)  # names in lower case
    target: str = ""  # path and query string as received, for forwarding

    def arg(self, name: str, default: str | None = None) -> str | None:
        """The last value of query parameter ``name`` (``default`` when absent)."""
        values = self.query.get(name)
        return values[-1] if values else default

    def flag(self, name: str) -> bool:
        """A yes/no query parameter: present and not one of 0, false, no, off."""
        value = self.arg(name)
        return value is not None and value.strip().lower() not in ("0", "false", "no", "off")


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    content_type: str = JSON
    headers: Mapping[str, str] = field(default_factory=dict)


#: A pattern route's handler.
RequestHandler = Callable[[Request], Response]


def json_response(
    payload: Any, status: int = 200, headers: Mapping[str, str] | None = None
) -> Response:
    """``payload`` as JSON (NaN and infinities refused: they are not JSON)."""
    body = json.dumps(payload, allow_nan=False).encode()
    return Response(status, body, JSON, dict(headers or {}))


class HttpError(StreamRuntimeError):
    """A request the handler refuses (its status and message go to the client as JSON);
    the message says what to ask instead."""

    def __init__(
        self, status: int, message: str, headers: Mapping[str, str] | None = None, **extra: Any
    ) -> None:
        super().__init__(message)
        self.status = status
        self.headers = dict(headers or {})
        self.extra = extra

    def response(self) -> Response:
        return json_response({"error": str(self), **self.extra}, self.status, self.headers)


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


_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _compile(pattern: str) -> re.Pattern[str]:
    """``/users/{user_id}`` → a regex whose groups take one path segment each (still
    percent-encoded, so an id may hold any character, '/' included, as %2F)."""
    out, at = "", 0
    for m in _PARAM.finditer(pattern):
        out += re.escape(pattern[at : m.start()]) + f"(?P<{m.group(1)}>[^/]+)"
        at = m.end()
    return re.compile(out + re.escape(pattern[at:].rstrip("/")) + "/?")


class Endpoint:
    """Routes by exact path or by pattern (a trailing slash is ignored); any other path
    answers 404."""

    def __init__(self) -> None:
        self.routes: dict[str, Handler] = {}
        self.patterns: list[tuple[re.Pattern[str], RequestHandler]] = []
        self._server: ThreadingHTTPServer | None = None

    def route(self, path: str, handler: Handler) -> None:
        self.routes[path.rstrip("/")] = handler

    def get(self, pattern: str, handler: RequestHandler) -> None:
        """Serve GET requests whose path matches ``pattern`` (``{name}``: one segment)."""
        self.patterns.append((_compile(pattern), handler))

    def dispatch(self, target: str, headers: Mapping[str, str]) -> Response:
        """The response to a GET of ``target`` (path and query string)."""
        parts = urlsplit(target)
        path = parts.path.rstrip("/")
        page = self.routes.get(path)
        if page is not None:
            body, content_type = page()
            return Response(200, body, content_type)
        for regex, handler in self.patterns:
            m = regex.fullmatch(parts.path)
            if m is None:
                continue
            request = Request(
                path=parts.path,
                params={k: unquote(v) for k, v in m.groupdict().items()},
                query=parse_qs(parts.query, keep_blank_values=True),
                headers=headers,
                target=target,
            )
            try:
                return handler(request)
            except HttpError as exc:
                return exc.response()
        return json_response({"error": f"no such page: {parts.path}"}, 404)

    def serve(self, port: int, host: str = "127.0.0.1") -> bool:
        """Serve in a daemon thread; False (logged) when the port cannot be had, since a
        missing metrics page must not stop the processing."""
        endpoint = self

        class Handle(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                try:
                    headers = {k.lower(): v for k, v in self.headers.items()}
                    response = endpoint.dispatch(self.path, headers)
                except Exception as exc:  # a handler's bug must not take the server down
                    _log.exception("GET %s failed", self.path)
                    response = json_response({"error": f"{type(exc).__name__}: {exc}"}, 500)
                self.send_response(response.status)
                self.send_header("Content-Type", response.content_type)
                self.send_header("Content-Length", str(len(response.body)))
                for name, value in response.headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(response.body)

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

    @property
    def host(self) -> str | None:
        return str(self._server.server_address[0]) if self._server is not None else None

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def fetch(url: str, timeout_s: float, headers: Mapping[str, str] | None = None) -> Response:
    """GET ``url``: the response whatever its status (an error status is an answer too);
    ``OSError`` when nothing answers (refused, timed out)."""
    request = urllib.request.Request(url, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as reply:
            return Response(reply.status, reply.read(), reply.headers.get("Content-Type", JSON), {})
    except urllib.error.HTTPError as reply:
        with reply:
            return Response(reply.code, reply.read(), reply.headers.get("Content-Type", JSON), {})

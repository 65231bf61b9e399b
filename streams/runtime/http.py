"""A small HTTP endpoint on which an application registers read-only routes (/metrics, ...).

Two kinds of route: an exact path with a handler of no arguments (a page such as /metrics),
and a pattern with ``{name}`` segments (``/users/{user_id}/recommendations``) whose handler
takes the ``Request`` (path parameters, query string, headers) and returns a ``Response``
with its status, or an awaitable of one (a handler that forwards the request elsewhere
awaits the answer with ``Endpoint.peers`` instead of holding a thread). Exact paths are
matched first; the query string never takes part in matching. A handler raises
``HttpError`` for a client's mistake (400, 404, ...); any other exception answers 500,
logged, and the server goes on.

One thread serves everything, on an asyncio loop: HTTP/1.1 with keep-alive (httptools, the
C parser of llhttp, parses), each answer written at once. Handlers run on that thread, one
at a time, next to the processing loop: they should read snapshots (counters, copies), or
hold the lock the loop changes its state under, and be short. The thread per connection of
``http.server`` cost a thread start per query, and under load it took every query in,
however late it would be answered: here a pattern route's requests wait in one bounded
queue, and one that finds ``max_queue`` ahead of it, or has waited ``max_wait_s`` when its
turn comes, is answered 503 with ``Retry-After`` at once (load shedding: a client that can
retry elsewhere or later is better served than by an answer in 20 s). Pages are answered as
they arrive, never shed, so a busy worker's metrics can still be read.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import math
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import httptools

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


#: What a pattern route's handler returns: the response, or an awaitable of it.
Reply = Response | Awaitable[Response]
#: A pattern route's handler.
RequestHandler = Callable[[Request], Reply]


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


#: Retry-After of a shed request: a queue's worth of answers takes well under a second.
_SHED_RETRY_S = 1
#: Longest the endpoint answers queued requests before it reads its sockets again.
_SLICE_S = 0.02


class Endpoint:
    """Routes by exact path or by pattern (a trailing slash is ignored); any other path
    answers 404.

    ``max_queue``: most pattern-route requests waiting or being forwarded at once; more are
    answered 503. ``max_wait_s``: a request that waited longer than this for its turn is
    answered 503 instead (the client asked long ago and can ask again). ``idle_s``: a
    keep-alive connection with no request for this long is closed.
    """

    def __init__(self, max_queue: int = 64, max_wait_s: float = 0.5, idle_s: float = 30.0) -> None:
        self.routes: dict[str, Handler] = {}
        self.patterns: list[tuple[re.Pattern[str], RequestHandler]] = []
        self.max_queue = max(1, max_queue)
        self.max_wait_s = max_wait_s
        self.idle_s = idle_s
        #: Requests answered 503 because the queue was full or they waited too long.
        self.shed = 0
        #: Connections accepted (a client that keeps its connection open counts once).
        self.accepted = 0
        self._queue: deque[_Pending] = deque()
        self._dispatching = False
        self._awaiting = 0  # requests whose handlers await (forwards in flight)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._address: tuple[str, int] | None = None
        self._connections: set[_Connection] = set()
        self._peers: Peers | None = None

    def route(self, path: str, handler: Handler) -> None:
        self.routes[path.rstrip("/")] = handler

    def get(self, pattern: str, handler: RequestHandler) -> None:
        """Serve GET requests whose path matches ``pattern`` (``{name}``: one segment)."""
        self.patterns.append((_compile(pattern), handler))

    def dispatch(self, target: str, headers: Mapping[str, str]) -> Reply:
        """The response to a GET of ``target`` (path and query string), or an awaitable of
        it when the route's handler awaits something."""
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
                reply = handler(request)
            except HttpError as exc:
                return exc.response()
            return _settled(reply) if inspect.isawaitable(reply) else reply
        return json_response({"error": f"no such page: {parts.path}"}, 404)

    def serve(self, port: int, host: str = "127.0.0.1") -> bool:
        """Serve in a daemon thread; False (logged) when the port cannot be had, since a
        missing metrics page must not stop the processing."""
        try:
            sock = socket.create_server((host, port))
        except OSError as exc:
            _log.warning("HTTP endpoint not served on %s:%d: %s", host, port, exc)
            return False
        address = sock.getsockname()
        self._address = (str(address[0]), int(address[1]))
        loop = asyncio.new_event_loop()
        self._server = loop.run_until_complete(
            loop.create_server(lambda: _Connection(self), sock=sock)
        )
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name="http", daemon=True)
        self._thread.start()
        return True

    @property
    def peers(self) -> Peers:
        """Keep-alive connections to other endpoints, for handlers that forward (from this
        endpoint's thread only)."""
        if self._peers is None:
            self._peers = Peers()
        return self._peers

    @property
    def port(self) -> int | None:
        return self._address[1] if self._address is not None else None

    @property
    def host(self) -> str | None:
        return self._address[0] if self._address is not None else None

    def close(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        future = asyncio.run_coroutine_threadsafe(self._shut(), loop)
        try:
            future.result(timeout=5.0)
        except (TimeoutError, RuntimeError) as exc:  # a handler stuck past the timeout
            _log.warning("HTTP endpoint did not close cleanly: %s", exc)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5.0)
        if not thread.is_alive():
            loop.close()
        self._loop = self._thread = self._server = self._address = None

    async def _shut(self) -> None:
        if self._server is not None:
            self._server.close()
        for connection in list(self._connections):
            connection.close()
        if self._peers is not None:
            self._peers.close()
        for task in asyncio.all_tasks():
            if task is not asyncio.current_task():
                task.cancel()

    # -- on the loop's thread ------------------------------------------------------------------
    def _received(self, pending: _Pending) -> None:
        """A complete request: a page at once, a pattern route's into the queue (or shed)."""
        path = urlsplit(pending.target).path.rstrip("/")
        if path in self.routes:
            self._reply(pending, self._answer(pending))
            return
        waiting = len(self._queue) + self._awaiting
        if waiting >= self.max_queue:
            pending.connection.respond(self._shed(f"{waiting} requests are waiting"))
            return
        self._queue.append(pending)
        if not self._dispatching:
            self._dispatching = True
            asyncio.get_running_loop().call_soon(self._dispatch)

    def _dispatch(self) -> None:
        """Answer the queued requests, oldest first, for up to ``_SLICE_S``; then let the loop
        read the sockets (arrivals meanwhile join the queue, and see its true length) before
        the rest. Not one request per turn of the loop: each turn waits for the GIL again
        after its poll, and on a busy machine each wait is a trip through the scheduler."""
        began = time.monotonic()
        while self._queue and time.monotonic() - began < _SLICE_S:
            pending = self._queue.popleft()
            waited = time.monotonic() - pending.arrived
            if pending.connection.closed:
                continue  # the client gave up
            if waited > self.max_wait_s:
                pending.connection.respond(self._shed(f"the request waited {waited:.2f} s"))
            else:
                self._reply(pending, self._answer(pending))
        if self._queue:
            asyncio.get_running_loop().call_soon(self._dispatch)
        else:
            self._dispatching = False

    def _reply(self, pending: _Pending, reply: Reply) -> None:
        if isinstance(reply, Response):
            pending.connection.respond(reply)
        else:
            self._awaiting += 1
            task = asyncio.ensure_future(self._await(pending, reply))
            task.add_done_callback(_forget)

    def _answer(self, pending: _Pending) -> Reply:
        try:
            return self.dispatch(pending.target, pending.headers)
        except Exception as exc:  # a handler's bug must not take the server down
            return _failed(pending.target, exc)

    async def _await(self, pending: _Pending, reply: Awaitable[Response]) -> None:
        try:
            response = await reply
        except Exception as exc:  # a handler's bug must not take the server down
            response = _failed(pending.target, exc)
        finally:
            self._awaiting -= 1
        pending.connection.respond(response)

    def _shed(self, why: str) -> Response:
        self.shed += 1
        return HttpError(
            503,
            f"overloaded: {why}; retry shortly",
            {"Retry-After": str(_SHED_RETRY_S)},
        ).response()


async def _settled(reply: Awaitable[Response]) -> Response:
    try:
        return await reply
    except HttpError as exc:
        return exc.response()


def _failed(target: str, exc: Exception) -> Response:
    _log.error("GET %s failed", target, exc_info=exc)
    return json_response({"error": f"{type(exc).__name__}: {exc}"}, 500)


def _forget(task: asyncio.Future[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        _log.error("an HTTP answer was lost", exc_info=task.exception())


@dataclass
class _Pending:
    connection: _Connection
    target: str
    headers: dict[str, str]  # names in lower case
    arrived: float  # monotonic


#: Most requests a client may pipeline on one connection before it is read no further.
_PIPELINED = 8


class _Connection(asyncio.Protocol):
    """One client's connection (httptools parses): its requests answered one at a time, in
    order; HTTP/1.1 keeps it open unless the client asks to close."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._parsed: deque[tuple[bytes, _Pending, bool]] = deque()  # method, request, keep
        self._busy = False  # a request of this connection is being answered
        self._keep = True  # the one being answered lets the connection stay open
        self._eof = False  # the client has sent all it will
        self._paused = False
        self._idle: asyncio.TimerHandle | None = None
        self._url = b""
        self._headers: dict[str, str] = {}
        self._keep_asked = True

    # -- asyncio -------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.endpoint._connections.add(self)
        self.endpoint.accepted += 1
        self._wait_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.endpoint._connections.discard(self)
        if self._idle is not None:
            self._idle.cancel()

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            self._refuse(exc)
            return
        self._next()

    def eof_received(self) -> bool:
        self._eof = True
        # Keep the writing half open for the answers still owed; close after the last.
        return self._busy or bool(self._parsed)

    # -- httptools ------------------------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._url, self._headers = b"", {}

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        # llhttp forgets the message's flags once it is complete: ask now.
        self._keep_asked = self.parser.should_keep_alive()

    def on_message_complete(self) -> None:
        pending = _Pending(self, self._url.decode("latin-1"), self._headers, time.monotonic())
        self._parsed.append((self.parser.get_method(), pending, self._keep_asked))
        if len(self._parsed) >= _PIPELINED and self.transport is not None and not self._paused:
            self.transport.pause_reading()
            self._paused = True

    # -- answers ----------------------------------------------------------------------------------
    def _next(self) -> None:
        if self._busy or self.closed or not self._parsed:
            return
        if self._idle is not None:
            self._idle.cancel()
        method, pending, self._keep = self._parsed.popleft()
        if self._paused and self.transport is not None:
            self.transport.resume_reading()
            self._paused = False
        self._busy = True
        if method != b"GET":
            refused = json_response({"error": "only GET is served here"}, 405)
            self.respond(Response(405, refused.body, JSON, {"Allow": "GET"}))
            return
        self.endpoint._received(pending)

    def respond(self, response: Response) -> None:
        """Send ``response`` to the request being answered, then take the next one."""
        if self.closed or self.transport is None or self.transport.is_closing():
            return
        closing = not self._keep or (self._eof and not self._parsed)
        self.transport.write(_head(response, closing) + response.body)
        self._busy = False
        if closing:
            self.close()
            return
        if self._parsed:
            self._next()
        else:
            self._wait_idle()

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
        self.closed = True

    def _refuse(self, exc: Exception) -> None:
        """Bytes that are not an HTTP/1 request: 400, and close."""
        if self.transport is not None and not self._busy:
            bad = json_response({"error": f"not an HTTP request this endpoint takes: {exc}"}, 400)
            self.transport.write(_head(bad, closing=True) + bad.body)
        self.close()

    def _wait_idle(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
        self._idle = asyncio.get_running_loop().call_later(self.endpoint.idle_s, self.close)


def _head(response: Response, closing: bool) -> bytes:
    """The status line and headers of ``response`` (HTTP/1.1; ``closing``: the connection
    closes after it)."""
    try:
        reason = HTTPStatus(response.status).phrase
    except ValueError:
        reason = ""
    lines = [
        f"HTTP/1.1 {response.status} {reason}",
        f"Content-Type: {response.content_type}",
        f"Content-Length: {len(response.body)}",
        *(f"{name}: {value}" for name, value in response.headers.items()),
    ]
    if closing:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class Peers:
    """Keep-alive HTTP/1.1 connections to other endpoints (``host:port``), for requests
    forwarded from an endpoint's loop: a forward costs a request on an open connection, not
    a TCP handshake, a thread and a teardown. A connection the peer closed while it was
    idle is noticed on its next use, and the request goes once more on a new connection
    (a GET may be repeated)."""

    def __init__(self, idle_per_peer: int = 16) -> None:
        self.idle_per_peer = idle_per_peer
        self._idle: dict[str, list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]] = {}

    async def get(
        self,
        address: str,
        target: str,
        timeout_s: float,
        headers: Mapping[str, str] | None = None,
    ) -> Response:
        """GET ``target`` (path and query string) of ``address``: the response whatever its
        status, with its headers (names in lower case); ``OSError`` when nothing answers
        (refused, closed, timed out)."""
        request = "".join(
            [
                f"GET {target} HTTP/1.1\r\nHost: {address}\r\n",
                *(f"{name}: {value}\r\n" for name, value in (headers or {}).items()),
                "\r\n",
            ]
        ).encode("latin-1")
        async with asyncio.timeout(timeout_s):
            idle = self._idle.get(address)
            while idle:
                reader, writer = idle.pop()
                try:
                    return await self._exchange(address, reader, writer, request)
                except _Stale:
                    continue
            host, _sep, port = address.rpartition(":")
            reader, writer = await asyncio.open_connection(host, int(port))
            try:
                return await self._exchange(address, reader, writer, request)
            except _Stale as exc:
                raise ConnectionError(f"{address} closed the connection unanswered") from exc

    async def _exchange(
        self,
        address: str,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        request: bytes,
    ) -> Response:
        answer = _Answer(httptools.HttpResponseParser)
        parser = answer.parser
        heard = False
        try:
            writer.write(request)
            while not answer.complete:
                try:
                    data = await reader.read(65536)
                except ConnectionError as exc:
                    if not heard:
                        raise _Stale from exc
                    raise
                if not data:
                    if not heard:
                        raise _Stale
                    raise ConnectionError(f"{address} closed the connection mid-answer")
                heard = True
                parser.feed_data(data)
        except httptools.HttpParserError as exc:
            writer.close()
            raise ConnectionError(f"{address} answered malformed HTTP: {exc}") from exc
        except BaseException:  # cancelled or failed mid-exchange: never reuse it
            writer.close()
            raise
        idle = self._idle.setdefault(address, [])
        if answer.keep and len(idle) < self.idle_per_peer:
            idle.append((reader, writer))
        else:
            writer.close()
        content_type = answer.headers.get("content-type", JSON)
        return Response(
            parser.get_status_code(), b"".join(answer.body), content_type, answer.headers
        )

    def close(self) -> None:
        for idle in self._idle.values():
            for _reader, writer in idle:
                writer.close()
        self._idle.clear()


class _Answer:
    """What httptools hands over of one response."""

    def __init__(self, parser: Callable[[_Answer], httptools.HttpResponseParser]) -> None:
        self.parser = parser(self)
        self.headers: dict[str, str] = {}
        self.body: list[bytes] = []
        self.keep = False
        self.complete = False

    def on_headers_complete(self) -> None:
        self.keep = self.parser.should_keep_alive()  # forgotten once the message is complete

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.complete = True


class _Stale(Exception):
    """A kept connection the peer had closed: nothing was answered on it."""


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

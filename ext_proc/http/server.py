"""A small, fast HTTP/1.1 server: asyncio.Protocol + httptools, best on uvloop.

It owns the wire: parsing requests (keep-alive, pipelining, chunked request bodies,
``Expect: 100-continue``), framing responses (``Content-Length`` for bytes bodies,
``Transfer-Encoding: chunked`` for async-iterator bodies, one chunk per yielded item,
written at once), back-pressure, idle connections and errors. Routing and everything
else belong to the handler: one ``async (Request) -> Response`` callable.

Used by the mock LLM upstream, the admin API and the metrics endpoint.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from email.utils import formatdate
from http import HTTPStatus
from typing import cast

import httptools
import orjson

__all__ = ["AbortConnection", "Handler", "HttpServer", "Request", "Response"]

_log = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024
DEFAULT_IDLE_TIMEOUT = 300.0

# Stop reading a connection while this many pipelined requests wait for their turn.
_MAX_PIPELINED = 32
# Bytes bodies above this size are written after the head instead of concatenated to it.
_CONCAT_LIMIT = 64 * 1024
# Headers whose meaning the server owns (framing); a handler's copies are dropped.
_FRAMING_HEADERS = frozenset({"content-length", "transfer-encoding", "connection"})
_NO_BODY_STATUSES = frozenset({204, 304})


@dataclass(slots=True)
class Request:
    """One parsed request, body read in full."""

    method: str
    path: str  # as sent (percent-encoding kept), without the query
    query: str  # raw query string, without "?"
    headers: dict[str, str]  # lower-cased names; repeated headers joined by ", "
    body: bytes


@dataclass(slots=True)
class Response:
    """What a handler answers; the server adds Date and the framing headers."""

    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    # bytes: sent with Content-Length. An async iterator: sent chunked, one chunk per item.
    body: bytes | AsyncIterator[bytes] = b""


class AbortConnection(Exception):
    """Raised by a streaming body to cut the connection without the terminating chunk.

    The chunks already yielded are delivered, then the connection is closed: the client
    sees the body end early (as when an upstream dies mid-stream).
    """


Handler = Callable[[Request], Awaitable[Response]]


def _status_line(status: int) -> bytes:
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:
        reason = "Unknown"
    return f"HTTP/1.1 {status} {reason}\r\n".encode("latin-1")


_STATUS_LINES: dict[int, bytes] = {int(s): _status_line(int(s)) for s in HTTPStatus}


def _error_body(status: int, message: str) -> bytes:
    # The project's error shape (OpenAI's), so even the server's own answers parse.
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return orjson.dumps({"error": {"message": message, "type": kind, "code": None, "param": None}})


def _plain_response(status: int, message: str) -> Response:
    return Response(status, [("content-type", "application/json")], _error_body(status, message))


class HttpServer:
    """Serves ``handler`` over HTTP/1.1; one instance per listening address."""

    def __init__(
        self,
        handler: Handler,
        *,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
    ) -> None:
        self.handler = handler
        self.max_body_bytes = max_body_bytes
        # A connection with no request in progress and no bytes received for this long is
        # closed (covers forgotten keep-alive sockets and clients that stall mid-request).
        self.idle_timeout = idle_timeout
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[_Connection] = set()
        self._date = b""
        self._tick_handle: asyncio.TimerHandle | None = None
        self._tick_interval = max(0.05, min(1.0, idle_timeout / 4))

    async def start(self, host: str, port: int) -> int:
        """Listen on ``host:port`` (0 picks a free port); returns the bound port.

        With a name resolving to several addresses and port 0, each socket may get a
        different port: the first one's is returned. Pass an address to avoid that.
        """
        if self._server is not None:
            raise RuntimeError("server already started")
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Connection(self), host, port, backlog=2048, reuse_address=True
        )
        self._tick()
        sockets = self._server.sockets
        if not sockets:
            raise RuntimeError(f"no socket bound for {host}:{port}")
        return int(sockets[0].getsockname()[1])

    async def close(self) -> None:
        """Stop listening, close every connection and cancel the requests in progress."""
        if self._tick_handle is not None:
            self._tick_handle.cancel()
            self._tick_handle = None
        server, self._server = self._server, None
        if server is not None:
            server.close()
        tasks = [t for c in list(self._connections) if (t := c.abort_for_shutdown()) is not None]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if server is not None:
            await server.wait_closed()

    def _tick(self) -> None:
        # One timer for the whole server: refreshes the Date header and closes idle
        # connections, so no per-request timer is needed.
        now = time.time()
        self._date = b"date: " + formatdate(now, usegmt=True).encode() + b"\r\n"
        if self._connections:
            deadline = time.monotonic() - self.idle_timeout
            for conn in [c for c in self._connections if c.idle_since(deadline)]:
                conn.close_idle()
        self._tick_handle = asyncio.get_running_loop().call_later(self._tick_interval, self._tick)

    def _add(self, conn: _Connection) -> None:
        self._connections.add(conn)

    def _discard(self, conn: _Connection) -> None:
        self._connections.discard(conn)


class _Connection(asyncio.Protocol):
    """One client connection: parses requests and answers them in order."""

    def __init__(self, server: HttpServer) -> None:
        self._server = server
        self._handler = server.handler
        self._max_body = server.max_body_bytes
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        # Parsing state of the current request.
        self._url = b""
        self._headers: dict[str, str] = {}
        self._in_headers = False
        self._body: list[bytes] = []
        self._body_size = 0
        self._too_large = False
        # Requests parsed and waiting for their answer, with their keep-alive flag; an
        # entry that is a Response is an error the server answers itself, then closes.
        self._pending: deque[tuple[Request | Response, bool]] = deque()
        self._task: asyncio.Task[None] | None = None
        self._streaming = False
        self._reading_paused = False
        self._stop_reading = False
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._closed = False
        self._last_activity = time.monotonic()

    # --- asyncio.Protocol ---

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)
        self._server._add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._server._discard(self)
        self._pending.clear()
        waiter, self._drain_waiter = self._drain_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(ConnectionResetError("connection lost"))
        # A streaming body must stop when nobody reads it; a handler still computing
        # its answer is left to finish (it may have side effects worth completing).
        if self._task is not None and self._streaming:
            self._task.cancel()

    def data_received(self, data: bytes) -> None:
        if self._stop_reading:
            return
        self._last_activity = time.monotonic()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # We do not switch protocols: answer the request as plain HTTP/1.1, then
            # close, since what follows on the wire is not HTTP/1.1 any more.
            self._stop_reading = True
            if self._pending:
                request, _ = self._pending[-1]
                self._pending[-1] = (request, False)
                self._maybe_run()
        except httptools.HttpParserError as exc:
            if self._too_large:
                self._reject(413, "request body too large")
            else:
                self._reject(400, f"malformed HTTP request: {exc}")

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        waiter, self._drain_waiter = self._drain_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # --- httptools callbacks ---

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = {}
        self._in_headers = True
        self._body = []
        self._body_size = 0

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._in_headers:
            return  # trailers of a chunked body: not exposed
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        headers = self._headers
        previous = headers.get(key)
        headers[key] = text if previous is None else previous + ", " + text

    def on_headers_complete(self) -> None:
        self._in_headers = False
        declared = self._headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self._max_body:
            self._too_large = True
            raise _BodyTooLarge
        if self._headers.get("expect", "").lower() == "100-continue" and self._transport:
            self._transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self._body_size += len(body)
        if self._body_size > self._max_body:
            self._too_large = True
            raise _BodyTooLarge
        self._body.append(body)

    def on_message_complete(self) -> None:
        url = self._url
        if url[:1] == b"/":
            path, _, query = url.partition(b"#")[0].partition(b"?")
        else:
            try:
                parsed = httptools.parse_url(url)
            except httptools.HttpParserInvalidURLError:
                raise _BadUrl from None
            path, query = parsed.path or b"/", parsed.query or b""
        body = self._body
        request = Request(
            self._parser.get_method().decode("ascii"),
            path.decode("latin-1"),
            query.decode("latin-1"),
            self._headers,
            body[0] if len(body) == 1 else b"".join(body),
        )
        self._pending.append((request, bool(self._parser.should_keep_alive())))
        if len(self._pending) > _MAX_PIPELINED and self._transport and not self._reading_paused:
            self._reading_paused = True
            self._transport.pause_reading()
        self._maybe_run()

    # --- answering ---

    def _reject(self, status: int, message: str) -> None:
        """Answer a request we cannot parse or accept, after those before it; then close."""
        self._stop_reading = True
        self._pending.append((_plain_response(status, message), False))
        self._maybe_run()

    def _maybe_run(self) -> None:
        if self._task is None and self._pending and not self._closed:
            self._task = self._loop.create_task(self._answer_pending())

    async def _answer_pending(self) -> None:
        try:
            while self._pending and not self._closed:
                item, keep_alive = self._pending.popleft()
                if self._reading_paused and len(self._pending) <= _MAX_PIPELINED // 2:
                    self._reading_paused = False
                    if self._transport is not None:
                        self._transport.resume_reading()
                if isinstance(item, Response):
                    # The server's own answer to a request it refused: the client may
                    # still be sending that request, so half-close and let it read this.
                    await self._send(item, False, "GET")
                    self._linger()
                    return
                method = item.method
                try:
                    response = await self._handler(item)
                except Exception:
                    _log.exception("handler failed for %s %s", item.method, item.path)
                    response = _plain_response(500, "internal server error")
                if self._closed:
                    if not isinstance(response.body, bytes | bytearray | memoryview):
                        await _aclose(response.body)
                    return
                keep_alive = await self._send(response, keep_alive, method)
                if not keep_alive:
                    self._close()
                    return
                if self._write_paused:
                    await self._drain()
        finally:
            self._task = None
        self._last_activity = time.monotonic()

    async def _send(self, response: Response, keep_alive: bool, method: str) -> bool:
        """Write one response; returns whether the connection stays open."""
        transport = self._transport
        assert transport is not None
        head: list[str] = []
        for name, value in response.headers:
            lname = name.lower()
            if lname in _FRAMING_HEADERS:
                if lname == "connection" and value.lower() == "close":
                    keep_alive = False
                continue
            if "\n" in value or "\r" in value or "\n" in name or "\r" in name:
                _log.error("dropped response header %r with a line break", name)
                continue
            head.append(f"{name}: {value}\r\n")
        if not keep_alive:
            head.append("connection: close\r\n")
        status = response.status
        status_line = _STATUS_LINES.get(status) or _status_line(status)
        body = response.body
        if isinstance(body, bytes | bytearray | memoryview):
            if status not in _NO_BODY_STATUSES:
                head.append(f"content-length: {len(body)}\r\n\r\n")
            else:
                head.append("\r\n")
                body = b""
            data = status_line + self._server._date + "".join(head).encode("latin-1")
            if method == "HEAD":
                transport.write(data)
            elif len(body) <= _CONCAT_LIMIT:
                transport.write(data + body)
            else:
                transport.write(data)
                transport.write(body)
            return keep_alive
        head.append("transfer-encoding: chunked\r\n\r\n")
        transport.write(status_line + self._server._date + "".join(head).encode("latin-1"))
        if method == "HEAD":
            await _aclose(body)
            return keep_alive
        return await self._stream(body, keep_alive)

    async def _stream(self, body: AsyncIterator[bytes], keep_alive: bool) -> bool:
        transport = self._transport
        assert transport is not None
        self._streaming = True
        try:
            async for chunk in body:
                if self._closed:
                    return False
                if not chunk:
                    continue  # an empty chunk would end the body
                transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
                if self._write_paused:
                    await self._drain()
        except AbortConnection:
            self._close()
            return False
        except (ConnectionError, asyncio.CancelledError):
            # The client went away (connection_lost cancels us or fails the drain).
            if not self._closed:
                raise
            return False
        except Exception:
            # Headers are gone already: all we can do is end the body early.
            _log.exception("streaming response body failed")
            self._close()
            return False
        finally:
            self._streaming = False
            await _aclose(body)
        if self._closed:
            return False
        transport.write(b"0\r\n\r\n")
        return keep_alive

    async def _drain(self) -> None:
        if self._closed:
            raise ConnectionResetError("connection lost")
        if self._drain_waiter is None or self._drain_waiter.done():
            self._drain_waiter = self._loop.create_future()
        await self._drain_waiter

    def _linger(self) -> None:
        # Send FIN after what is buffered; what the client still sends is discarded
        # until it closes (or the idle sweep closes us): closing outright with unread
        # input would reset the connection and could destroy the answer in flight.
        transport = self._transport
        if transport is not None and not self._closed:
            if transport.can_write_eof():
                transport.write_eof()
            else:
                transport.close()

    def _close(self) -> None:
        if self._transport is not None and not self._closed:
            self._transport.close()

    # --- server housekeeping ---

    def idle_since(self, deadline: float) -> bool:
        return self._task is None and not self._pending and self._last_activity < deadline

    def close_idle(self) -> None:
        self._close()

    def abort_for_shutdown(self) -> asyncio.Task[None] | None:
        task = self._task
        if task is not None:
            task.cancel()
        if self._transport is not None and not self._closed:
            self._transport.abort()
        return task


class _BodyTooLarge(Exception):
    pass


class _BadUrl(Exception):
    pass


async def _aclose(body: AsyncIterator[bytes]) -> None:
    aclose = getattr(body, "aclose", None)
    if aclose is None:
        return
    try:
        await aclose()
    except Exception:
        _log.exception("closing a streaming response body failed")

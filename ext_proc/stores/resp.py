"""A lean Redis client for the hot path: one pipelined connection speaking RESP2.

The limits run one Lua call per request. redis-py spends about 47 us of Python per
call under concurrency (connection-pool checkout, command packing, its parser); this
client spends about 9 us, measured on the same machine and script. It does only what
that call needs: commands pipelined on a single connection (Redis answers them in
order, so a FIFO of futures matches replies to callers), replies parsed as RESP2, a
timeout per call, and reconnection. It raises redis-py's exception types, so callers
handle both clients alike. Everything else (pub/sub, the key cache) uses redis-py.

Commands issued in one pass of the event loop (the concurrent requests' limit calls)
leave in one write: on loopback each ``write`` also runs Redis's side of TCP, and a
burst of them cost more than the commands themselves.

A call that times out leaves the connection's replies out of step with its callers, so
the connection is dropped and every call still waiting on it fails; the next call
reconnects.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ssl
from typing import Any, cast
from urllib.parse import parse_qs, unquote, urlsplit

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ext_proc import telemetry
from ext_proc.stores.redis import CONNECT_TIMEOUT, DEFAULT_TIMEOUT

_CRLF = b"\r\n"


class _Incomplete(Exception):
    """The buffer does not hold a whole reply yet."""


def pack(args: tuple[Any, ...]) -> bytes:
    """A command as a RESP array of bulk strings."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, bytes):
            data = arg
        elif isinstance(arg, str):
            data = arg.encode()
        elif isinstance(arg, float):
            data = repr(arg).encode()
        else:
            data = str(arg).encode()
        parts.append(b"$%d\r\n" % len(data))
        parts.append(data)
        parts.append(_CRLF)
    return b"".join(parts)


def parse(buf: bytearray, pos: int) -> tuple[Any, int]:
    """One reply starting at ``pos``: (value, position after it). Errors are returned as
    exception instances (the caller raises them for the command they answer)."""
    end = buf.find(_CRLF, pos)
    if end < 0:
        raise _Incomplete
    kind = buf[pos]
    line = bytes(buf[pos + 1 : end])
    nxt = end + 2
    if kind == 0x2B:  # +
        return line, nxt
    if kind == 0x2D:  # -
        text = line.decode("utf-8", "replace")
        if text.startswith("NOSCRIPT"):
            return NoScriptError(text), nxt
        return ResponseError(text), nxt
    if kind == 0x3A:  # :
        return int(line), nxt
    if kind == 0x24:  # $
        size = int(line)
        if size < 0:
            return None, nxt
        if len(buf) < nxt + size + 2:
            raise _Incomplete
        return bytes(buf[nxt : nxt + size]), nxt + size + 2
    if kind == 0x2A:  # *
        count = int(line)
        if count < 0:
            return None, nxt
        items = []
        for _ in range(count):
            item, nxt = parse(buf, nxt)
            items.append(item)
        return items, nxt
    raise RedisConnectionError(f"unexpected reply from Redis: {bytes(buf[pos:end])!r}")


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiting: collections.deque[asyncio.Future[Any]] = collections.deque()
        self.lost = False
        self._unsent: list[bytes] = []
        self.loop = asyncio.get_running_loop()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def send(self, command: bytes) -> None:
        """Queue a packed command: what one loop pass queues is written at its end."""
        unsent = self._unsent
        if not unsent:
            self.loop.call_soon(self._flush)
        unsent.append(command)

    def _flush(self) -> None:
        unsent = self._unsent
        if not unsent:
            return
        self._unsent = []
        if self.lost or self.transport is None:
            return  # fail() has failed their callers already
        self.transport.write(unsent[0] if len(unsent) == 1 else b"".join(unsent))

    def data_received(self, data: bytes) -> None:
        buf = self.buffer
        buf += data
        pos = 0
        while self.waiting and pos < len(buf):
            try:
                value, pos_after = parse(buf, pos)
            except _Incomplete:
                break
            except RedisConnectionError as exc:
                self.fail(exc)
                return
            pos = pos_after
            future = self.waiting.popleft()
            if future.done():  # its caller gave up; the connection is being dropped
                continue
            if isinstance(value, Exception):
                future.set_exception(value)
            else:
                future.set_result(value)
        if pos:
            del buf[:pos]

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.fail(RedisConnectionError(f"Redis connection lost: {exc or 'closed'}"))

    def fail(self, exc: Exception) -> None:
        self.lost = True
        self._unsent.clear()
        while self.waiting:
            future = self.waiting.popleft()
            if not future.done():
                future.set_exception(exc)
        if self.transport is not None:
            self.transport.close()


class RespClient:
    """``execute_command`` / ``script_load`` over one pipelined connection."""

    def __init__(
        self,
        url: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        connect_timeout: float = CONNECT_TIMEOUT,
    ) -> None:
        self._url = url
        self._timeout = timeout
        self._connect_timeout = connect_timeout
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Lock | None = None
        self._closed = False

    async def execute_command(self, *args: Any) -> Any:
        tracer = telemetry.TRACER
        if tracer is not None:  # traced like the redis-py calls (db.system redis)
            from opentelemetry.trace import SpanKind

            with tracer.start_as_current_span(str(args[0]), kind=SpanKind.CLIENT) as span:
                span.set_attributes({"db.system": "redis", "db.operation.name": str(args[0])})
                return await self._execute(*args)
        return await self._execute(*args)

    async def _execute(self, *args: Any) -> Any:
        protocol = self._protocol
        if protocol is None or protocol.lost:
            protocol = await self._connect()
        loop = protocol.loop  # (asyncio.get_running_loop costs a getpid() call on 3.11)
        future: asyncio.Future[Any] = loop.create_future()
        protocol.waiting.append(future)
        protocol.send(pack(args))
        # A bare timer, not asyncio.wait_for (which wraps the future in more machinery
        # than a hot-path call should pay for).
        timer = loop.call_later(self._timeout, _expire, future, protocol, self._timeout)
        try:
            return await future
        finally:
            timer.cancel()

    async def script_load(self, source: str) -> str:
        sha = await self.execute_command("SCRIPT", "LOAD", source)
        return sha.decode() if isinstance(sha, bytes) else str(sha)

    async def aclose(self) -> None:
        self._closed = True
        if self._protocol is not None and self._protocol.transport is not None:
            self._protocol.transport.close()
        self._protocol = None

    async def _connect(self) -> _Protocol:
        if self._closed:
            raise RedisConnectionError("the Redis client is closed")
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._protocol is not None and not self._protocol.lost:
                return self._protocol
            try:
                protocol = await asyncio.wait_for(self._open(), self._connect_timeout)
            except TimeoutError:
                raise RedisTimeoutError(
                    f"cannot connect to Redis within {self._connect_timeout}s"
                ) from None
            except OSError as exc:
                raise RedisConnectionError(f"cannot connect to Redis: {exc}") from exc
            self._protocol = protocol
            return protocol

    async def _open(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        parts = urlsplit(self._url)
        query = parse_qs(parts.query)
        db = int(query.get("db", ["0"])[0])
        if parts.scheme == "unix":
            _, protocol = await loop.create_unix_connection(_Protocol, parts.path)
        elif parts.scheme in ("redis", "rediss"):
            tls = ssl.create_default_context() if parts.scheme == "rediss" else None
            _, protocol = await loop.create_connection(
                _Protocol, parts.hostname or "127.0.0.1", parts.port or 6379, ssl=tls
            )
            path = parts.path.strip("/")
            if path:
                db = int(path)
        else:
            raise RedisConnectionError(f"unsupported Redis URL scheme {parts.scheme!r}")
        self._protocol = protocol
        try:
            if parts.password is not None:
                auth = (
                    (unquote(parts.username), unquote(parts.password))
                    if parts.username
                    else (unquote(parts.password),)
                )
                await self._call(protocol, "AUTH", *auth)
            if db:
                await self._call(protocol, "SELECT", db)
        except BaseException:
            protocol.fail(RedisConnectionError("Redis handshake failed"))
            raise
        return protocol

    async def _call(self, protocol: _Protocol, *args: Any) -> Any:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        protocol.waiting.append(future)
        protocol.send(pack(args))
        return await future


def _expire(future: asyncio.Future[Any], protocol: _Protocol, timeout: float) -> None:
    if future.done():
        return
    future.set_exception(RedisTimeoutError(f"Redis did not answer within {timeout}s"))
    # The reply may still come, for the next caller's future: drop the connection.
    protocol.fail(RedisConnectionError("Redis connection dropped after a timeout"))


async def close_quietly(client: RespClient | None) -> None:
    if client is not None:
        with contextlib.suppress(Exception):
            await client.aclose()

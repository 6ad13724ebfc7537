"""A TCP forwarder of the tests' own, in front of the shared Postgres (or Redis), to cut
and freeze a dependency without touching the real server (which must never be stopped
or frozen: everything else on the machine uses it).

It runs its own event loop in a thread, so it keeps forwarding while the test's loop
is busy (or blocked in a synchronous call), and the ext_proc processes of an
end-to-end stack reach it like any server.

- ``cut()``: the listener closes and every connection is reset: connections are
  refused, as when the server is stopped. ``restore()`` listens again on the same port.
- ``freeze()``: connections are accepted and held, nothing is forwarded either way
  (bytes sent meanwhile wait in buffers), as when the server hangs. ``thaw()`` lets
  everything through again, held connections included.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

T = TypeVar("T")


def with_address(url: str, host: str, port: int) -> str:
    """``url`` (postgresql:// or redis://) pointing at ``host:port`` instead."""
    parts = urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = f"{userinfo}@{host}:{port}" if userinfo else f"{host}:{port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


class TcpProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self.connections = 0  # accepted so far
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._transports: set[asyncio.Transport] = set()
        self._flowing: asyncio.Event | None = None

    @classmethod
    def for_url(cls, url: str) -> TcpProxy:
        parts = urlsplit(url)
        return cls(parts.hostname or "127.0.0.1", parts.port or 5432)

    def url(self, url: str) -> str:
        """``url`` through this proxy."""
        return with_address(url, "127.0.0.1", self.port)

    # ------------------------------------------------------------ controls

    def start(self) -> None:
        self._thread.start()
        self._call(self._init())
        self.restore()

    def cut(self) -> None:
        self._call(self._cut())

    def restore(self) -> None:
        self._call(self._listen())

    def freeze(self) -> None:
        self._loop.call_soon_threadsafe(self._stop_flow)

    def thaw(self) -> None:
        self._loop.call_soon_threadsafe(self._start_flow)

    def close(self) -> None:
        if not self._thread.is_alive():
            return
        self.thaw()
        with contextlib.suppress(Exception):
            self._call(self._cut())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    # ---------------------------------------------------------- internals

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=30)

    async def _init(self) -> None:
        self._flowing = asyncio.Event()
        self._flowing.set()

    def _stop_flow(self) -> None:
        assert self._flowing is not None
        self._flowing.clear()

    def _start_flow(self) -> None:
        assert self._flowing is not None
        self._flowing.set()

    async def _listen(self) -> None:
        if self._server is None:
            self._server = await asyncio.start_server(
                self._handle, "127.0.0.1", self.port, reuse_address=True
            )
            self.port = self._server.sockets[0].getsockname()[1]

    async def _cut(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for transport in list(self._transports):
            transport.abort()
        self._transports.clear()
        if server is not None:
            await server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        transport = writer.transport
        self._transports.add(transport)  # type: ignore[arg-type]
        flowing = self._flowing
        assert flowing is not None
        try:
            await flowing.wait()  # frozen: accepted, held, not connected upstream
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            transport.abort()
            self._transports.discard(transport)  # type: ignore[arg-type]
            return
        self._transports.add(up_writer.transport)  # type: ignore[arg-type]
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        self._transports.discard(transport)  # type: ignore[arg-type]
        self._transports.discard(up_writer.transport)  # type: ignore[arg-type]

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        flowing = self._flowing
        assert flowing is not None
        try:
            while data := await src.read(65536):
                await flowing.wait()
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            dst.transport.abort()

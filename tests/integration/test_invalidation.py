"""Invalidation across replicas through Redis pub/sub: a revocation seen by another OS
process within a second, every listener dropping entries, and a listener that lost
Redis dropping everything when it reconnects."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import textwrap
import time
from urllib.parse import urlsplit

import asyncpg
import pytest
import redis.asyncio as aioredis

from ext_proc.auth.keys import hash_key
from ext_proc.auth.store import create_key
from ext_proc.stores.cache import TieredCache, invalidate_shared
from ext_proc.stores.invalidation import InvalidationListener, publish
from tests.conftest import poll_async
from tests.integration.conftest import Cli

pytestmark = pytest.mark.integration

GATEWAY = """\
providers:
  mock: {type: openai, base_url: "http://127.0.0.1:8001"}
applications:
  support-bot: {org: acme}
"""

# A second replica: its own key cache and listener. It reports "ready <status>" once
# the key is cached, then looks the key up as a request stream would (every 5 ms, from
# memory while nothing changes) and reports "flipped <status> <loads>" when it changes.
REPLICA = textwrap.dedent(
    """
    import asyncio, sys, time
    from datetime import UTC, datetime

    from ext_proc.auth.store import key_cache
    from ext_proc.stores.invalidation import InvalidationListener
    from ext_proc.stores.postgres import create_pool
    from ext_proc.stores.redis import create_redis

    async def main() -> None:
        database_url, redis_url, prefix, key_hash = sys.argv[1:5]
        pool = await create_pool(database_url)
        redis = create_redis(redis_url)
        cache = key_cache(pool, redis=redis, prefix=prefix, ttl=300)  # only invalidation helps
        listener = InvalidationListener(redis_url, prefix)
        listener.subscribe("key", cache.invalidate)
        await listener.start()
        try:
            if not await listener.wait_connected(10):
                print("error: the listener did not connect", flush=True)
                return
            first = (await cache.get(key_hash)).status(datetime.now(UTC))
            print("ready", first, flush=True)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                status = (await cache.get(key_hash)).status(datetime.now(UTC))
                if status != first:
                    print("flipped", status, cache.stats().loads, time.time(), flush=True)
                    return
                await asyncio.sleep(0.005)
            print("timeout", flush=True)
        finally:
            await listener.close()
            await redis.aclose()
            await pool.close()

    asyncio.run(main())
    """
)


@pytest.fixture
def gateway_yaml() -> str:
    """What the shared ``pool`` fixture applies."""
    return GATEWAY


async def read_line(stream: asyncio.StreamReader, timeout: float) -> str:
    return (await asyncio.wait_for(stream.readline(), timeout)).decode().strip()


async def test_a_revoked_key_is_dropped_by_another_process_within_a_second(
    pool: asyncpg.Pool,
    cli: Cli,
    migrated_url: str,
    redis_url: str,
    redis_prefix: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    new = await create_key(pool, "support-bot")
    replica = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        REPLICA,
        migrated_url,
        redis_url,
        redis_prefix,
        hash_key(new.key),
        stdout=asyncio.subprocess.PIPE,
    )
    assert replica.stdout is not None
    try:
        assert await read_line(replica.stdout, 30) == "ready active"
        started = time.monotonic()
        code, _, err = await cli("keys", "revoke", new.info.key_id)
        revoked = time.monotonic()
        assert code == 0, err
        line = await read_line(replica.stdout, 10)
        seen = time.monotonic()
    finally:
        with contextlib.suppress(ProcessLookupError):
            replica.kill()
        await replica.wait()
    word, status, loads, _ = line.split()
    assert (word, status) == ("flipped", "revoked")
    assert loads == "2"  # the first load, then one after the invalidation: memory served between
    command, propagation = revoked - started, seen - revoked
    with capsys.disabled():
        print(
            f"\nrevocation seen by the other process {1000 * (seen - started):.0f} ms after "
            f"`keys revoke` started ({1000 * command:.0f} ms command, "
            f"{1000 * propagation:.0f} ms from its return to the replica's report)"
        )
    assert seen - started < 1.0


async def test_every_listener_drops_the_entry_within_a_second(
    redis: aioredis.Redis, redis_url: str, redis_prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    heard: list[list[str]] = [[], []]
    listeners = [InvalidationListener(redis_url, redis_prefix) for _ in heard]
    for listener, sink in zip(listeners, heard, strict=True):
        listener.subscribe("key", sink.append)
        await listener.start()
    try:
        for listener in listeners:
            assert await listener.wait_connected(10)
        assert heard == [["*"], ["*"]]  # connecting drops everything
        started = time.monotonic()
        await invalidate_shared(redis, redis_prefix, "keys", "key", "abc123")
        assert await poll_async(
            lambda: all("abc123" in sink for sink in heard), timeout=1.0, interval=0.005
        )
        elapsed = time.monotonic() - started
        with capsys.disabled():
            print(f"\nboth listeners dropped the entry {1000 * elapsed:.1f} ms after the publish")
        assert elapsed < 1.0
        assert heard == [["*", "abc123"], ["*", "abc123"]]
    finally:
        for listener in listeners:
            await listener.close()


async def test_bad_messages_and_failing_callbacks_do_not_stop_the_listener(
    redis: aioredis.Redis, redis_url: str, redis_prefix: str
) -> None:
    heard: list[str] = []
    calls: list[str] = []

    def broken(id: str) -> None:
        calls.append(id)
        raise RuntimeError("subscriber bug")

    async def later(id: str) -> None:
        heard.append(f"async:{id}")

    listener = InvalidationListener(redis_url, redis_prefix)
    listener.subscribe("config", broken)
    listener.subscribe("config", heard.append)
    listener.subscribe("config", later)
    await listener.start()
    try:
        assert await listener.wait_connected(10)
        await redis.publish(f"{redis_prefix}invalidate", "no-separator")
        await redis.publish(f"{redis_prefix}invalidate", "other:1")
        await publish(redis, redis_prefix, "config", "*")
        assert await poll_async(lambda: heard.count("*") == 2, timeout=5, interval=0.005)
        assert heard == ["*", "async:*", "*", "async:*"]
        assert calls == ["*", "*"] and listener.connected
        with pytest.raises(ValueError, match="invalid invalidation kind"):
            await publish(redis, redis_prefix, "a:b", "x")
    finally:
        await listener.close()
    assert not listener.connected


class Proxy:
    """A TCP proxy to Redis that can be cut (connections closed, port refusing) and
    restored, so a listener loses its Redis without touching the shared server."""

    def __init__(self, redis_url: str) -> None:
        parts = urlsplit(redis_url)
        self._unix = parts.path if parts.scheme == "unix" else None
        self._host, self._port = parts.hostname or "127.0.0.1", parts.port or 6379
        self._db = parts.path.lstrip("/") if parts.scheme != "unix" else "0"
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/{self._db or '0'}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        self._writers.clear()
        await self._server.wait_closed()
        self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._unix is not None:
            up_reader, up_writer = await asyncio.open_unix_connection(self._unix)
        else:
            up_reader, up_writer = await asyncio.open_connection(self._host, self._port)
        self._writers.update((writer, up_writer))
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass  # the other side went away: close ours below
        finally:
            writer.close()
            self._writers.discard(writer)


async def test_a_listener_that_lost_redis_drops_everything_when_it_reconnects(
    redis: aioredis.Redis, redis_url: str, redis_prefix: str
) -> None:
    proxy = Proxy(redis_url)
    await proxy.start()
    loads: list[str] = []

    async def load(id: str) -> str | None:
        loads.append(id)
        return id.upper()

    class Codec:
        def encode(self, value: str) -> bytes:
            return value.encode()

        def decode(self, data: bytes) -> str:
            return data.decode()

    cache: TieredCache[str] = TieredCache("things", load, codec=Codec(), ttl=300)
    calls: list[str] = []
    listener = InvalidationListener(proxy.url, redis_prefix)
    listener.subscribe("thing", cache.invalidate)
    listener.subscribe("thing", calls.append)
    await listener.start()
    try:
        assert await listener.wait_connected(10)
        assert calls == ["*"]
        assert await cache.get("a") == "A"
        assert await cache.get("a") == "A"
        assert loads == ["a"]

        await proxy.cut()
        assert await poll_async(lambda: not listener.connected, timeout=15, interval=0.005)
        # Missed: sent while this listener is away.
        await publish(redis, redis_prefix, "thing", "a")
        assert await cache.get("a") == "A" and loads == ["a"]  # still the old entry

        await proxy.start()
        assert await poll_async(
            lambda: listener.connected and listener.connections == 2, timeout=15, interval=0.005
        )
        assert calls == ["*", "*"]  # reconnecting dropped everything
        assert await cache.get("a") == "A"
        assert loads == ["a", "a"]
        await publish(redis, redis_prefix, "thing", "b")
        assert await poll_async(lambda: calls == ["*", "*", "b"], timeout=5, interval=0.005)
    finally:
        await listener.close()
        with contextlib.suppress(AssertionError):
            await proxy.cut()

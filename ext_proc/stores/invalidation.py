"""Cache invalidation across replicas: Redis pub/sub and Postgres LISTEN/NOTIFY.

A message is ``"kind:id"``: ``key:<sha256 of the key>`` after a key is revoked, rotated
or deleted, ``key:*`` when every cached key must go (an application's org changed),
``config:*`` after ``ext-proc apply`` changed the catalog.

Two channels carry them, so a change reaches every replica within about a second while
either Redis or Postgres is up:

- Redis pub/sub on ``{prefix}invalidate``: whoever changes Postgres publishes after the
  commit (``publish``); every replica runs one ``InvalidationListener``.
- Postgres ``NOTIFY ext_proc_invalidate`` (``POSTGRES_CHANNEL``), sent by triggers in
  the same transaction as the change (schema/0005_key_notify.sql), so a revocation made
  while Redis is down, or by plain SQL, is heard too; every replica runs one
  ``PostgresInvalidationListener`` on a connection of its own.

Both are fire-and-forget: a replica that is not connected when a message is sent never
sees it. So on every (re)connect a listener calls every callback with ``"*"`` (it may
have missed messages), and the caches' TTLs bound how long a replica that can reach
neither channel keeps a stale entry. A dead connection is noticed by pinging it (Redis:
after 5 s of silence, given up after 12 s; Postgres: ``SELECT 1`` every 5 s with a 2 s
timeout).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import random
import time
from collections.abc import Awaitable, Callable

import asyncpg
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from ext_proc.metrics import Metrics

log = logging.getLogger(__name__)

ALL = "*"
# A callback gets the id ("*" for everything); it may be a coroutine function.
Callback = Callable[[str], Awaitable[None] | None]

_CONNECT_TIMEOUT = 1.0
_COMMAND_TIMEOUT = 2.0
_POLL = 1.0  # longest wait for a message before checking liveness / close
_PING_EVERY = 5.0  # a silent connection is pinged this often ...
_DEAD_AFTER = 12.0  # ... and given up after this long without any reply
_BACKOFF_FIRST = 0.05
_BACKOFF_MAX = 5.0

# The Postgres channel the schema's triggers NOTIFY on (one per database).
POSTGRES_CHANNEL = "ext_proc_invalidate"
_PG_CONNECT_TIMEOUT = 2.0
_PG_PING_EVERY = 5.0
_PG_PING_TIMEOUT = 2.0
_PG_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
)
_KNOWN_KINDS = frozenset({"key", "config"})  # metric labels; anything else is "other"


def channel(prefix: str) -> str:
    return f"{prefix}invalidate"


async def publish(redis: aioredis.Redis, prefix: str, kind: str, id: str) -> int:
    """Send ``kind:id`` to every listening replica; returns how many received it."""
    if not kind or ":" in kind:
        raise ValueError(f"invalid invalidation kind {kind!r}")
    receivers: int = await redis.publish(channel(prefix), f"{kind}:{id}")
    return receivers


class _Listener:
    """What both listeners share: callbacks per kind, the connected flag, dispatch."""

    channel_name = ""  # the metric label: "redis" or "postgres"

    def __init__(self, metrics: Metrics | None) -> None:
        self._callbacks: dict[str, list[Callback]] = {}
        self._task: asyncio.Task[None] | None = None
        self._closing = asyncio.Event()
        self._connected = asyncio.Event()
        self._metrics = metrics
        self.connections = 0  # successful (re)subscriptions so far

    def subscribe(self, kind: str, callback: Callback) -> None:
        """Call ``callback(id)`` for every ``kind:id`` message, and with "*" on connect."""
        self._callbacks.setdefault(kind, []).append(callback)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def wait_connected(self, timeout: float) -> bool:
        """True once subscribed (within ``timeout`` seconds), else False."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._connected.wait(), timeout)
        return self._connected.is_set()

    async def start(self) -> None:
        if self._task is None:
            self._closing.clear()
            self._task = asyncio.create_task(
                self._run(), name=f"invalidation-listener-{self.channel_name}"
            )

    async def close(self) -> None:
        self._closing.set()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._set_connected(False)

    async def _run(self) -> None:
        raise NotImplementedError

    def _set_connected(self, up: bool) -> None:
        if up:
            self._connected.set()
        else:
            self._connected.clear()
        if self._metrics is not None:
            self._metrics.invalidation_listener_up.labels(self.channel_name).set(1 if up else 0)

    async def _on_connect(self) -> None:
        self.connections += 1
        for kind in list(self._callbacks):
            await self._dispatch(kind, ALL)
        self._set_connected(True)

    async def _backoff(self, backoff: float) -> float:
        """Wait ``backoff`` (jittered: replicas spread out) unless closing; the next one."""
        delay = backoff * (0.5 + random.random() / 2)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closing.wait(), delay)
        return min(backoff * 2, _BACKOFF_MAX)

    async def _handle(self, data: bytes | str) -> None:
        text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
        kind, sep, id = text.partition(":")
        if not sep or not id:
            log.warning("invalidation listener: ignoring malformed message %r", text[:200])
            return
        if self._metrics is not None:
            label = kind if kind in _KNOWN_KINDS else "other"
            self._metrics.invalidations_received.labels(self.channel_name, label).inc()
        await self._dispatch(kind, id)

    async def _dispatch(self, kind: str, id: str) -> None:
        for callback in self._callbacks.get(kind, ()):
            try:
                result = callback(id)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                # One broken subscriber must not stop the others nor the listener.
                log.exception("invalidation callback for %s:%s failed", kind, id)


class InvalidationListener(_Listener):
    """Subscribes to ``{prefix}invalidate`` and calls back per kind.

    ``subscribe`` the callbacks, then ``await start()``; ``await close()`` at shutdown.
    Runs as one background task with its own connection (pub/sub needs a dedicated
    one); while Redis is unreachable it retries with capped exponential backoff.
    """

    channel_name = "redis"

    def __init__(self, redis_url: str, prefix: str, *, metrics: Metrics | None = None) -> None:
        super().__init__(metrics)
        self._url = redis_url
        self._channel = channel(prefix)

    # --- the background task --------------------------------------------------------

    async def _run(self) -> None:
        backoff = _BACKOFF_FIRST
        failing = False
        while not self._closing.is_set():
            client = aioredis.from_url(
                self._url,
                socket_connect_timeout=_CONNECT_TIMEOUT,
                socket_timeout=_COMMAND_TIMEOUT,
                # No silent reconnects inside redis-py: a reconnect must be seen here,
                # because messages sent while disconnected are lost (see on_connect).
                retry=Retry(NoBackoff(), 0),
                client_name="ext-proc-invalidation",
            )
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self._channel)
                if failing:
                    log.info("invalidation listener: Redis is back; revalidating cached entries")
                failing, backoff = False, _BACKOFF_FIRST
                await self._on_connect()
                await self._listen(pubsub)
            except (RedisError, OSError, TimeoutError) as exc:
                if not failing:  # once per outage, not once per retry
                    log.warning(
                        "invalidation listener: Redis unavailable (%s: %s); retrying with "
                        "backoff, caches rely on their TTLs meanwhile",
                        type(exc).__name__,
                        exc,
                    )
                failing = True
            finally:
                self._set_connected(False)
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
                with contextlib.suppress(Exception):
                    await client.aclose()
            if self._closing.is_set():
                break
            backoff = await self._backoff(backoff)

    async def _listen(self, pubsub: aioredis.client.PubSub) -> None:
        last_heard = time.monotonic()
        pinged = False
        while not self._closing.is_set():
            message = await pubsub.get_message(timeout=_POLL)
            now = time.monotonic()
            if message is not None:
                last_heard, pinged = now, False
                if message.get("type") == "message":
                    await self._handle(message["data"])
                continue
            silent = now - last_heard
            if silent > _DEAD_AFTER:
                raise TimeoutError(f"no reply from Redis for {silent:.0f}s")
            if silent > _PING_EVERY and not pinged:
                await pubsub.ping()  # the pong arrives as a message
                pinged = True


class PostgresInvalidationListener(_Listener):
    """LISTENs on ``POSTGRES_CHANNEL`` and calls back per kind, like the Redis one.

    One asyncpg connection of its own (not pooled: a pooled connection would lose its
    LISTEN when released), pinged every few seconds so a hung or cut server is noticed;
    while Postgres is unreachable it retries with capped exponential backoff.
    """

    channel_name = "postgres"

    def __init__(
        self,
        database_url: str,
        *,
        channel: str = POSTGRES_CHANNEL,
        metrics: Metrics | None = None,
        ping_every: float = _PG_PING_EVERY,
        ping_timeout: float = _PG_PING_TIMEOUT,
    ) -> None:
        super().__init__(metrics)
        self._url = database_url
        self._channel = channel
        self._ping_every = ping_every
        self._ping_timeout = ping_timeout

    async def _run(self) -> None:
        backoff = _BACKOFF_FIRST
        failing = False
        while not self._closing.is_set():
            conn: asyncpg.Connection | None = None
            try:
                conn = await asyncpg.connect(
                    self._url,
                    timeout=_PG_CONNECT_TIMEOUT,
                    command_timeout=self._ping_timeout,
                    server_settings={"application_name": "ext-proc invalidation"},
                )
                messages: asyncio.Queue[str] = asyncio.Queue()
                await conn.add_listener(self._channel, _enqueue_to(messages))
                if failing:
                    log.info("invalidation listener: Postgres is back; revalidating entries")
                failing, backoff = False, _BACKOFF_FIRST
                await self._on_connect()
                await self._listen(conn, messages)
            except _PG_ERRORS as exc:
                if not failing:  # once per outage, not once per retry
                    log.warning(
                        "invalidation listener: Postgres LISTEN unavailable (%s: %s); "
                        "retrying with backoff",
                        type(exc).__name__,
                        exc,
                    )
                failing = True
            finally:
                self._set_connected(False)
                if conn is not None:
                    conn.terminate()  # not close(): it would wait on a hung server
            if self._closing.is_set():
                break
            backoff = await self._backoff(backoff)

    async def _listen(self, conn: asyncpg.Connection, messages: asyncio.Queue[str]) -> None:
        last_ping = time.monotonic()
        while not self._closing.is_set():
            try:
                payload = await asyncio.wait_for(messages.get(), _POLL / 2)
            except TimeoutError:
                payload = None
            if payload is not None:
                await self._handle(payload)
                continue
            if conn.is_closed():
                raise ConnectionError("the LISTEN connection was closed")
            if time.monotonic() - last_ping >= self._ping_every:
                await conn.fetchval("SELECT 1", timeout=self._ping_timeout)
                last_ping = time.monotonic()


def _enqueue_to(queue: asyncio.Queue[str]) -> Callable[[object, int, str, object], None]:
    """An asyncpg notification callback putting each payload on ``queue``."""

    def heard(_conn: object, _pid: int, _channel: str, payload: object) -> None:
        queue.put_nowait(str(payload))

    return heard

"""Cache invalidation across replicas: Redis pub/sub on ``{prefix}invalidate``.

A message is ``"kind:id"``: ``key:<sha256 of the key>`` after a key is revoked or
rotated, ``key:*`` when every cached key must go (an application's org changed),
``config:*`` after ``ext-proc apply`` changed the catalog. Whoever changes Postgres
publishes after the commit (``publish``); every replica runs one
``InvalidationListener`` that calls the callbacks subscribed to that kind.

Pub/sub is fire-and-forget: a replica that is not connected when a message is sent
never sees it. So on every (re)connect the listener calls every callback with ``"*"``
(drop everything: it may have missed messages), and the caches' TTLs bound how long a
replica that cannot reach Redis at all keeps a stale entry.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import random
import time
from collections.abc import Awaitable, Callable

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

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


def channel(prefix: str) -> str:
    return f"{prefix}invalidate"


async def publish(redis: aioredis.Redis, prefix: str, kind: str, id: str) -> int:
    """Send ``kind:id`` to every listening replica; returns how many received it."""
    if not kind or ":" in kind:
        raise ValueError(f"invalid invalidation kind {kind!r}")
    receivers: int = await redis.publish(channel(prefix), f"{kind}:{id}")
    return receivers


class InvalidationListener:
    """Subscribes to ``{prefix}invalidate`` and calls back per kind.

    ``subscribe`` the callbacks, then ``await start()``; ``await close()`` at shutdown.
    Runs as one background task with its own connection (pub/sub needs a dedicated
    one); while Redis is unreachable it retries with capped exponential backoff.
    """

    def __init__(self, redis_url: str, prefix: str) -> None:
        self._url = redis_url
        self._channel = channel(prefix)
        self._callbacks: dict[str, list[Callback]] = {}
        self._task: asyncio.Task[None] | None = None
        self._closing = asyncio.Event()
        self._connected = asyncio.Event()
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
            self._task = asyncio.create_task(self._run(), name="invalidation-listener")

    async def close(self) -> None:
        self._closing.set()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._connected.clear()

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
                self.connections += 1
                if failing:
                    log.info("invalidation listener: Redis is back; dropping cached entries")
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
                self._connected.clear()
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
                with contextlib.suppress(Exception):
                    await client.aclose()
            if self._closing.is_set():
                break
            delay = backoff * (0.5 + random.random() / 2)  # jitter: replicas spread out
            backoff = min(backoff * 2, _BACKOFF_MAX)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), delay)

    async def _on_connect(self) -> None:
        for kind in list(self._callbacks):
            await self._dispatch(kind, ALL)
        self._connected.set()

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

    async def _handle(self, data: bytes | str) -> None:
        text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
        kind, sep, id = text.partition(":")
        if not sep or not id:
            log.warning("invalidation listener: ignoring malformed message %r", text[:200])
            return
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

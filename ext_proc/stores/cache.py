"""The memory → Redis → Postgres read-through cache (API keys, and other lookups).

``TieredCache[V].get(id)`` answers from, in order:

1. memory: a bounded LRU with a TTL per entry, private to the process;
2. Redis: ``{prefix}cache:{name}:{id}``, shared by every replica, with a TTL;
3. the loader: an async callable (a Postgres query) returning the value or None.

"Not found" (the loader returned None) is cached too, for a shorter TTL in both tiers,
so a flood of bad keys costs Postgres one query per key per replica per ``negative_ttl``.
Concurrent misses for the same id share one load (single flight).

Redis is optional: a Redis error, or an open ``Breaker``, skips that tier (logged once
per outage, counted in ``redis_errors`` and ``dependency_up{dependency="redis"}``); a
lookup never fails because of Redis. It fails (``CacheUnavailable``) only when the
value is in neither cache and the loader raised.

What invalidates an entry: its TTL; ``invalidate(id)`` (this process's memory, called
by the ``InvalidationListener`` for messages of this cache's kind, with "*" on every
reconnect); ``invalidate_everywhere(id)`` / ``invalidate_shared(...)`` after a change in
Postgres: it replaces the Redis entry with a short-lived tombstone and publishes
``kind:id``. Writes to Redis are ``SET NX``, so a load that read Postgres just before
the change cannot put the stale value back over the tombstone, and a load that spans an
invalidation does not store its result in memory.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from ext_proc.metrics import Metrics
from ext_proc.stores.invalidation import ALL, publish
from ext_proc.stores.redis import Breaker

log = logging.getLogger(__name__)

V = TypeVar("V")

DEFAULT_MAX_ENTRIES = 10_000
DEFAULT_TTL = 60.0
DEFAULT_NEGATIVE_TTL = 5.0
# Longer than any load that may have read Postgres before the change (statement timeouts
# are 30 s), so such a load cannot write the old value back to Redis.
TOMBSTONE_TTL = 35.0

# Redis values: a one-byte tag, then the codec's bytes for a found value.
_FOUND = b"v"
_NOT_FOUND = b"n"
_TOMBSTONE = b"x"


class Codec(Protocol[V]):
    """How a cached value is stored in Redis (e.g. orjson of a dataclass)."""

    def encode(self, value: V) -> bytes: ...

    def decode(self, data: bytes) -> V: ...


class CacheUnavailable(Exception):
    """The value is in no cache and the loader failed (``__cause__`` says how)."""


@dataclass(frozen=True, slots=True)
class CacheStats:
    entries: int
    redis_errors: int
    loads: int  # loader calls


def redis_key(prefix: str, name: str, id: str) -> str:
    return f"{prefix}cache:{name}:{id}"


async def invalidate_shared(
    redis: aioredis.Redis,
    prefix: str,
    name: str,
    kind: str,
    id: str,
    *,
    tombstone_ttl: float = TOMBSTONE_TTL,
) -> None:
    """After a change in Postgres: drop ``id`` from cache ``name`` in Redis and in every
    replica's memory (publishes ``kind:id``). ``id == "*"`` drops every entry.

    For one id the Redis entry becomes a tombstone rather than being deleted: replicas
    treat it as absent, and their ``SET NX`` cannot overwrite it with a value loaded
    before the change. Raises Redis errors: the caller decides how to report them.
    """
    if id == ALL:
        keys = [key async for key in redis.scan_iter(match=redis_key(prefix, name, "*"))]
        if keys:
            await redis.delete(*keys)
    else:
        await redis.set(redis_key(prefix, name, id), _TOMBSTONE, px=int(tombstone_ttl * 1000))
    await publish(redis, prefix, kind, id)


class TieredCache(Generic[V]):
    """memory → Redis → loader, for values of type ``V`` looked up by a string id."""

    def __init__(
        self,
        name: str,
        loader: Callable[[str], Awaitable[V | None]],
        *,
        codec: Codec[V],
        redis: aioredis.Redis | None = None,
        prefix: str = "gw:",
        kind: str | None = None,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        ttl: float = DEFAULT_TTL,
        negative_ttl: float = DEFAULT_NEGATIVE_TTL,
        redis_ttl: float | None = None,
        breaker: Breaker | None = None,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``name`` labels the metric and the Redis keys; ``kind`` is the invalidation
        kind (default: ``name``); ``redis_ttl`` defaults to ``ttl``."""
        if max_entries < 1 or ttl <= 0 or negative_ttl <= 0:
            raise ValueError("max_entries, ttl and negative_ttl must be positive")
        self.name = name
        self.kind = kind or name
        self._loader = loader
        self._codec = codec
        self._redis = redis
        self._prefix = prefix
        self._max_entries = max_entries
        self._ttl = ttl
        self._negative_ttl = negative_ttl
        self._redis_ttl_ms = int((redis_ttl if redis_ttl is not None else ttl) * 1000)
        self._negative_ttl_ms = int(negative_ttl * 1000)
        self._breaker = breaker
        self._clock = clock
        # id -> (monotonic expiry, value or None for "not found"); most recent last.
        self._memory: OrderedDict[str, tuple[float, V | None]] = OrderedDict()
        self._inflight: dict[str, asyncio.Task[tuple[V | None, str]]] = {}
        # Bumped by every invalidation: a load that saw another generation start does
        # not store its (possibly stale) result.
        self._generation = 0
        self._redis_failing = False
        self._redis_errors = 0
        self._loads = 0
        self._metrics = metrics
        self._count = (
            {
                tier: metrics.cache_lookups.labels(cache=name, tier=tier)
                for tier in ("memory", "redis", "postgres", "miss")
            }
            if metrics is not None
            else None
        )

    # --- lookups --------------------------------------------------------------------

    async def get(self, id: str) -> V | None:
        """The value for ``id``, or None when the loader does not know it."""
        entry = self._memory.get(id)
        if entry is not None:
            if entry[0] > self._clock():
                self._memory.move_to_end(id)
                if self._count is not None:
                    self._count["memory"].inc()
                return entry[1]
            del self._memory[id]
        task = self._inflight.get(id)
        if task is None:
            task = asyncio.create_task(self._load(id))
            self._inflight[id] = task
            task.add_done_callback(lambda done: self._forget(id, done))
        # Shielded: a caller that gives up (client gone) does not cancel the others' load.
        value, tier = await asyncio.shield(task)
        if self._count is not None:
            self._count[tier].inc()
        return value

    def invalidate(self, id: str) -> None:
        """Drop ``id`` ("*": everything) from this process's memory tier."""
        self._generation += 1
        if id == ALL:
            self._memory.clear()
        else:
            self._memory.pop(id, None)

    async def invalidate_everywhere(self, id: str) -> None:
        """Drop ``id`` ("*": everything) here, in Redis and in every replica's memory."""
        self.invalidate(id)
        if self._redis is None:
            return
        await invalidate_shared(self._redis, self._prefix, self.name, self.kind, id)

    def stats(self) -> CacheStats:
        return CacheStats(len(self._memory), self._redis_errors, self._loads)

    # --- misses ---------------------------------------------------------------------

    def _forget(self, id: str, task: asyncio.Task[tuple[V | None, str]]) -> None:
        if self._inflight.get(id) is task:
            del self._inflight[id]
        if not task.cancelled():
            task.exception()  # retrieved here, so an unawaited failure is not logged twice

    async def _load(self, id: str) -> tuple[V | None, str]:
        generation = self._generation
        cached = await self._redis_get(id)
        if cached is not None:
            value = cached[0]
            if generation == self._generation:
                self._remember(id, value)
            return value, "redis"
        self._loads += 1
        try:
            value = await self._loader(id)
        except Exception as exc:
            log.warning(
                "cache %s: loading %s failed: %s: %s", self.name, id[:16], type(exc).__name__, exc
            )
            raise CacheUnavailable(f"cache {self.name}: lookup failed: {exc}") from exc
        if generation == self._generation:
            self._remember(id, value)
            await self._redis_set(id, value)
        return value, "postgres" if value is not None else "miss"

    def _remember(self, id: str, value: V | None) -> None:
        ttl = self._ttl if value is not None else self._negative_ttl
        self._memory[id] = (self._clock() + ttl, value)
        self._memory.move_to_end(id)
        while len(self._memory) > self._max_entries:
            self._memory.popitem(last=False)

    # --- the Redis tier ---------------------------------------------------------------

    def _redis_usable(self) -> aioredis.Redis | None:
        if self._redis is None:
            return None
        if self._breaker is not None and not self._breaker.allow():
            return None
        return self._redis

    async def _redis_get(self, id: str) -> tuple[V | None] | None:
        """(value,) when Redis holds an entry (value None: known not found), else None."""
        redis = self._redis_usable()
        if redis is None:
            return None
        try:
            raw = await redis.get(redis_key(self._prefix, self.name, id))
        except (RedisError, OSError, TimeoutError) as exc:
            self._redis_failed(exc)
            return None
        self._redis_ok()
        data = raw.encode() if isinstance(raw, str) else raw  # a decode_responses client
        if not data or data[:1] == _TOMBSTONE:
            return None
        if data[:1] == _NOT_FOUND:
            return (None,)
        try:
            return (self._codec.decode(data[1:]),)
        except Exception as exc:  # a value from another release, or corrupt: reload it
            log.warning(
                "cache %s: undecodable Redis entry for %s (%s); reloading", self.name, id[:16], exc
            )
            return None

    async def _redis_set(self, id: str, value: V | None) -> None:
        redis = self._redis_usable()
        if redis is None:
            return
        if value is None:
            data, ttl_ms = _NOT_FOUND, self._negative_ttl_ms
        else:
            data, ttl_ms = _FOUND + self._codec.encode(value), self._redis_ttl_ms
        try:
            # NX: never overwrite a tombstone (see invalidate_shared) or a newer value.
            await redis.set(redis_key(self._prefix, self.name, id), data, px=ttl_ms, nx=True)
        except (RedisError, OSError, TimeoutError) as exc:
            self._redis_failed(exc)
            return
        self._redis_ok()

    def _redis_failed(self, exc: BaseException) -> None:
        self._redis_errors += 1
        if self._breaker is not None:
            self._breaker.record_failure()
        if self._metrics is not None:
            self._metrics.dependency_up.labels(dependency="redis").set(0)
        if not self._redis_failing:
            self._redis_failing = True
            log.warning(
                "cache %s: Redis unavailable (%s: %s); answering from memory and the "
                "loader until it is back",
                self.name,
                type(exc).__name__,
                exc,
            )

    def _redis_ok(self) -> None:
        if self._breaker is not None:
            self._breaker.record_success()
        if self._redis_failing:
            self._redis_failing = False
            if self._metrics is not None:
                self._metrics.dependency_up.labels(dependency="redis").set(1)
            log.info("cache %s: Redis is back", self.name)

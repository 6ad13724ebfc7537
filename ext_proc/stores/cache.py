"""The memory → Redis → Postgres read-through cache (API keys, and other lookups).

``TieredCache[V].get(id)`` answers from, in order:

1. memory: a bounded LRU private to the process;
2. Redis: ``{prefix}cache:{name}:{id}``, shared by every replica;
3. the loader: an async callable (a Postgres query) returning the value or None.

**Freshness.** Every found value carries the wall-clock time it was loaded
(``loaded_at``, kept in Redis too, so replicas agree on its age):

- younger than ``ttl``: fresh, answered without asking the loader;
- older than ``refresh_after`` (when set, below ``ttl``): still answered at once, and a
  background reload starts (single flight; retried at most every ``_RETRY_REFRESH``
  seconds), so an entry in steady use is renewed before it expires and no request waits;
- older than ``ttl``: reloaded; the lookup waits for the loader at most ``deadline``
  seconds (when set), the load itself runs on in the background up to ``load_timeout``;
- when the loader cannot answer (it raised, missed the deadline, or its breaker is
  open), an entry younger than ``stale_ttl`` is answered anyway ("stale"), counted in
  ``ext_proc_cache_stale_served_total``. Once the loader is known to be failing, stale
  entries are answered without waiting and a background load probes for recovery.
  Past ``stale_ttl``, or for an id never loaded, ``get`` raises ``CacheUnavailable``.

"Not found" is cached too, for ``negative_ttl`` in both tiers, so a flood of bad keys
costs the loader one query per key per replica per ``negative_ttl``; it is never served
stale, and lives in its own LRU so such a flood cannot evict known-good entries.
Concurrent misses for the same id share one load (single flight).

Redis is optional: a Redis error, or an open ``Breaker``, skips that tier (logged once
per outage, counted in ``redis_errors`` and ``dependency_up{dependency="redis"}``); a
lookup never fails because of Redis. A ``loader_breaker`` guards the loader the same
way (``ext_proc_circuit_state{dependency="postgres"}`` for the key cache).

**What invalidates an entry.** Its TTLs; ``invalidate(id)`` (this process's memory,
called by the invalidation listeners for messages of this cache's kind): the entry is
dropped and no copy loaded before that moment is taken from Redis afterwards (neither
fresh nor as a stale fallback), so a revoked key cannot come back from a replica's
Redis copy; ``drop(id)`` does the same and tombstones the Redis copy (for changes that
reach this process through Postgres NOTIFY, whose writer may not have touched Redis);
``invalidate("*")`` marks every entry for revalidation (the next lookup asks the
loader; listeners send it on every reconnect, when messages may have been missed), but
keeps them as stale fallbacks; ``invalidate_everywhere(id)`` / ``invalidate_shared(...)``
after a change in Postgres: replace the Redis entry with a short-lived tombstone and
publish ``kind:id``. A Redis write never overwrites a tombstone nor an entry loaded
later than its own, so a load that read Postgres just before a change cannot put the
old value back, and a load that spans an invalidation does not store its result.

Wall clocks: ages and "loaded before the invalidation" compare the loading replica's
clock with this one's, with a margin of ``CLOCK_SKEW_MARGIN`` seconds.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, Literal, Protocol, TypeVar

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
# Replicas' wall clocks may disagree by this much: a Redis copy loaded less than this
# before an invalidation counts as loaded before it.
CLOCK_SKEW_MARGIN = 2.0
# A failed background refresh is tried again after this long (not on every request).
_RETRY_REFRESH = 1.0

# Redis values: a one-byte tag, then for found and not-found values the load time
# (13 decimal digits of Unix milliseconds) and for found ones the codec's bytes.
_FOUND = b"w"
_NOT_FOUND = b"n"
_TOMBSTONE = b"x"
_STAMP_DIGITS = 13

# SET unless the current value is a tombstone or was loaded at the same time or later.
_SET_IF_NEWER = """
local cur = redis.call('GET', KEYS[1])
if cur then
  local tag = string.sub(cur, 1, 1)
  if tag == 'x' then return 0 end
  if tag == 'w' or tag == 'n' then
    local stamp = tonumber(string.sub(cur, 2, 14))
    if stamp and stamp >= tonumber(ARGV[3]) then return 0 end
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""

StaleReason = Literal["unavailable", "timeout"]


class Codec(Protocol[V]):
    """How a cached value is stored in Redis (e.g. orjson of a dataclass)."""

    def encode(self, value: V) -> bytes: ...

    def decode(self, data: bytes) -> V: ...


class CacheUnavailable(Exception):
    """The value is in no cache (nor a stale one) and the loader failed (``__cause__``
    says how) or did not answer within the deadline."""


@dataclass(frozen=True, slots=True)
class CacheStats:
    entries: int  # found values in memory (fresh or stale)
    redis_errors: int
    loads: int  # loader calls
    negative_entries: int = 0
    stale_served: int = 0


@dataclass(slots=True)
class _Entry(Generic[V]):
    value: V
    loaded_at: float  # wall clock (shared through Redis)
    fresh_until: float  # the cache's (monotonic) clock from here on
    refresh_at: float
    stale_until: float


@dataclass(frozen=True, slots=True)
class _RedisHit(Generic[V]):
    value: V | None  # None: known not found
    loaded_at: float


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
    treat it as absent, and their writes cannot overwrite it with a value loaded
    before the change. Raises Redis errors: the caller decides how to report them.
    """
    if id == ALL:
        keys = [key async for key in redis.scan_iter(match=redis_key(prefix, name, "*"))]
        if keys:
            await redis.delete(*keys)
    else:
        await redis.set(redis_key(prefix, name, id), _TOMBSTONE, px=int(tombstone_ttl * 1000))
    await publish(redis, prefix, kind, id)


def _stamp(wall: float) -> bytes:
    return str(int(wall * 1000)).rjust(_STAMP_DIGITS, "0").encode()


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
        refresh_after: float | None = None,
        stale_ttl: float | None = None,
        deadline: float | None = None,
        load_timeout: float | None = None,
        redis_ttl: float | None = None,
        breaker: Breaker | None = None,
        loader_breaker: Breaker | None = None,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        """``name`` labels the metrics and the Redis keys; ``kind`` is the invalidation
        kind (default: ``name``). ``refresh_after`` (< ``ttl``), ``stale_ttl`` (>=
        ``ttl``), ``deadline`` and ``load_timeout`` are off when None (see the module
        docstring). ``redis_ttl`` (how long Redis keeps a found value) defaults to
        ``stale_ttl``, else ``ttl``. ``breaker`` guards Redis, ``loader_breaker`` the
        loader."""
        if max_entries < 1 or ttl <= 0 or negative_ttl <= 0:
            raise ValueError("max_entries, ttl and negative_ttl must be positive")
        if refresh_after is not None and not 0 < refresh_after < ttl:
            raise ValueError("refresh_after must be between 0 and ttl")
        if stale_ttl is not None and stale_ttl < ttl:
            raise ValueError("stale_ttl must be at least ttl")
        if deadline is not None and deadline <= 0:
            raise ValueError("deadline must be positive")
        if load_timeout is not None and (
            load_timeout <= 0 or (deadline is not None and load_timeout < deadline)
        ):
            raise ValueError("load_timeout must be positive and at least the deadline")
        self.name = name
        self.kind = kind or name
        self._loader = loader
        self._codec = codec
        self._redis = redis
        self._prefix = prefix
        self._max_entries = max_entries
        self._ttl = ttl
        self._negative_ttl = negative_ttl
        self._refresh_after = refresh_after
        self._stale_ttl = stale_ttl if stale_ttl is not None else ttl
        self._deadline = deadline
        self._load_timeout = load_timeout
        if redis_ttl is None:
            redis_ttl = self._stale_ttl
        self._redis_ttl_ms = int(redis_ttl * 1000)
        self._negative_ttl_ms = int(negative_ttl * 1000)
        self._breaker = breaker
        self._loader_breaker = loader_breaker
        self._clock = clock
        self._wall = wall_clock
        # Found values, most recently used last; unknown ids (value: expiry) apart.
        self._memory: OrderedDict[str, _Entry[V]] = OrderedDict()
        self._negative: OrderedDict[str, float] = OrderedDict()
        # id -> wall time of its last invalidation: Redis copies loaded before it are
        # never used again (kept as long as such a copy may live in Redis).
        self._invalidated: OrderedDict[str, float] = OrderedDict()
        self._inflight: dict[str, asyncio.Task[tuple[V | None, str]]] = {}
        # Bumped by every invalidation: a load that saw another generation start does
        # not store its (possibly stale) result.
        self._generation = 0
        self._redis_failing = False
        self._loader_failing = False
        self._redis_errors = 0
        self._loads = 0
        self._stale_served = 0
        self._set_if_newer = redis.register_script(_SET_IF_NEWER) if redis is not None else None
        self._metrics = metrics
        if metrics is not None:
            self._count: dict[str, Callable[[], None]] | None = {
                tier: metrics.cache_lookups.labels(cache=name, tier=tier).inc
                for tier in ("memory", "redis", "postgres", "miss", "stale")
            }
            self._stale_count = {
                reason: metrics.cache_stale_served.labels(cache=name, reason=reason).inc
                for reason in ("unavailable", "timeout")
            }
            self._failure_count = {
                reason: metrics.cache_load_failures.labels(cache=name, reason=reason).inc
                for reason in ("error", "timeout", "circuit_open")
            }
        else:
            self._count = None

    # --- lookups --------------------------------------------------------------------

    async def get(self, id: str) -> V | None:
        """The value for ``id``, or None when the loader does not know it. Raises
        ``CacheUnavailable`` when neither a cache nor the loader can answer."""
        now = self._clock()
        entry = self._memory.get(id)
        if entry is not None:
            if now < entry.fresh_until:
                self._memory.move_to_end(id)
                if now >= entry.refresh_at:
                    entry.refresh_at = now + _RETRY_REFRESH
                    self._start_load(id)
                if self._count is not None:
                    self._count["memory"]()
                return entry.value
            if now >= entry.stale_until:
                del self._memory[id]
            elif self._loader_failing:
                # The loader is known to be down: no request waits for it; a background
                # load (at most one per id and _RETRY_REFRESH) finds out when it is back.
                if now >= entry.refresh_at:
                    entry.refresh_at = now + _RETRY_REFRESH
                    self._start_load(id)
                return self._served_stale(entry, "unavailable")
        else:
            expiry = self._negative.get(id)
            if expiry is not None:
                if now < expiry:
                    self._negative.move_to_end(id)
                    if self._count is not None:
                        self._count["memory"]()
                    return None
                del self._negative[id]
        task = self._start_load(id)
        try:
            # Shielded: a caller that gives up (deadline, client gone) does not cancel
            # the others' load, which runs on to ``load_timeout`` and fills the cache.
            if self._deadline is None:
                value, tier = await asyncio.shield(task)
            else:
                value, tier = await asyncio.wait_for(asyncio.shield(task), self._deadline)
        except TimeoutError:
            return self._stale_or_raise(
                id,
                "timeout",
                CacheUnavailable(
                    f"cache {self.name}: no answer within the {self._deadline}s lookup deadline"
                ),
            )
        except CacheUnavailable as exc:
            return self._stale_or_raise(id, "unavailable", exc)
        if self._count is not None:
            self._count[tier]()
        return value

    def invalidate(self, id: str) -> None:
        """Drop ``id`` from this process's memory tier, and never take a copy of it
        loaded before now from Redis. ``"*"``: every entry is revalidated by its next
        lookup (kept as a stale fallback in case the loader cannot answer)."""
        self._generation += 1
        if id == ALL:
            self._negative.clear()
            for entry in self._memory.values():
                entry.fresh_until = entry.refresh_at = -math.inf
            return
        self._memory.pop(id, None)
        self._negative.pop(id, None)
        self._invalidated[id] = self._wall()
        self._invalidated.move_to_end(id)
        while len(self._invalidated) > self._max_entries:
            self._invalidated.popitem(last=False)

    async def drop(self, id: str) -> None:
        """``invalidate(id)``, then tombstone the Redis copy (best effort): for a change
        heard of through Postgres, whose writer may not have reached Redis."""
        self.invalidate(id)
        redis = self._redis_usable()
        if id == ALL or redis is None:
            return
        try:
            await redis.set(
                redis_key(self._prefix, self.name, id), _TOMBSTONE, px=int(TOMBSTONE_TTL * 1000)
            )
        except (RedisError, OSError, TimeoutError) as exc:
            self._redis_failed(exc)
            return
        self._redis_ok()

    async def invalidate_everywhere(self, id: str) -> None:
        """Drop ``id`` ("*": everything) here, in Redis and in every replica's memory."""
        self.invalidate(id)
        if self._redis is None:
            return
        await invalidate_shared(self._redis, self._prefix, self.name, self.kind, id)

    def stats(self) -> CacheStats:
        return CacheStats(
            len(self._memory),
            self._redis_errors,
            self._loads,
            negative_entries=len(self._negative),
            stale_served=self._stale_served,
        )

    def servable_entries(self) -> int:
        """Found values in memory that can still be answered (fresh, or stale within
        ``stale_ttl``): what this process can authenticate while the loader is down."""
        now = self._clock()
        return sum(1 for entry in self._memory.values() if now < entry.stale_until)

    @property
    def loader_failing(self) -> bool:
        """True since the loader's last call failed or missed the deadline."""
        return self._loader_failing

    async def close(self) -> None:
        """Cancel loads still running in the background (at shutdown)."""
        tasks = list(self._inflight.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    # --- stale answers ----------------------------------------------------------------

    def _served_stale(self, entry: _Entry[V], reason: StaleReason) -> V:
        self._stale_served += 1
        if self._count is not None:
            self._count["stale"]()
            self._stale_count[reason]()
        return entry.value

    def _stale_or_raise(self, id: str, reason: StaleReason, error: CacheUnavailable) -> V:
        # Read again: an invalidation may have dropped the entry while this lookup waited.
        entry = self._memory.get(id)
        if entry is not None and self._clock() < entry.stale_until:
            self._memory.move_to_end(id)
            return self._served_stale(entry, reason)
        raise error

    # --- loads ------------------------------------------------------------------------

    def _start_load(self, id: str) -> asyncio.Task[tuple[V | None, str]]:
        task = self._inflight.get(id)
        if task is None:
            task = asyncio.create_task(self._load(id))
            self._inflight[id] = task
            task.add_done_callback(lambda done: self._forget(id, done))
        return task

    def _forget(self, id: str, task: asyncio.Task[tuple[V | None, str]]) -> None:
        if self._inflight.get(id) is task:
            del self._inflight[id]
        if not task.cancelled():
            task.exception()  # retrieved here, so an unawaited failure is not logged twice

    def _newer_than(self, id: str) -> float:
        """Redis copies of ``id`` loaded at or before this wall time are not used."""
        newest = -math.inf
        entry = self._memory.get(id)
        if entry is not None:
            newest = entry.loaded_at
        invalidated = self._invalidated.get(id)
        if invalidated is not None:
            newest = max(newest, invalidated + CLOCK_SKEW_MARGIN)
        return newest

    async def _load(self, id: str) -> tuple[V | None, str]:
        generation = self._generation
        newer_than = self._newer_than(id)
        hit = await self._redis_get(id)
        if hit is not None and hit.loaded_at > newer_than:
            age = max(0.0, self._wall() - hit.loaded_at)
            if hit.value is None:
                if age < self._negative_ttl:
                    if generation == self._generation:
                        self._remember_negative(id, self._negative_ttl - age)
                    return None, "redis"
            elif age < self._ttl:
                if generation == self._generation:
                    self._remember(id, hit.value, hit.loaded_at)
                return hit.value, "redis"
            elif age < self._stale_ttl and generation == self._generation:
                # Too old to answer without the loader, but newer than what memory holds:
                # the fallback should the loader fail (or miss the deadline).
                self._remember(id, hit.value, hit.loaded_at)
        loaded_at = self._wall()
        value = await self._call_loader(id)
        if generation == self._generation:
            if value is None:
                self._remember_negative(id, self._negative_ttl)
            else:
                self._remember(id, value, loaded_at)
            await self._redis_set(id, value, loaded_at)
        return value, "postgres" if value is not None else "miss"

    async def _call_loader(self, id: str) -> V | None:
        breaker = self._loader_breaker
        if breaker is not None and not breaker.allow():
            self._loader_trouble("circuit_open", None)
            raise CacheUnavailable(f"cache {self.name}: the loader's circuit is open")
        self._loads += 1
        inner = asyncio.ensure_future(self._loader(id))
        slow = False
        try:
            if self._deadline is not None:
                done, _ = await asyncio.wait({inner}, timeout=self._deadline)
                if not done:
                    # Past the deadline: counts against the loader now, so the breaker
                    # opens after a few hung loads rather than after their full timeout.
                    slow = True
                    self._loader_trouble("timeout", None)
            if self._load_timeout is None:
                value = await inner
            else:
                remaining = self._load_timeout - (self._deadline if slow and self._deadline else 0)
                value = await asyncio.wait_for(inner, max(remaining, 0.001))
        except asyncio.CancelledError:
            inner.cancel()
            raise
        except Exception as exc:
            if not slow:  # a slow load was counted when it passed the deadline
                self._loader_trouble("timeout" if isinstance(exc, TimeoutError) else "error", exc)
            log.debug("cache %s: loading %s failed: %s", self.name, id[:16], exc)
            raise CacheUnavailable(
                f"cache {self.name}: lookup failed: {type(exc).__name__}: {exc}"
            ) from exc
        self._loader_ok()
        return value

    def _loader_trouble(self, reason: str, exc: BaseException | None) -> None:
        if reason != "circuit_open" and self._loader_breaker is not None:
            self._loader_breaker.record_failure()
        if self._count is not None:
            self._failure_count[reason]()
        if not self._loader_failing:
            self._loader_failing = True
            what = f"{type(exc).__name__}: {exc}" if exc is not None else reason
            log.warning(
                "cache %s: the loader cannot answer (%s); serving entries loaded within "
                "the last %.0fs until it is back",
                self.name,
                what,
                self._stale_ttl,
            )

    def _loader_ok(self) -> None:
        if self._loader_breaker is not None:
            self._loader_breaker.record_success()
        if self._loader_failing:
            self._loader_failing = False
            log.info("cache %s: the loader answers again", self.name)

    def _remember(self, id: str, value: V, loaded_at: float) -> None:
        age = max(0.0, self._wall() - loaded_at)
        now = self._clock()
        current = self._memory.get(id)
        if current is not None and current.loaded_at > loaded_at:
            return  # memory already holds a newer load
        refresh = self._refresh_after if self._refresh_after is not None else math.inf
        self._memory[id] = _Entry(
            value=value,
            loaded_at=loaded_at,
            fresh_until=now + self._ttl - age,
            refresh_at=now + refresh - age,
            stale_until=now + self._stale_ttl - age,
        )
        self._memory.move_to_end(id)
        self._negative.pop(id, None)
        while len(self._memory) > self._max_entries:
            self._memory.popitem(last=False)

    def _remember_negative(self, id: str, ttl: float) -> None:
        self._memory.pop(id, None)  # it existed once (e.g. a deleted key): not any more
        self._negative[id] = self._clock() + ttl
        self._negative.move_to_end(id)
        while len(self._negative) > self._max_entries:
            self._negative.popitem(last=False)

    # --- the Redis tier ---------------------------------------------------------------

    def _redis_usable(self) -> aioredis.Redis | None:
        if self._redis is None:
            return None
        if self._breaker is not None and not self._breaker.allow():
            return None
        return self._redis

    async def _redis_get(self, id: str) -> _RedisHit[V] | None:
        """What Redis holds for ``id`` (a value, or "not found"), else None."""
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
        if not data or data[:1] not in (_FOUND, _NOT_FOUND):
            return None  # absent, a tombstone, or a format this release does not read
        try:
            loaded_at = int(data[1 : 1 + _STAMP_DIGITS]) / 1000
            if data[:1] == _NOT_FOUND:
                return _RedisHit(None, loaded_at)
            return _RedisHit(self._codec.decode(data[1 + _STAMP_DIGITS :]), loaded_at)
        except Exception as exc:  # a value from another release, or corrupt: reload it
            log.warning(
                "cache %s: undecodable Redis entry for %s (%s); reloading", self.name, id[:16], exc
            )
            return None

    async def _redis_set(self, id: str, value: V | None, loaded_at: float) -> None:
        redis = self._redis_usable()
        if redis is None or self._set_if_newer is None:
            return
        if value is None:
            data, ttl_ms = _NOT_FOUND + _stamp(loaded_at), self._negative_ttl_ms
        else:
            data = _FOUND + _stamp(loaded_at) + self._codec.encode(value)
            ttl_ms = self._redis_ttl_ms
        try:
            # Never over a tombstone (see invalidate_shared) or an entry loaded later.
            await self._set_if_newer(
                keys=[redis_key(self._prefix, self.name, id)],
                args=[data, ttl_ms, int(loaded_at * 1000)],
            )
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

"""In-process limits: the fallback when Redis is unavailable (or not configured).

Same methods and semantics as ``ext_proc.stores.redis_limits.RedisLimits``, computed
with ``ext_proc.policies.limiter`` on ``time.monotonic()``. The state lives in this
process only, so while it is in use **limits are enforced per replica**: with R
replicas behind Envoy an app may get up to R times its limit. That is the price of
failing open (``on_error: allow``); policies that cannot accept it say ``deny``.

Calendar-period counters (budgets with ``period:``) live beside the buckets with the
monotonic time their period ends; an ended one reads as empty and is swept like a full
bucket.

Memory is bounded: at most ``max_keys`` buckets and ``max_keys`` cooldowns. When a
table is over its bound, entries that no longer matter go first (buckets that are full
again, cooldowns that have expired), then the least recently used. Evicting a live
bucket forgets its usage (that key starts full again): acceptable for a best-effort
fallback, and it only happens with more distinct keys than the bound.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence

from ext_proc.policies import limiter
from ext_proc.policies.limiter import AcquireResult, LimitSpec

DEFAULT_MAX_KEYS = 100_000

# When over the bound, evict down to this fraction of it, so the O(n) sweep for full
# buckets runs at most once per (1 - fraction) * max_keys insertions (amortised O(1)).
_LOW_WATER = 0.9


class LocalLimits:
    def __init__(
        self,
        *,
        max_keys: int = DEFAULT_MAX_KEYS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_keys < 1:
            raise ValueError("max_keys must be >= 1")
        self._max_keys = max_keys
        self._low_water = max(1, int(max_keys * _LOW_WATER))
        self._clock = clock
        # key -> TAT; insertion order is recency (most recent last).
        self._tats: OrderedDict[str, float] = OrderedDict()
        # key -> monotonic time the cooldown ends.
        self._cooldowns: OrderedDict[str, float] = OrderedDict()
        # Calendar-period counters: key -> monotonic time the period ends (their counts
        # are in _tats, so one LRU order and one bound cover both).
        self._period_ends: dict[str, float] = {}

    def __len__(self) -> int:
        """Buckets held now (full ones included until they are swept)."""
        return len(self._tats)

    def __contains__(self, key: object) -> bool:
        """A bucket is held for ``key`` (it is not known to be full)."""
        return key in self._tats

    @property
    def cooldown_count(self) -> int:
        return len(self._cooldowns)

    async def acquire_many(
        self, specs: Sequence[LimitSpec], cooldown_keys: Sequence[str] = ()
    ) -> AcquireResult:
        return self.acquire_many_now(specs, cooldown_keys)

    def acquire_many_now(
        self,
        specs: Sequence[LimitSpec],
        cooldown_keys: Sequence[str] = (),
        *,
        blocked: bool = False,
    ) -> AcquireResult:
        """The synchronous body of :meth:`acquire_many` (nothing here awaits).

        ``blocked``: the request is denied anyway (by a check made elsewhere), so only
        read the state, consuming nothing.
        """
        now = self._clock()
        cooldown_remaining, cooldown_key = self._active_cooldown(cooldown_keys, now)
        for spec in specs:
            if spec.period_left is not None:
                self._expire_period(spec.key, now)
        results, updates = limiter.acquire_all(
            self._tats, now, specs, blocked=blocked or cooldown_key is not None, source="local"
        )
        if updates:
            for spec in specs:
                if spec.period_left is not None and spec.key in updates:
                    self._period_ends[spec.key] = now + limiter.fixed_left(spec)
            self._store(updates)
        else:
            for spec in specs:  # a read is a use, for the LRU order
                if spec.key in self._tats:
                    self._tats.move_to_end(spec.key)
        return AcquireResult(
            results=results,
            allowed=updates is not None,
            cooldown_remaining=cooldown_remaining,
            cooldown_key=cooldown_key,
        )

    async def adjust(self, spec: LimitSpec, delta: int) -> None:
        self.adjust_now(spec, delta)

    def adjust_now(self, spec: LimitSpec, delta: int) -> None:
        if delta == 0:
            return
        now = self._clock()
        if spec.period_left is not None:
            self._adjust_period(spec, delta, now)
            return
        new_tat = limiter.adjust(self._tats.get(spec.key), now, spec.limit, spec.window, delta)
        if new_tat <= now:
            self._tats.pop(spec.key, None)  # full bucket: nothing to remember
        else:
            self._store({spec.key: new_tat})

    def _adjust_period(self, spec: LimitSpec, delta: int, now: float) -> None:
        left = spec.period_left
        if left is None or left <= 0:
            return  # the period is over: nothing is charged to it any more
        self._expire_period(spec.key, now)
        used = limiter.adjust_fixed(self._tats.get(spec.key), delta)
        if used <= 0:
            self._tats.pop(spec.key, None)
            self._period_ends.pop(spec.key, None)
        else:
            self._period_ends[spec.key] = now + left
            self._store({spec.key: used})

    def _expire_period(self, key: str, now: float) -> None:
        """Forget a period counter whose period has ended (the next one starts empty)."""
        end = self._period_ends.get(key)
        if end is not None and end <= now:
            del self._period_ends[key]
            self._tats.pop(key, None)

    async def set_cooldown(self, key: str, seconds: float) -> None:
        self.set_cooldown_now(key, seconds)

    def set_cooldown_now(self, key: str, seconds: float) -> None:
        """Start (or extend, never shorten) a cooldown of ``seconds`` on ``key``."""
        if seconds <= 0:
            return
        until = self._clock() + seconds
        current = self._cooldowns.get(key)
        if current is not None and current >= until:
            return
        self._cooldowns[key] = until
        self._cooldowns.move_to_end(key)
        if len(self._cooldowns) > self._max_keys:
            self._evict(self._cooldowns, self._clock())

    def _active_cooldown(self, keys: Sequence[str], now: float) -> tuple[float, str | None]:
        longest = 0.0
        which: str | None = None
        for key in keys:
            until = self._cooldowns.get(key)
            if until is None:
                continue
            left = until - now
            if left <= 0:
                del self._cooldowns[key]
            elif left > longest:
                longest, which = left, key
        return longest, which

    def _store(self, updates: dict[str, float]) -> None:
        tats = self._tats
        for key, tat in updates.items():
            tats[key] = tat
            tats.move_to_end(key)
        if len(tats) > self._max_keys:
            self._evict(tats, self._clock())

    def _evict(self, table: OrderedDict[str, float], now: float) -> None:
        """Drop entries that are spent (time <= now: full bucket / expired cooldown; a
        period counter whose period ended), then the least recently used, down to the
        low-water mark."""
        ends = self._period_ends if table is self._tats else {}
        spent = [k for k, t in table.items() if (ends[k] <= now if k in ends else t <= now)]
        for key in spent:
            del table[key]
            ends.pop(key, None)
        while len(table) > self._low_water:
            key, _ = table.popitem(last=False)
            ends.pop(key, None)

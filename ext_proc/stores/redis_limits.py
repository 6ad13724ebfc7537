"""Shared limit counters in Redis: the GCRA of ``ext_proc.policies.limiter`` in Lua.

Each operation is one EVALSHA round trip, atomic on the server, so every replica of the
gateway draws from the same buckets exactly (no read-modify-write races). The scripts
use the Redis server's clock (``TIME``) so replicas agree whatever their own clocks say
(a script that reads TIME and then writes needs effects replication: the default since
Redis 5, the only mode since 7).

Key layout (keys arrive fully qualified; the caller owns the prefix):
- a limit key holds its TAT as a float string (``%.17g``: round-trips exactly) with a
  PEXPIRE of the time until the bucket is full again, so idle keys vanish;
- a cooldown key holds ``1`` with a PEXPIRE of the cooldown; it is active while it
  exists;
- a calendar-period counter (a budget's ``period: month``) holds the units used in the
  period, its key names the period, and it expires when the period ends (the caller
  sends the seconds left: the period's calendar is the caller's, its clock is UTC).

The Lua repeats the Python arithmetic operation for operation (both are IEEE doubles),
so for the same inputs both produce the same bits (durations are sent back as whole
microseconds, rounded up); the integration tests drive both with one synthetic clock
through the scripts' ``now`` override, which production never passes.

Scripts are run by SHA and loaded on the first ``NOSCRIPT`` (a restarted or flushed
server), then the call is retried once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any, Protocol

from redis.exceptions import NoScriptError

from ext_proc.policies.limiter import SLACK, AcquireResult, LimitResult, LimitSpec, fixed_left

# Both limit scripts start by reading the clock: the server's TIME, or ARGV[1] when a
# test passes ``now`` ('' = TIME). Sets ``now`` (seconds, a double).
_NOW_LUA = """
local now
if ARGV[1] == '' then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
else
  now = tonumber(ARGV[1])
end
"""

# KEYS: the cooldown keys (ARGV[2] of them), then one key per limit.
# ARGV: now override ('' = server TIME), cooldown key count, then per limit:
#       limit, window (s), cost, period left (s; 0 = a GCRA bucket, > 0 = a calendar-
#       period counter ending in that many seconds).
# Reply: one string of space-separated numbers: allowed 0|1, index of the longest
#        active cooldown (0 = none), its PTTL ms, then per limit: allowed 0|1,
#        remaining, reset_after µs, retry_after µs (-1 = never).
# One bulk string, not an array: redis-py's pure-Python parser pays ~2 µs per array
# element (a 1-limit reply was 16 µs slower as an array). Durations go back as whole
# microseconds rounded up (a client that waits that long is never early), so Lua
# formats no floats; the TAT itself is stored with all its bits.
# Mirrors limiter.acquire_all (+ acquire, remaining_units, peek, acquire_fixed).
# ``remaining`` is written with %d: tostring would switch to exponent notation from
# 1e14 units (a budget's nano-dollars reach that).
_ACQUIRE_LUA = (
    _NOW_LUA
    + """local slack = @SLACK@
local floor, ceil = math.floor, math.ceil

local function remaining(used, window, interval, limit)
  local units = floor((window - used + slack) / interval)
  if units < 0 then return '0' end
  if units > limit then return string.format('%d', limit) end
  return string.format('%d', units)
end

local function units_left(limit, used)
  if used < limit then return string.format('%d', limit - used) end
  return '0'
end

local ncool = tonumber(ARGV[2])
local cool_ms, cool_i = 0, 0
for i = 1, ncool do
  local ttl = redis.call('PTTL', KEYS[i])
  if ttl > cool_ms then cool_ms, cool_i = ttl, i end
end
local ok = cool_i == 0

local out = {0, cool_i, cool_ms}
local used = {}
local pending = {}  -- key -> new TAT (or period count), written only if every limit allows
local fixed = {}  -- key -> seconds its period has left, for period counters
for j = 1, #KEYS - ncool do
  local key = KEYS[ncool + j]
  local limit = tonumber(ARGV[4 * j - 1])
  local window = tonumber(ARGV[4 * j])
  local cost = tonumber(ARGV[4 * j + 1])
  local left = tonumber(ARGV[4 * j + 2])
  local interval = window / limit
  local tat = pending[key]
  if tat == nil then
    local v = redis.call('GET', key)
    if v then tat = tonumber(v) end
  end
  local k = 4 * j
  if left > 0 then
    -- A calendar-period counter (limiter.acquire_fixed): ``tat`` is the period's count.
    fixed[key] = left
    local u = tat or 0
    used[j] = u
    local reset = ceil(left * 1000000)
    if cost > limit then
      ok = false
      out[k], out[k + 1], out[k + 2], out[k + 3] = 0, units_left(limit, u), reset, -1
    elseif u + cost > limit then
      ok = false
      out[k], out[k + 1], out[k + 2], out[k + 3] = 0, units_left(limit, u), reset, reset
    else
      out[k], out[k + 1], out[k + 2], out[k + 3] = 1, units_left(limit, u + cost), reset, 0
      if cost > 0 then pending[key] = u + cost end
    end
  else
    -- A GCRA bucket (limiter.acquire): ``tat`` is its theoretical arrival time.
    local base = now
    if tat ~= nil and tat >= now then base = tat end
    local u = base - now
    used[j] = u
    if cost > limit then
      ok = false
      out[k], out[k + 1], out[k + 2], out[k + 3] =
        0, remaining(u, window, interval, limit), ceil(u * 1000000), -1
    else
      local nt = base + cost * interval
      local a = nt - now
      if a > window + slack then
        ok = false
        out[k], out[k + 1], out[k + 2], out[k + 3] =
          0, remaining(u, window, interval, limit), ceil(u * 1000000), ceil((a - window) * 1000000)
      else
        out[k], out[k + 1], out[k + 2], out[k + 3] =
          1, remaining(a, window, interval, limit), ceil(a * 1000000), 0
        if cost > 0 then pending[key] = nt end
      end
    end
  end
end

if ok then
  out[1] = 1
  for key, nt in pairs(pending) do
    local left = fixed[key]
    if left then
      redis.call('SET', key, string.format('%.17g', nt), 'PX', math.max(1, ceil(left * 1000)))
    else
      redis.call('SET', key, string.format('%.17g', nt),
                 'PX', math.max(1, ceil((nt - now) * 1000)))
    end
  end
else
  -- Nothing is consumed: limits that would have allowed show their untouched state.
  for j = 1, #KEYS - ncool do
    local k = 4 * j
    if out[k] == 1 then
      local limit = tonumber(ARGV[4 * j - 1])
      local u = used[j]
      if tonumber(ARGV[4 * j + 2]) > 0 then
        out[k + 1] = units_left(limit, u)
      else
        local window = tonumber(ARGV[4 * j])
        out[k + 1] = remaining(u, window, window / limit, limit)
        out[k + 2] = ceil(u * 1000000)
      end
    end
  end
end
return table.concat(out, ' ')
"""
).replace("@SLACK@", repr(SLACK))

# KEYS[1]: the limit key. ARGV: now override ('' = TIME), limit, window, delta, period
# left (s; 0 = a GCRA bucket). Mirrors limiter.adjust (a full bucket, new TAT <= now,
# deletes the key) and limiter.adjust_fixed (a count of 0 deletes it). Reply: 0.
_ADJUST_LUA = (
    _NOW_LUA
    + """local limit = tonumber(ARGV[2])
local window = tonumber(ARGV[3])
local delta = tonumber(ARGV[4])
local left = tonumber(ARGV[5])
if left > 0 then
  local v = redis.call('GET', KEYS[1])
  local n = (v and tonumber(v) or 0) + delta
  if n <= 0 then
    redis.call('DEL', KEYS[1])
  else
    redis.call('SET', KEYS[1], string.format('%.17g', n), 'PX', math.max(1, math.ceil(left * 1000)))
  end
  return 0
end
local interval = window / limit
local base = now
local v = redis.call('GET', KEYS[1])
if v then
  local tat = tonumber(v)
  if tat >= now then base = tat end
end
local nt = base + delta * interval
if nt <= now then
  redis.call('DEL', KEYS[1])
else
  redis.call('SET', KEYS[1], string.format('%.17g', nt), 'PX', math.ceil((nt - now) * 1000))
end
return 0
"""
)

# KEYS[1]: the cooldown key. ARGV[1]: duration in ms. Extends, never shortens.
_COOLDOWN_LUA = """
local ms = tonumber(ARGV[1])
if redis.call('PTTL', KEYS[1]) < ms then
  redis.call('SET', KEYS[1], '1', 'PX', ms)
end
return 0
"""


class LuaClient(Protocol):
    """What the limits need from a Redis client: redis-py's asyncio client, or the lean
    pipelined one the server uses on the hot path (ext_proc.stores.resp)."""

    async def execute_command(self, *args: Any) -> Any: ...

    async def script_load(self, script: str) -> Any: ...


class _Script:
    """A Lua script called by SHA; loaded once, and again after a ``NOSCRIPT``."""

    __slots__ = ("sha", "source")

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest()

    async def __call__(self, client: LuaClient, numkeys: int, args: list[Any]) -> Any:
        try:
            return await client.execute_command("EVALSHA", self.sha, numkeys, *args)
        except NoScriptError:
            # First use on this server, or it restarted / flushed its script cache.
            sha = await client.script_load(self.source)
            self.sha = sha.decode() if isinstance(sha, bytes) else str(sha)
            return await client.execute_command("EVALSHA", self.sha, numkeys, *args)


class RedisLimits:
    """GCRA limits and cooldowns shared by every replica through one Redis."""

    def __init__(self, redis: LuaClient) -> None:
        self._redis = redis
        self._acquire = _Script(_ACQUIRE_LUA)
        self._adjust = _Script(_ADJUST_LUA)
        self._cooldown = _Script(_COOLDOWN_LUA)

    async def acquire_many(
        self,
        specs: Sequence[LimitSpec],
        cooldown_keys: Sequence[str] = (),
        *,
        now: float | None = None,
    ) -> AcquireResult:
        """Check the cooldowns and take every spec's cost, all or nothing, atomically.

        ``now`` overrides the server clock: for tests only (production passes nothing).
        """
        ncool = len(cooldown_keys)
        args: list[Any] = [*cooldown_keys]
        args.extend([spec.key for spec in specs])
        args.append(b"" if now is None else now)
        args.append(ncool)
        for spec in specs:
            args.append(spec.limit)
            args.append(spec.window)
            args.append(spec.cost)
            args.append(0 if spec.period_left is None else fixed_left(spec))
        fields = (await self._acquire(self._redis, ncool + len(specs), args)).split()
        results = []
        k = 3
        for spec in specs:
            retry = float(fields[k + 3])
            results.append(
                LimitResult(
                    fields[k] == b"1",
                    spec.limit,
                    int(fields[k + 1]),
                    float(fields[k + 2]) / 1e6,
                    None if retry < 0 else retry / 1e6,
                )
            )
            k += 4
        cool_i = int(fields[1])
        return AcquireResult(
            results=tuple(results),
            allowed=fields[0] == b"1",
            cooldown_remaining=int(fields[2]) / 1000.0 if cool_i else 0.0,
            cooldown_key=cooldown_keys[cool_i - 1] if cool_i else None,
        )

    async def adjust(self, spec: LimitSpec, delta: int, *, now: float | None = None) -> None:
        """Consume ``delta`` more units (> 0, may go into debt) or refund (< 0). On a
        calendar-period counter whose period has ended, nothing is left to settle."""
        if delta == 0:
            return
        left = spec.period_left
        if left is not None and left <= 0:
            return
        await self._adjust(
            self._redis,
            1,
            [
                spec.key,
                b"" if now is None else now,
                spec.limit,
                spec.window,
                delta,
                0 if left is None else left,
            ],
        )

    async def set_cooldown(self, key: str, seconds: float) -> None:
        """Block ``key`` for ``seconds`` (extends a shorter active cooldown, never shortens)."""
        ms = int(seconds * 1000)
        if ms <= 0:
            return
        await self._cooldown(self._redis, 1, [key, ms])

"""RedisLimits against a real Redis: the GCRA semantics through Lua, agreement with the
Python algorithm bit for bit, all-or-nothing, cooldowns, NOSCRIPT recovery, and exact
admission under concurrency from several OS processes.

Every key on the shared Redis starts with the test's ``redis_prefix``. The NOSCRIPT test
flushes scripts only on a private redis-server it starts itself.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from ext_proc.policies import limiter
from ext_proc.policies.limiter import LimitResult, LimitSpec
from ext_proc.stores import embedded
from ext_proc.stores.redis import create_redis
from ext_proc.stores.redis_limits import RedisLimits
from ext_proc.stores.resp import RespClient

pytestmark = pytest.mark.integration

# A synthetic clock at today's Unix magnitude, where doubles are coarsest.
T0 = 1_767_225_600.123456


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    c = create_redis(redis_url)
    try:
        yield c
    finally:
        await c.aclose()


@pytest.fixture(params=["redis-py", "resp"])
async def limits(
    request: pytest.FixtureRequest, client: aioredis.Redis, redis_url: str
) -> AsyncIterator[RedisLimits]:
    """Every test runs with both clients: redis-py and the lean one the server uses."""
    if request.param == "redis-py":
        yield RedisLimits(client)
        return
    lean = RespClient(redis_url)
    try:
        yield RedisLimits(lean)
    finally:
        await lean.aclose()


def spec(key: str, limit: int = 5, window: float = 60.0, cost: int = 1) -> LimitSpec:
    return LimitSpec(key=key, limit=limit, window=window, cost=cost, policy="p", on_error="deny")


def _us(seconds: float | None) -> float | None:
    """How RedisLimits reports a duration: whole microseconds, rounded up."""
    return None if seconds is None else math.ceil(seconds * 1e6) / 1e6


def same(result: LimitResult, expected: LimitResult) -> bool:
    """Equal in every field but ``source`` (which names the store)."""
    return (
        result.allowed,
        result.limit,
        result.remaining,
        result.reset_after,
        result.retry_after,
    ) == (
        expected.allowed,
        expected.limit,
        expected.remaining,
        _us(expected.reset_after),
        _us(expected.retry_after),
    )


# --- semantics on the server clock (production path: no `now` override) ---


async def test_n_pass_then_denied_on_server_time(
    limits: RedisLimits, client: aioredis.Redis, redis_prefix: str
) -> None:
    s = spec(redis_prefix + "rpm", limit=5, window=60.0)
    results = [await limits.acquire_many([s]) for _ in range(6)]
    assert [r.allowed for r in results] == [True] * 5 + [False]
    first = [r.results[0] for r in results]
    assert [r.remaining for r in first] == [4, 3, 2, 1, 0, 0]
    assert all(r.source == "redis" and r.limit == 5 for r in first)
    # Reset grows by one interval (12 s) per request, less the few ms the test took.
    for k, r in enumerate(first[:5], start=1):
        assert 12.0 * k - 1.0 < r.reset_after <= 12.0 * k
    denied = first[5]
    assert denied.retry_after is not None and 11.0 < denied.retry_after <= 12.0
    # The TAT is a float string that expires when the bucket is full again.
    stored = await client.get(s.key)
    assert stored is not None
    now = await client.time()
    assert float(stored) - (now[0] + now[1] / 1e6) == pytest.approx(60.0, abs=1.0)
    assert 59_000 < await client.pttl(s.key) <= 60_000


async def test_cost_above_limit_never_fits(limits: RedisLimits, redis_prefix: str) -> None:
    result = await limits.acquire_many([spec(redis_prefix + "tpm", limit=100, cost=101)])
    assert not result.allowed
    assert result.results[0].retry_after is None
    assert result.results[0].remaining == 100


async def test_window_refills_the_bucket(limits: RedisLimits, redis_prefix: str) -> None:
    s = spec(redis_prefix + "w", limit=5, window=60.0)
    admitted = [(await limits.acquire_many([s], now=T0)).allowed for _ in range(6)]
    assert admitted == [True] * 5 + [False]
    later = [(await limits.acquire_many([s], now=T0 + 60.0)).allowed for _ in range(6)]
    assert later == [True] * 5 + [False]


async def test_adjust_into_debt_and_refund(
    limits: RedisLimits, client: aioredis.Redis, redis_prefix: str
) -> None:
    s = spec(redis_prefix + "tok", limit=100, window=60.0, cost=100)
    assert (await limits.acquire_many([s], now=T0)).allowed
    await limits.adjust(s, 50, now=T0)  # used 150 of a 100-token reservation
    debt = (await limits.acquire_many([spec(s.key, 100, 60.0, 1)], now=T0)).results[0]
    assert not debt.allowed
    assert debt.reset_after == pytest.approx(90.0, abs=1e-6)
    assert debt.retry_after == pytest.approx(30.6, abs=1e-6)
    assert 89_000 < await client.pttl(s.key) <= 90_000
    await limits.adjust(s, -140, now=T0)  # refund down to 10 tokens used
    state = (await limits.acquire_many([spec(s.key, 100, 60.0, 0)], now=T0)).results[0]
    assert state.remaining == 90
    # A refund beyond what was used fills the bucket: the key goes away.
    await limits.adjust(s, -1000, now=T0)
    assert await client.exists(s.key) == 0


async def test_all_or_nothing(
    limits: RedisLimits, client: aioredis.Redis, redis_prefix: str
) -> None:
    rpm = spec(redis_prefix + "rpm", limit=5)
    tpm = spec(redis_prefix + "tpm", limit=100, cost=80)
    assert (await limits.acquire_many([rpm, tpm])).allowed
    before = await client.get(rpm.key)
    denied = await limits.acquire_many([rpm, tpm])
    assert not denied.allowed
    assert [r.allowed for r in denied.results] == [True, False]
    assert denied.results[0].remaining == 4  # shown untouched...
    assert await client.get(rpm.key) == before  # ...and not charged


async def test_cooldowns(limits: RedisLimits, client: aioredis.Redis, redis_prefix: str) -> None:
    s = spec(redis_prefix + "rpm")
    short, long_ = redis_prefix + "cool:a", redis_prefix + "cool:b"
    await limits.set_cooldown(short, 5.0)
    await limits.set_cooldown(long_, 30.0)
    await limits.set_cooldown(long_, 1.0)  # never shortens
    assert 29_000 < await client.pttl(long_) <= 30_000
    blocked = await limits.acquire_many([s], [redis_prefix + "cool:none", short, long_])
    assert not blocked.allowed
    assert blocked.cooldown_key == long_
    assert 29.0 < blocked.cooldown_remaining <= 30.0
    assert blocked.results[0].allowed and blocked.results[0].remaining == 5
    assert await client.exists(s.key) == 0  # nothing consumed
    free = await limits.acquire_many([s], [redis_prefix + "cool:none"])
    assert free.allowed and free.cooldown_key is None and free.cooldown_remaining == 0.0


async def test_lua_agrees_with_python_bit_for_bit(
    limits: RedisLimits, client: aioredis.Redis, redis_prefix: str
) -> None:
    """A seeded random mix of acquire/adjust on one synthetic clock: the same results and
    the very same stored TATs (every bit)."""
    rng = random.Random(20250601)
    buckets = {
        redis_prefix + "a": (5, 60.0),
        redis_prefix + "b": (3, 1.0),
        redis_prefix + "c": (100, 60.0),
        redis_prefix + "d": (7, 0.7),
        redis_prefix + "e": (1000, 3600.0),
    }
    keys = list(buckets)
    state: dict[str, float] = {}
    seen: Counter[str] = Counter()
    # The synthetic clock never runs behind real time, so a key Redis expired by its
    # PEXPIRE is one the model sees as full too.
    started = time.monotonic()
    now = T0
    for step in range(1500):
        now = max(now + rng.expovariate(8.0), T0 + (time.monotonic() - started))
        if rng.random() < 0.75:
            chosen = rng.choices(keys, k=rng.randint(1, 3))  # repeats: charged twice
            specs = []
            for key in chosen:
                limit, window = buckets[key]
                cost = rng.choice([0, 1, 1, 1, rng.randint(1, limit), limit + 1])
                specs.append(spec(key, limit, window, cost))
            got = await limits.acquire_many(specs, now=now)
            expected, updates = limiter.acquire_all(state, now, specs)
            assert got.allowed == (updates is not None), step
            seen.update(
                "allowed" if r.allowed else "never" if r.retry_after is None else "wait"
                for r in expected
            )
            seen["all-or-nothing"] += updates is None and any(r.allowed for r in expected)
            for g, e in zip(got.results, expected, strict=True):
                assert same(g, e), (step, g, e)
            if updates:
                state.update(updates)
        else:
            key = rng.choice(keys)
            limit, window = buckets[key]
            delta = rng.randint(-limit, limit)
            await limits.adjust(spec(key, limit, window), delta, now=now)
            if delta:
                new_tat = limiter.adjust(state.get(key), now, limit, window, delta)
                seen["debt"] += new_tat - now > window
                if new_tat <= now:
                    state.pop(key, None)
                else:
                    state[key] = new_tat
        for key in keys:
            stored = await client.get(key)
            model = state.get(key)
            if stored is None:
                assert model is None or model <= now, (step, key)
            else:
                assert float(stored) == model, (step, key)
    # The sequence went through every path, not just the easy one.
    assert min(seen[path] for path in ("allowed", "wait", "never", "all-or-nothing", "debt")) >= 10


# --- calendar-period counters (budgets with `period:`) ---


def period(key: str, limit: int, cost: int, left: float) -> LimitSpec:
    return LimitSpec(key, limit, 86400.0, cost, "budget", "deny", period_left=left)


async def test_period_counter_counts_to_the_limit_and_expires_with_the_period(
    limits: RedisLimits, client: aioredis.Redis, redis_prefix: str
) -> None:
    jan = redis_prefix + "budget:2026-01"
    results = [(await limits.acquire_many([period(jan, 10, 4, 90.0)])).results[0] for _ in range(3)]
    assert [r.allowed for r in results] == [True, True, False]
    assert [r.remaining for r in results] == [6, 2, 2]
    denied = results[2]
    assert denied.retry_after == 90.0 and denied.reset_after == 90.0  # until the period ends
    assert await client.get(jan) == b"8"
    assert 89_000 < await client.pttl(jan) <= 90_000  # gone when the period ends
    # Settling: a refund, then more than reserved (debt), never below zero.
    await limits.adjust(period(jan, 10, 4, 80.0), -3)
    assert await client.get(jan) == b"5"
    assert 79_000 < await client.pttl(jan) <= 80_000
    await limits.adjust(period(jan, 10, 4, 80.0), 7)
    assert not (await limits.acquire_many([period(jan, 10, 0, 80.0)])).allowed  # 12 > 10
    await limits.adjust(period(jan, 10, 4, 80.0), -50)
    assert await client.exists(jan) == 0
    # A period that has ended takes no settlement at all.
    await limits.adjust(period(jan, 10, 4, -1.0), 5)
    assert await client.exists(jan) == 0
    # The next period is another key: it starts empty.
    feb = redis_prefix + "budget:2026-02"
    await limits.acquire_many([period(jan, 10, 10, 1.0)])
    fresh = (await limits.acquire_many([period(feb, 10, 10, 2_419_200.0)])).results[0]
    assert fresh.allowed and fresh.remaining == 0


async def test_period_counter_is_all_or_nothing_with_other_limits(
    limits: RedisLimits, client: aioredis.Redis, redis_prefix: str
) -> None:
    budget = period(redis_prefix + "b:2026-01", 10, 6, 60.0)
    tpm = spec(redis_prefix + "tpm", limit=100, cost=60)
    assert (await limits.acquire_many([tpm, budget])).allowed
    denied = await limits.acquire_many([tpm, budget])
    assert not denied.allowed
    assert [r.allowed for r in denied.results] == [False, False]
    ok_budget = await limits.acquire_many(
        [spec(redis_prefix + "rpm"), period(budget.key, 10, 4, 60.0), tpm]
    )
    assert [r.allowed for r in ok_budget.results] == [True, True, False]
    assert ok_budget.results[1].remaining == 4  # shown untouched ...
    assert await client.get(budget.key) == b"6"  # ... and not charged


async def test_nano_dollar_budgets_keep_every_digit(
    limits: RedisLimits, client: aioredis.Redis, redis_prefix: str
) -> None:
    """A $1,000,000 budget is 1e15 nano-dollar units: counts, remaining and the stored
    values stay exact (Lua prints numbers from 1e14 on in exponent form unless told)."""
    limit = 10**15
    cost = 123_456_789_012_345
    got = (
        await limits.acquire_many([period(redis_prefix + "big:2026-01", limit, cost, 60.0)])
    ).results[0]
    assert got.allowed and got.remaining == limit - cost
    assert await client.get(redis_prefix + "big:2026-01") == str(cost).encode()
    rolling = spec(redis_prefix + "big-rolling", limit=limit, window=30 * 86400.0, cost=cost)
    first = (await limits.acquire_many([rolling], now=T0)).results[0]
    expected, _ = limiter.acquire(None, T0, limit, 30 * 86400.0, cost, source="redis")
    assert first.remaining == expected.remaining and first.remaining > 876_543_000_000_000


async def test_period_counters_agree_with_python(
    limits: RedisLimits, client: aioredis.Redis, redis_prefix: str
) -> None:
    """A seeded random mix of period counters and GCRA buckets in the same calls, with
    settlements: the same results and the same stored counts as limiter.acquire_all."""
    rng = random.Random(20261201)
    counters = {redis_prefix + "p1:2026-01": 50, redis_prefix + "p2:2026-01": 7}
    buckets = {redis_prefix + "g1": (20, 60.0)}
    state: dict[str, float] = {}
    seen: Counter[str] = Counter()
    started = time.monotonic()
    now = T0
    for step in range(600):
        now = max(now + rng.expovariate(8.0), T0 + (time.monotonic() - started))
        left = 3600.0 - step  # the period nears its end; the keys outlive the test
        if rng.random() < 0.75:
            specs = []
            for _ in range(rng.randint(1, 3)):
                if rng.random() < 0.7:
                    key = rng.choice(list(counters))
                    limit = counters[key]
                    cost = rng.choice([0, 1, 3, rng.randint(1, limit), limit + 1])
                    specs.append(period(key, limit, cost, left))
                else:
                    key, (limit, window) = next(iter(buckets.items()))
                    specs.append(spec(key, limit, window, rng.choice([0, 1, 5, limit + 1])))
            got = await limits.acquire_many(specs, now=now)
            expected, updates = limiter.acquire_all(state, now, specs)
            assert got.allowed == (updates is not None), step
            for g, e in zip(got.results, expected, strict=True):
                assert same(g, e), (step, g, e)
            seen.update(
                "allowed" if r.allowed else "never" if r.retry_after is None else "wait"
                for r in expected
            )
            seen["all-or-nothing"] += updates is None and any(r.allowed for r in expected)
            if updates:
                state.update(updates)
        else:
            key = rng.choice(list(counters))
            delta = rng.randint(-counters[key], counters[key])
            await limits.adjust(period(key, counters[key], 0, left), delta, now=now)
            if delta:
                used = limiter.adjust_fixed(state.get(key), delta)
                seen["debt"] += used > counters[key]
                if used <= 0:
                    state.pop(key, None)
                else:
                    state[key] = used
        for key in counters:
            stored = await client.get(key)
            assert (None if stored is None else float(stored)) == state.get(key), (step, key)
    assert min(seen[path] for path in ("allowed", "wait", "never", "all-or-nothing", "debt")) >= 10


# --- script cache: NOSCRIPT recovery, on a private server only ---


async def test_noscript_recovery(tmp_path: Path) -> None:
    server = embedded.start_redis(tmp_path / "redis")
    c = create_redis(server.url)
    try:
        limits = RedisLimits(c)
        s = spec("gwtest:noscript:k", limit=5)
        # First call on a server that never saw the script, then after a flush.
        assert (await limits.acquire_many([s])).results[0].remaining == 4
        await c.script_flush()
        assert (await limits.acquire_many([s])).results[0].remaining == 3
        await c.script_flush()
        await limits.adjust(s, 1)
        await c.script_flush()
        await limits.set_cooldown("gwtest:noscript:cool", 10.0)
        assert (await limits.acquire_many([s], ["gwtest:noscript:cool"])).cooldown_key
        assert (await limits.acquire_many([spec(s.key, cost=0)])).results[0].remaining == 2
        assert await c.script_exists(limits._acquire.sha) == [True]
    finally:
        await c.aclose()
        server.stop()


# --- concurrency: exact admission across OS processes ---

_WORKER = r"""
import asyncio, json, sys, time

from ext_proc.policies.limiter import LimitSpec
from ext_proc.stores.redis import create_redis
from ext_proc.stores.redis_limits import RedisLimits


async def main(url: str, key: str, tasks: int, calls: int) -> None:
    # A long timeout: this measures accuracy, and a timed-out call's outcome is unknown.
    client = create_redis(url, timeout=30.0, max_connections=tasks)
    limits = RedisLimits(client)
    spec = LimitSpec(key, 500, 86400.0, 1, "race", "deny")
    await limits.acquire_many([LimitSpec(key, 500, 86400.0, 0, "race", "deny")])  # loads
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    admitted = 0
    latencies = []

    async def hammer() -> None:
        nonlocal admitted
        for _ in range(calls):
            t0 = time.perf_counter()
            result = await limits.acquire_many((spec,))
            latencies.append(time.perf_counter() - t0)
            admitted += result.allowed

    start = time.perf_counter()
    await asyncio.gather(*(hammer() for _ in range(tasks)))
    elapsed = time.perf_counter() - start
    await client.aclose()
    latencies.sort()
    print(json.dumps({
        "admitted": admitted,
        "calls": len(latencies),
        "elapsed": elapsed,
        "p50_us": latencies[len(latencies) // 2] * 1e6,
        "p99_us": latencies[int(len(latencies) * 0.99)] * 1e6,
    }), flush=True)


asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
"""


async def test_exact_admission_across_processes(
    limits: RedisLimits, client: aioredis.Redis, redis_url: str, redis_prefix: str
) -> None:
    key = redis_prefix + "race"
    tasks, calls = 64, 24  # 2 x 64 x 24 = 3072 attempts for 500 units
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _WORKER,
            redis_url,
            key,
            str(tasks),
            str(calls),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        for _ in range(2)
    ]
    try:
        for p in procs:
            assert p.stdout is not None
            line = await asyncio.wait_for(p.stdout.readline(), timeout=60)
            assert line.strip() == b"ready"
        for p in procs:  # both start together
            assert p.stdin is not None
            p.stdin.write(b"go\n")
            await p.stdin.drain()
        reports = []
        for p in procs:
            out, _ = await asyncio.wait_for(p.communicate(), timeout=240)
            assert p.returncode == 0
            reports.append(json.loads(out.decode().strip().splitlines()[-1]))
    finally:
        for p in procs:
            if p.returncode is None:
                p.kill()
                await p.wait()
    # 24 h window: the refill during the test is far below one request.
    assert sum(r["admitted"] for r in reports) == 500
    assert sum(r["calls"] for r in reports) == 2 * tasks * calls
    state = (await limits.acquire_many([spec(key, 500, 86400.0, 0)])).results[0]
    assert state.remaining == 0

    # Sequential latency for the report (printed with -s; timings are not asserted).
    seq = spec(redis_prefix + "seq", limit=10**9, window=1.0)
    n = 2000
    t0 = time.perf_counter()
    for _ in range(n):
        await limits.acquire_many((seq,))
    sequential_us = (time.perf_counter() - t0) / n * 1e6
    total_calls = sum(r["calls"] for r in reports)
    wall = max(r["elapsed"] for r in reports)
    print(
        f"\nacquire_many: sequential {sequential_us:.0f} us/call ({1e6 / sequential_us:.0f}/s);"
        f" 2 procs x {tasks} tasks: {total_calls / wall:.0f} calls/s,"
        + ", ".join(f" p50 {r['p50_us']:.0f} us p99 {r['p99_us']:.0f} us" for r in reports)
    )

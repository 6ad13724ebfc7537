"""Limits when Redis dies: the breaker opens, each policy's on_error decides, and Redis is
used again once it is back.

Each test runs its own redis-server on a spare port (the shared one is never touched):
killed outright (connections refused at once) or frozen with SIGSTOP (calls hang until
the client's socket timeout), then brought back on the same port.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from ext_proc.metrics import CIRCUIT_CLOSED, CIRCUIT_HALF_OPEN, CIRCUIT_OPEN, Metrics
from ext_proc.policies.limiter import AcquireResult, LimitSpec
from ext_proc.policies.limits import KIND_COOLDOWN, KIND_REQUESTS, Limits
from ext_proc.policies.local_limiter import LocalLimits
from ext_proc.stores.circuit import CircuitBreaker
from ext_proc.stores.redis import DEFAULT_TIMEOUT, create_redis
from ext_proc.stores.redis_limits import RedisLimits
from tests.metric_samples import circuit_state, dependency_up, fallbacks
from tests.private_redis import PrivateRedis

pytestmark = pytest.mark.integration

OPEN_SECONDS = 1.0
# What a request may wait while Redis is dead: one socket timeout, plus scheduling slack
# for a loaded machine. Once the breaker is open it answers without any I/O.
FAILING_CALL_BOUND = DEFAULT_TIMEOUT + 0.25
OPEN_CALL_BOUND = 0.1


class SpyRedisLimits(RedisLimits):
    """The real RedisLimits, noting each call and the circuit state it ran under."""

    def __init__(self, client: aioredis.Redis, metrics: Metrics) -> None:
        super().__init__(client)
        self.metrics = metrics
        self.states: list[float | None] = []

    async def acquire_many(
        self,
        specs: Sequence[LimitSpec],
        cooldown_keys: Sequence[str] = (),
        *,
        now: float | None = None,
    ) -> AcquireResult:
        self.states.append(circuit_state(self.metrics))
        return await super().acquire_many(specs, cooldown_keys, now=now)


class Rig:
    def __init__(self, server: PrivateRedis) -> None:
        self.server = server
        self.client = create_redis(server.url)  # the production timeouts
        self.metrics = Metrics()
        self.breaker = CircuitBreaker("redis", self.metrics, open_seconds=OPEN_SECONDS)
        self.redis_limits = SpyRedisLimits(self.client, self.metrics)
        self.limits = Limits(
            self.redis_limits, LocalLimits(), self.breaker, self.metrics, prefix="gwtest:res:"
        )

    def spec(self, policy: str, limit: int, on_error: str) -> LimitSpec:
        key = self.limits.key_for(policy, "app", "app-1", KIND_REQUESTS)
        return LimitSpec(key, limit, 60.0, 1, policy, on_error)

    async def timed(
        self, specs: Sequence[LimitSpec], cooldowns: Sequence[str] = ()
    ) -> tuple[AcquireResult, float]:
        started = time.monotonic()
        result = await self.limits.acquire_many(specs, cooldowns)
        return result, time.monotonic() - started


@pytest.fixture
def server(tmp_path: Path) -> Iterator[PrivateRedis]:
    s = PrivateRedis(tmp_path / "redis")
    s.start()
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture
async def rig(server: PrivateRedis) -> AsyncIterator[Rig]:
    r = Rig(server)
    try:
        yield r
    finally:
        await r.client.aclose()


async def test_killed_redis_falls_back_by_policy_then_recovers(
    rig: Rig, server: PrivateRedis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    fail_open = rig.spec("rpm-open", 5, "allow")
    fail_closed = rig.spec("rpm-closed", 100, "deny")

    healthy, _ = await rig.timed([fail_open, fail_closed])
    assert healthy.allowed
    assert [r.source for r in healthy.results] == ["redis", "redis"]
    assert circuit_state(rig.metrics) == CIRCUIT_CLOSED and dependency_up(rig.metrics) == 1

    server.kill()

    # Until the breaker opens, each request pays one failed call (refused at once here).
    for _ in range(rig.breaker.failure_threshold):
        result, took = await rig.timed([fail_open])
        assert took < FAILING_CALL_BOUND
        assert result.allowed and result.results[0].source == "local"
    assert circuit_state(rig.metrics) == CIRCUIT_OPEN and dependency_up(rig.metrics) == 0
    calls_when_opened = len(rig.redis_limits.states)

    # Open: answered at once, without touching Redis, by each policy's on_error.
    result, took = await rig.timed([fail_open])
    assert took < OPEN_CALL_BOUND
    assert result.allowed and result.results[0].source == "local"
    # The local limiter enforces the limit (5, in this process): 4 taken, 1 left.
    assert result.results[0].remaining == 1
    assert (await rig.timed([fail_open]))[0].allowed
    local_denied, took = await rig.timed([fail_open])
    assert took < OPEN_CALL_BOUND
    assert not local_denied.allowed
    assert local_denied.results[0].source == "local"
    assert local_denied.results[0].retry_after == pytest.approx(12.0, abs=0.5)

    closed, took = await rig.timed([fail_closed])
    assert took < OPEN_CALL_BOUND
    assert not closed.allowed
    only = closed.results[0]
    assert (only.source, only.allowed, only.retry_after) == ("unavailable", False, None)

    other = rig.spec("rpm-other", 5, "allow")
    mixed, _ = await rig.timed([other, fail_closed])
    assert not mixed.allowed
    assert [r.source for r in mixed.results] == ["local", "unavailable"]
    assert mixed.results[0].allowed and mixed.results[0].remaining == 5  # not consumed

    # Best-effort writes apply locally and never raise.
    await rig.limits.adjust(other, 2)
    cooldown = rig.limits.key_for("cel", "app", "app-1", KIND_COOLDOWN)
    await rig.limits.set_cooldown(cooldown, 30.0)
    blocked, _ = await rig.timed([other], [cooldown])
    assert not blocked.allowed and blocked.cooldown_key == cooldown
    assert blocked.results[0].remaining == 3  # the local adjust took 2

    assert len(rig.redis_limits.states) == calls_when_opened  # Redis was never called
    assert fallbacks(rig.metrics, "rpm-open", "local") == 6
    assert fallbacks(rig.metrics, "rpm-closed", "deny") == 2
    assert fallbacks(rig.metrics, "rpm-other", "local") == 2

    # Back on the same port: after open_seconds one probe runs half-open, then closed.
    server.start()
    deadline = time.monotonic() + 10 * OPEN_SECONDS
    while True:
        result, took = await rig.timed([fail_closed])
        if result.results[0].source == "redis" or time.monotonic() > deadline:
            break
        assert took < OPEN_CALL_BOUND  # still open: at once, no waiting
        await asyncio.sleep(0.02)
    assert result.allowed and result.results[0].source == "redis"
    probe_state = rig.redis_limits.states[calls_when_opened]
    assert probe_state == CIRCUIT_HALF_OPEN
    assert circuit_state(rig.metrics) == CIRCUIT_CLOSED and dependency_up(rig.metrics) == 1
    # The restarted server lost its scripts (NOSCRIPT) and its counters: Redis is used again.
    again, _ = await rig.timed([fail_open, fail_closed])
    assert again.allowed and [r.source for r in again.results] == ["redis", "redis"]
    assert again.results[0].remaining == 4

    # One warning per outage from the breaker and one from Limits, not one per call.
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert [r.name for r in warnings] == ["ext_proc.policies.limits", "ext_proc.stores.circuit"]


async def test_frozen_redis_costs_one_socket_timeout_then_nothing(
    rig: Rig, server: PrivateRedis
) -> None:
    spec = rig.spec("tpm", 1000, "allow")
    assert (await rig.timed([spec]))[0].results[0].source == "redis"

    server.freeze()
    try:
        # A burst arrives as Redis hangs: every request waits one socket timeout at most.
        burst = await asyncio.gather(*(rig.timed([spec]) for _ in range(32)))
        waits = [took for _, took in burst]
        print(f"\nfrozen Redis: waits {min(waits):.3f}..{max(waits):.3f} s")
        assert max(waits) < FAILING_CALL_BOUND
        assert min(waits) >= DEFAULT_TIMEOUT * 0.8  # they did wait on the socket timeout
        assert all(r.allowed and r.results[0].source == "local" for r, _ in burst)
        assert circuit_state(rig.metrics) == CIRCUIT_OPEN
        assert fallbacks(rig.metrics, "tpm", "local") == 32

        # Open: the next requests do not wait at all.
        for _ in range(10):
            result, took = await rig.timed([spec])
            assert took < OPEN_CALL_BOUND
            assert result.results[0].source == "local"
        print(f"open breaker: {took * 1e6:.0f} us")
    finally:
        server.thaw()

    deadline = time.monotonic() + 10 * OPEN_SECONDS
    while time.monotonic() < deadline:
        result, _ = await rig.timed([spec])
        if result.results[0].source == "redis":
            break
        await asyncio.sleep(0.02)
    assert result.results[0].source == "redis"
    assert circuit_state(rig.metrics) == CIRCUIT_CLOSED

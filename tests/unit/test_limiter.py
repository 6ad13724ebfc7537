"""The GCRA limiter on plain numbers, the in-process LocalLimits built on it, and the
Limits facade's fallback decisions.

No services and no real clock: times are numbers the tests choose (the facade tests
aim at a port where nothing listens).
"""

from __future__ import annotations

import pytest

from ext_proc.metrics import CIRCUIT_OPEN, Metrics
from ext_proc.policies import limiter
from ext_proc.policies.limiter import LimitResult, LimitSpec, acquire, acquire_all, adjust, peek
from ext_proc.policies.limits import Limits
from ext_proc.policies.local_limiter import LocalLimits
from ext_proc.stores.circuit import CircuitBreaker
from ext_proc.stores.redis import create_redis
from ext_proc.stores.redis_limits import RedisLimits
from tests.metric_samples import fallbacks

NOW = 1000.0


class FakeClock:
    def __init__(self, t: float = NOW) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def drain(
    limit: int, window: float, now: float = NOW, cost: int = 1, tat: float | None = None
) -> tuple[list[LimitResult], float | None]:
    """Acquire at a frozen ``now`` until denied; return every result and the last TAT."""
    results = []
    while True:
        result, new_tat = acquire(tat, now, limit, window, cost)
        results.append(result)
        if not result.allowed:
            return results, tat
        tat = new_tat


def spec(
    key: str, limit: int = 5, window: float = 60.0, cost: int = 1, on_error: str = "allow"
) -> LimitSpec:
    return LimitSpec(key=key, limit=limit, window=window, cost=cost, policy="p", on_error=on_error)


# --- the pure algorithm ---


@pytest.mark.parametrize(
    ("limit", "window"),
    [(1, 1.0), (5, 60.0), (3, 1.0), (7, 1.0), (60, 60.0), (999, 7.0), (1000, 1.0)],
)
def test_n_pass_then_denied_with_retry_after_one_interval(limit: int, window: float) -> None:
    results, _ = drain(limit, window)
    assert [r.allowed for r in results] == [True] * limit + [False]
    denied = results[-1]
    assert denied.retry_after == pytest.approx(window / limit, rel=1e-6)
    assert denied.remaining == 0
    assert denied.reset_after == pytest.approx(window)


@pytest.mark.parametrize(("limit", "window"), [(5, 60.0), (3, 1.0), (500, 86400.0)])
def test_n_pass_at_unix_time_magnitudes(limit: int, window: float) -> None:
    # Redis keeps TATs as Unix time, where doubles are coarse: the slack absorbs it.
    results, _ = drain(limit, window, now=1_767_225_600.123456)
    assert sum(r.allowed for r in results) == limit


def test_remaining_counts_down_and_reset_grows_by_one_interval() -> None:
    results, _ = drain(5, 60.0)
    assert [r.remaining for r in results[:5]] == [4, 3, 2, 1, 0]
    assert [r.reset_after for r in results[:5]] == [12.0, 24.0, 36.0, 48.0, 60.0]
    assert all(r.retry_after == 0.0 for r in results[:5])
    assert all(r.limit == 5 and r.source == "local" for r in results)


def test_bucket_is_full_again_after_the_window() -> None:
    _, tat = drain(5, 60.0)
    later = NOW + 60.0
    state = peek(tat, later, 5, 60.0)
    assert (state.remaining, state.reset_after) == (5, 0.0)
    results, _ = drain(5, 60.0, now=later, tat=tat)
    assert sum(r.allowed for r in results) == 5
    assert results[0].remaining == 4


def test_refill_is_continuous() -> None:
    _, tat = drain(5, 60.0)
    # One interval later exactly one unit fits; half an interval later none does.
    half = acquire(tat, NOW + 6.0, 5, 60.0, 1)[0]
    assert not half.allowed
    assert half.retry_after == pytest.approx(6.0)
    one = acquire(tat, NOW + 12.0, 5, 60.0, 1)[0]
    assert one.allowed and one.remaining == 0


def test_retry_after_is_when_the_request_fits() -> None:
    _, tat = drain(5, 60.0)
    denied = acquire(tat, NOW, 5, 60.0, 1)[0]
    assert denied.retry_after is not None
    assert acquire(tat, NOW + denied.retry_after, 5, 60.0, 1)[0].allowed
    assert not acquire(tat, NOW + denied.retry_after - 0.001, 5, 60.0, 1)[0].allowed


def test_weighted_cost() -> None:
    r1, tat = acquire(None, NOW, 100, 60.0, 30)
    assert r1.allowed and r1.remaining == 70 and r1.reset_after == pytest.approx(18.0)
    r2, tat = acquire(tat, NOW, 100, 60.0, 70)
    assert r2.allowed and r2.remaining == 0
    r3, unchanged = acquire(tat, NOW, 100, 60.0, 10)
    assert not r3.allowed and unchanged is None
    assert r3.retry_after == pytest.approx(6.0)  # 10 tokens at 100 / 60 s


def test_cost_equal_to_limit_fits_an_empty_bucket_only() -> None:
    result, tat = acquire(None, NOW, 10, 60.0, 10)
    assert result.allowed and result.remaining == 0
    assert acquire(tat, NOW + 30.0, 10, 60.0, 10)[0].retry_after == pytest.approx(30.0)


def test_cost_above_limit_is_always_denied_with_no_retry() -> None:
    result, tat = acquire(None, NOW, 10, 60.0, 11)
    assert not result.allowed and tat is None
    assert result.retry_after is None  # it can never fit: no point retrying
    assert result.remaining == 10  # nothing was taken


def test_zero_cost_reads_without_consuming() -> None:
    _, tat = drain(5, 60.0)
    result, new_tat = acquire(tat, NOW, 5, 60.0, 0)
    assert result.allowed and result.remaining == 0 and new_tat is None


def test_adjust_up_goes_into_debt_and_later_requests_wait() -> None:
    result, tat = acquire(None, NOW, 100, 60.0, 100)  # reserved the whole bucket
    assert result.allowed and tat is not None
    tat = adjust(tat, NOW, 100, 60.0, 50)  # real usage was 150
    assert tat == pytest.approx(NOW + 90.0)
    debt = acquire(tat, NOW, 100, 60.0, 1)[0]
    assert not debt.allowed
    assert debt.remaining == 0
    assert debt.reset_after == pytest.approx(90.0)
    assert debt.retry_after == pytest.approx(30.6)  # 30 s of debt + one token's 0.6 s
    assert not acquire(tat, NOW + 30.0, 100, 60.0, 1)[0].allowed
    assert acquire(tat, NOW + 30.6, 100, 60.0, 1)[0].allowed


def test_adjust_down_refunds_but_never_before_now() -> None:
    _, tat = acquire(None, NOW, 100, 60.0, 80)
    assert tat is not None
    refunded = adjust(tat, NOW, 100, 60.0, -30)
    assert refunded == pytest.approx(NOW + 30.0)
    assert peek(refunded, NOW, 100, 60.0).remaining == 50
    # Refunding more than was taken fills the bucket, no more.
    assert adjust(tat, NOW, 100, 60.0, -1000) == NOW
    assert peek(adjust(tat, NOW, 100, 60.0, -1000), NOW, 100, 60.0).remaining == 100
    # Time that already refilled the bucket cannot be refunded again.
    assert adjust(tat, NOW + 100.0, 100, 60.0, -10) == NOW + 100.0
    assert adjust(None, NOW, 100, 60.0, -10) == NOW


def test_adjust_on_a_fresh_key_consumes_from_now() -> None:
    assert adjust(None, NOW, 10, 60.0, 3) == pytest.approx(NOW + 18.0)


def test_remaining_units_clamps() -> None:
    assert limiter.remaining_units(0.0, 60.0, 12.0, 5) == 5
    assert limiter.remaining_units(600.0, 60.0, 12.0, 5) == 0
    # An interval shorter than the slack must not report more than the limit.
    assert limiter.remaining_units(0.0, 1.0, 1e-7, 10_000_000) == 10_000_000


# --- all or nothing across limits ---


def test_acquire_all_consumes_every_limit_when_all_allow() -> None:
    specs = [spec("a", limit=5), spec("b", limit=100, cost=30)]
    results, updates = acquire_all({}, NOW, specs)
    assert [r.allowed for r in results] == [True, True]
    assert [r.remaining for r in results] == [4, 70]
    assert updates == {"a": pytest.approx(NOW + 12.0), "b": pytest.approx(NOW + 18.0)}


def test_acquire_all_consumes_nothing_when_one_denies() -> None:
    state = {"b": NOW + 60.0}  # b is empty
    specs = [spec("a", limit=5), spec("b", limit=100, cost=30)]
    results, updates = acquire_all(state, NOW, specs)
    assert updates is None
    a, b = results
    # a would have passed: it says so, and shows its untouched state.
    assert a.allowed and a.remaining == 5 and a.reset_after == 0.0
    assert not b.allowed and b.retry_after == pytest.approx(18.0)


def test_acquire_all_blocked_reads_only() -> None:
    results, updates = acquire_all({}, NOW, [spec("a")], blocked=True)
    assert updates is None
    assert results[0].allowed and results[0].remaining == 5


def test_acquire_all_charges_a_repeated_key_twice() -> None:
    specs = [spec("a", limit=5, cost=3), spec("a", limit=5, cost=2)]
    results, updates = acquire_all({}, NOW, specs)
    assert [r.remaining for r in results] == [2, 0]
    assert updates == {"a": pytest.approx(NOW + 60.0)}
    results, updates = acquire_all({}, NOW, [spec("a", cost=3), spec("a", cost=3)])
    assert updates is None and not results[1].allowed


# --- LocalLimits ---


async def test_local_limits_semantics() -> None:
    clock = FakeClock()
    local = LocalLimits(clock=clock)
    s = spec("k", limit=5, window=60.0)
    results = [await local.acquire_many([s]) for _ in range(6)]
    assert [r.allowed for r in results] == [True] * 5 + [False]
    assert [r.results[0].remaining for r in results] == [4, 3, 2, 1, 0, 0]
    assert results[-1].results[0].retry_after == pytest.approx(12.0)
    assert all(r.results[0].source == "local" for r in results)
    clock.t += 12.0
    assert (await local.acquire_many([s])).allowed
    clock.t += 60.0
    full = await local.acquire_many([spec("k", cost=0)])
    assert full.results[0].remaining == 5


async def test_local_limits_all_or_nothing() -> None:
    local = LocalLimits(clock=FakeClock())
    a, b = spec("a", limit=5), spec("b", limit=10, cost=10)
    assert (await local.acquire_many([a, b])).allowed
    denied = await local.acquire_many([a, b])
    assert not denied.allowed
    assert [r.allowed for r in denied.results] == [True, False]
    # a was not charged by the denied call.
    assert (await local.acquire_many([spec("a", cost=0)])).results[0].remaining == 4


async def test_local_limits_adjust() -> None:
    clock = FakeClock()
    local = LocalLimits(clock=clock)
    s = spec("t", limit=100, window=60.0, cost=100)
    assert (await local.acquire_many([s])).allowed
    await local.adjust(s, 50)  # into debt
    peeked = await local.acquire_many([spec("t", limit=100, cost=0)])
    assert not peeked.allowed and peeked.results[0].reset_after == pytest.approx(90.0)
    await local.adjust(s, -1000)  # refund everything: full, and forgotten
    assert len(local) == 0
    assert (await local.acquire_many([s])).allowed


async def test_local_cooldowns() -> None:
    clock = FakeClock()
    local = LocalLimits(clock=clock)
    s = spec("k", limit=5)
    await local.set_cooldown("c1", 10.0)
    await local.set_cooldown("c2", 30.0)
    await local.set_cooldown("c2", 5.0)  # never shortens
    blocked = await local.acquire_many([s], ["c0", "c1", "c2"])
    assert not blocked.allowed
    assert blocked.cooldown_key == "c2" and blocked.cooldown_remaining == pytest.approx(30.0)
    assert blocked.results[0].allowed and blocked.results[0].remaining == 5  # not consumed
    clock.t += 29.0
    still = await local.acquire_many([s], ["c2"])
    assert not still.allowed and still.cooldown_remaining == pytest.approx(1.0)
    clock.t += 1.0
    free = await local.acquire_many([s], ["c1", "c2"])
    assert free.allowed and free.cooldown_key is None and free.cooldown_remaining == 0.0
    assert local.cooldown_count == 0  # expired ones are dropped when seen


async def test_local_limits_memory_is_bounded_full_buckets_first() -> None:
    clock = FakeClock()
    local = LocalLimits(max_keys=100, clock=clock)
    # 50 keys whose buckets will be full again by the time we overflow...
    for i in range(50):
        await local.acquire_many([spec(f"idle{i}", limit=5, window=1.0)])
    clock.t += 10.0
    # ...and more live keys than the bound (window long: their buckets stay in use).
    for i in range(120):
        await local.acquire_many([spec(f"live{i}", limit=5, window=3600.0)])
        assert len(local) <= 100
    assert not any(f"idle{i}" in local for i in range(50))
    # LRU beyond that: the most recent live keys survive.
    assert "live119" in local and "live0" not in local


async def test_local_limits_lru_keeps_recently_used_keys() -> None:
    local = LocalLimits(max_keys=10, clock=FakeClock())
    for i in range(10):
        await local.acquire_many([spec(f"k{i}", window=3600.0)])
    await local.acquire_many([spec("k0", window=3600.0)])  # touch the oldest
    await local.acquire_many([spec("new", window=3600.0)])
    assert "k0" in local and "k1" not in local
    assert len(local) <= 10


async def test_local_cooldowns_are_bounded() -> None:
    clock = FakeClock()
    local = LocalLimits(max_keys=10, clock=clock)
    for i in range(25):
        await local.set_cooldown(f"c{i}", 60.0)
        assert local.cooldown_count <= 10
    assert (await local.acquire_many([], ["c24"])).cooldown_key == "c24"


def test_local_limits_rejects_a_zero_bound() -> None:
    with pytest.raises(ValueError, match="max_keys"):
        LocalLimits(max_keys=0)


# --- the Limits facade (no Redis here: none configured, or one that refuses) ---


def test_key_for_names_kind_policy_scope_and_id() -> None:
    metrics = Metrics()
    limits = Limits(None, LocalLimits(), CircuitBreaker("redis", metrics), metrics, "gw:")
    assert limits.key_for("sixty", "app", "42", "requests") == "gw:lim:requests:sixty:app:42"


async def test_limits_without_redis_are_local_and_not_a_fallback() -> None:
    metrics = Metrics()
    limits = Limits(None, LocalLimits(), CircuitBreaker("redis", metrics), metrics, "gw:")
    s = spec("gw:k", limit=2, on_error="deny")
    results = [await limits.acquire_many([s]) for _ in range(3)]
    assert [r.allowed for r in results] == [True, True, False]
    assert all(r.results[0].source == "local" for r in results)
    assert fallbacks(metrics, "p", "deny") == 0 and fallbacks(metrics, "p", "local") == 0


async def test_limits_fall_back_per_policy_when_redis_refuses() -> None:
    metrics = Metrics()
    breaker = CircuitBreaker("redis", metrics, failure_threshold=2)
    client = create_redis("redis://127.0.0.1:1/0")  # nothing listens on port 1
    limits = Limits(RedisLimits(client), LocalLimits(), breaker, metrics, "gw:")
    try:
        fail_open = LimitSpec("gw:a", 5, 60.0, 1, "open", "allow")
        fail_closed = LimitSpec("gw:b", 5, 60.0, 1, "closed", "deny")
        first = await limits.acquire_many([fail_open])
        assert first.allowed and first.results[0].source == "local"
        mixed = await limits.acquire_many([fail_open, fail_closed])
        assert breaker.state == CIRCUIT_OPEN
        assert not mixed.allowed
        assert [r.source for r in mixed.results] == ["local", "unavailable"]
        assert mixed.results[1].retry_after is None
        assert mixed.results[0].remaining == 4  # read, not consumed: all or nothing
        await limits.adjust(fail_open, 4)  # never raises: applied locally
        await limits.set_cooldown("gw:cool", 5.0)
        blocked = await limits.acquire_many([fail_open], ["gw:cool"])
        assert not blocked.allowed and blocked.cooldown_key == "gw:cool"
        assert blocked.results[0].remaining == 0
        assert fallbacks(metrics, "open", "local") == 3
        assert fallbacks(metrics, "closed", "deny") == 1
    finally:
        await client.aclose()

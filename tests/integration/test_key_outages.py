"""API keys through real Postgres and Redis outages (Postgres behind a TCP proxy we cut
or freeze; the shared server is never touched):

- a key in use keeps working from its stale entry while Postgres is down, and is still
  dropped when a revocation arrives through Redis;
- a revocation committed while Redis is down reaches the cache through Postgres
  LISTEN/NOTIFY within a second (measured), also when made by plain SQL;
- the LISTEN connection comes back after a cut and revalidates everything;
- with Postgres hung, authentication answers within the lookup deadline (p99 printed)
  and a breaker keeps the hung database from costing every request that deadline.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest
import redis.asyncio as aioredis

from ext_proc.auth.authenticator import Authenticator, AuthError
from ext_proc.auth.keys import generate_key, hash_key
from ext_proc.auth.store import KEY_KIND, create_key, key_cache, revoke_key
from ext_proc.metrics import Metrics
from ext_proc.stores.cache import CacheUnavailable
from ext_proc.stores.circuit import CircuitBreaker
from ext_proc.stores.invalidation import InvalidationListener, PostgresInvalidationListener
from ext_proc.stores.postgres import create_pool
from ext_proc.stores.redis import create_redis
from tests.conftest import poll_async
from tests.integration.conftest import Cli
from tests.integration.tcp_proxy import TcpProxy

pytestmark = pytest.mark.integration

GATEWAY = """\
providers:
  mock: {type: openai, base_url: "http://127.0.0.1:8001"}
applications:
  support-bot: {org: acme}
"""


@pytest.fixture
def gateway_yaml() -> str:
    return GATEWAY


class Clocks:
    """Fake freshness clocks (the cache's ages); deadlines and timeouts stay real."""

    def __init__(self) -> None:
        self.offset = 0.0

    def mono(self) -> float:
        return time.monotonic() + self.offset

    def wall(self) -> float:
        return time.time() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


@pytest.fixture
def proxy(pg_server_url: str) -> Iterator[TcpProxy]:
    proxy = TcpProxy.for_url(pg_server_url)
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.close()


@pytest.fixture
async def proxied_pool(
    proxy: TcpProxy, pool: asyncpg.Pool, migrated_url: str
) -> AsyncIterator[asyncpg.Pool]:
    """A key-lookup pool (as the server makes it) reaching Postgres through ``proxy``."""
    keys_pool = await create_pool(
        proxy.url(migrated_url), min_size=0, max_size=2, connect_timeout=2.0
    )
    try:
        yield keys_pool
    finally:
        keys_pool.terminate()


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = create_redis(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


# Rounds per client in the hung-Postgres test (10 clients, one call each 50 ms: ~6 s).
ROUNDS = 100


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


async def test_a_stale_key_works_while_postgres_is_down_and_a_redis_revocation_drops_it(
    pool: asyncpg.Pool,
    proxied_pool: asyncpg.Pool,
    proxy: TcpProxy,
    redis: aioredis.Redis,
    redis_url: str,
    redis_prefix: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    new = await create_key(pool, "support-bot")
    other = await create_key(pool, "support-bot")
    clocks, metrics = Clocks(), Metrics()
    cache = key_cache(
        proxied_pool,
        redis=redis,
        prefix=redis_prefix,
        metrics=metrics,
        postgres_breaker=CircuitBreaker("postgres", metrics),
        clock=clocks.mono,
        wall_clock=clocks.wall,
    )
    auth = Authenticator(cache)
    listener = InvalidationListener(redis_url, redis_prefix)
    listener.subscribe(KEY_KIND, cache.invalidate)
    await listener.start()
    try:
        assert await listener.wait_connected(10)
        assert (await auth.authenticate(bearer(new.key))).key_id == new.info.key_id
        assert (await auth.authenticate(bearer(other.key))).key_id == other.info.key_id

        proxy.cut()  # Postgres "stopped" for this replica
        clocks.advance(15 * 60)  # a quarter of an hour into the outage
        for _ in range(3):
            assert (await auth.authenticate(bearer(new.key))).key_id == new.info.key_id
        stale = metrics.registry.get_sample_value(
            "ext_proc_cache_stale_served_total", {"cache": "keys", "reason": "unavailable"}
        )
        assert stale == 3
        with pytest.raises(CacheUnavailable):  # a key it never saw cannot be checked: 503
            await auth.authenticate(bearer(generate_key()))

        # Revoked (by someone who reaches Postgres): the Redis message drops the stale entry.
        started = time.monotonic()
        await revoke_key(pool, new.info.key_id, redis=redis, prefix=redis_prefix)

        async def refused() -> bool:
            try:
                await auth.authenticate(bearer(new.key))
            except CacheUnavailable:
                return True
            return False

        assert await poll_async(refused, timeout=5, interval=0.005)
        elapsed = time.monotonic() - started
        # The other key is untouched and still served from its stale entry.
        assert (await auth.authenticate(bearer(other.key))).key_id == other.info.key_id
        with capsys.disabled():
            print(
                f"\nPostgres down 15 min (fake clock): stale key served; revoked through "
                f"Redis -> refused {1000 * elapsed:.1f} ms later"
            )
        assert elapsed < 1.0

        proxy.restore()  # back: the revoked key is a 401 now, the other one fresh again
        clocks.advance(2.5)  # past the breaker's open time

        async def revoked() -> bool:
            try:
                await auth.authenticate(bearer(new.key))
            except AuthError as exc:
                return exc.reason == "revoked"
            except CacheUnavailable:
                return False
            return False

        assert await poll_async(revoked, timeout=10, interval=0.05)
    finally:
        await listener.close()
        await cache.close()


async def test_a_revocation_while_redis_is_down_arrives_through_postgres_notify(
    cli: Cli,
    pool: asyncpg.Pool,
    migrated_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    new = await create_key(pool, "support-bot")
    dead_redis = create_redis("redis://127.0.0.1:1/0")  # nothing listens there
    cache = key_cache(pool, redis=dead_redis, prefix="gwtest:dead:")
    auth = Authenticator(cache)
    listener = PostgresInvalidationListener(migrated_url)
    listener.subscribe(KEY_KIND, cache.drop)
    await listener.start()
    try:
        assert await listener.wait_connected(10)
        assert (await auth.authenticate(bearer(new.key))).key_id == new.info.key_id
        monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")  # Redis is down

        seen: list[float] = []

        async def watch() -> None:
            while True:
                try:
                    await auth.authenticate(bearer(new.key))
                except AuthError as exc:
                    assert exc.reason == "revoked"
                    seen.append(time.monotonic())
                    return
                await asyncio.sleep(0.002)

        watcher = asyncio.create_task(watch())
        started = time.monotonic()
        code, _, err = await cli("keys", "revoke", new.info.key_id)
        returned = time.monotonic()
        assert code == 0, err  # effective: Postgres carried it
        assert "could not publish on Redis" in err and "LISTEN/NOTIFY" in err
        await asyncio.wait_for(watcher, 5)

        # From the commit itself: revoked by plain SQL, ten keys one after the other.
        commit_to_refusal = []
        for _ in range(10):
            other = await create_key(pool, "support-bot")
            await auth.authenticate(bearer(other.key))
            await pool.execute(
                "UPDATE api_keys SET revoked_at = now() WHERE id = $1", other.info.key_id
            )
            committed = time.monotonic()

            async def refused(key: str = other.key) -> bool:
                try:
                    await auth.authenticate(bearer(key))
                except AuthError:
                    return True
                return False

            assert await poll_async(refused, timeout=5, interval=0.001)
            commit_to_refusal.append(time.monotonic() - committed)
    finally:
        await listener.close()
        await dead_redis.aclose()
    propagation = seen[0] - started
    with capsys.disabled():
        print(
            f"\nRedis down: revocation refused through LISTEN/NOTIFY {1000 * propagation:.0f} ms "
            f"after `keys revoke` started ({1000 * (returned - started):.0f} ms command); "
            f"from the commit: median {1000 * statistics.median(commit_to_refusal):.1f} ms, "
            f"max {1000 * max(commit_to_refusal):.1f} ms over 10 SQL revocations"
        )
    assert propagation < 1.0 + (returned - started)
    assert max(commit_to_refusal) < 1.0


async def test_sql_changes_notify_and_unrelated_ones_do_not(
    pool: asyncpg.Pool, migrated_url: str
) -> None:
    first = await create_key(pool, "support-bot")
    second = await create_key(pool, "support-bot")
    heard: list[str] = []
    listener = PostgresInvalidationListener(migrated_url)
    listener.subscribe(KEY_KIND, heard.append)
    await listener.start()
    try:
        assert await listener.wait_connected(10)
        assert heard == ["*"]  # connecting revalidates everything
        await pool.execute(
            "UPDATE api_keys SET last_used_at = now() WHERE id = $1", first.info.key_id
        )
        await pool.execute(
            "UPDATE api_keys SET revoked_at = now() WHERE id = $1", first.info.key_id
        )
        assert await poll_async(lambda: len(heard) == 2, timeout=5, interval=0.005)
        # Commit order: the unrelated update before it sent nothing.
        assert heard == ["*", hash_key(first.key)]
        await pool.execute("UPDATE applications SET name = 'support-bot-2'")
        assert await poll_async(lambda: len(heard) == 3, timeout=5, interval=0.005)
        assert heard[2] == "*"  # cached records carry the app name: revalidate all
        await pool.execute(
            "UPDATE api_keys SET expires_at = now() + interval '1 hour' WHERE id = $1",
            second.info.key_id,
        )
        assert await poll_async(lambda: len(heard) == 4, timeout=5, interval=0.005)
        assert heard[3] == hash_key(second.key)
    finally:
        await listener.close()


async def test_the_listen_connection_comes_back_after_a_cut(
    pool: asyncpg.Pool, proxy: TcpProxy, migrated_url: str
) -> None:
    new = await create_key(pool, "support-bot")
    heard: list[str] = []
    listener = PostgresInvalidationListener(proxy.url(migrated_url), ping_every=0.5)
    listener.subscribe(KEY_KIND, heard.append)
    await listener.start()
    try:
        assert await listener.wait_connected(10)
        proxy.cut()
        assert await poll_async(lambda: not listener.connected, timeout=10, interval=0.01)
        proxy.restore()
        assert await poll_async(lambda: listener.connections == 2, timeout=15, interval=0.01)
        assert heard == ["*", "*"]  # may have missed messages: revalidate everything
        await revoke_key(pool, new.info.key_id)
        assert await poll_async(lambda: len(heard) == 3, timeout=5, interval=0.005)
        assert heard[2] == hash_key(new.key)

        # Hung instead of cut: the ping notices within ping_every + its timeout.
        proxy.freeze()
        assert await poll_async(lambda: not listener.connected, timeout=10, interval=0.01)
        proxy.thaw()
        assert await poll_async(lambda: listener.connections == 3, timeout=15, interval=0.01)
    finally:
        await listener.close()


async def test_a_hung_postgres_answers_fast_and_the_breaker_spares_most_requests(
    pool: asyncpg.Pool,
    proxied_pool: asyncpg.Pool,
    proxy: TcpProxy,
    capsys: pytest.CaptureFixture[str],
) -> None:
    keys = [await create_key(pool, "support-bot") for _ in range(20)]
    clocks, metrics = Clocks(), Metrics()
    breaker = CircuitBreaker("postgres", metrics)
    cache = key_cache(
        proxied_pool,
        metrics=metrics,
        postgres_breaker=breaker,
        clock=clocks.mono,
        wall_clock=clocks.wall,
    )
    auth = Authenticator(cache)
    for new in keys:
        await auth.authenticate(bearer(new.key))

    proxy.freeze()  # connections accepted, nothing answered
    clocks.advance(120)  # every entry past its freshness: each lookup needs Postgres
    latencies: list[float] = []
    outcomes: dict[str, int] = {"ok": 0, "unavailable": 0, "refused": 0}
    unknown = [generate_key() for _ in range(ROUNDS // 4)]

    async def client(index: int) -> None:
        for round_ in range(ROUNDS):
            key = (
                unknown[round_ // 4]
                if index == 0 and round_ % 4 == 0
                else keys[(index + round_) % 20].key
            )
            started = time.perf_counter()
            try:
                await auth.authenticate(bearer(key))
                outcomes["ok"] += 1
            except CacheUnavailable:
                outcomes["unavailable"] += 1
            except AuthError:
                outcomes["refused"] += 1
            latencies.append(time.perf_counter() - started)
            await asyncio.sleep(0.05)  # 10 clients: about 200 authentications a second

    try:
        started = time.monotonic()
        await asyncio.gather(*(client(i) for i in range(10)))
        elapsed = time.monotonic() - started
    finally:
        proxy.thaw()
    latencies.sort()
    p50 = statistics.median(latencies)
    p99 = statistics.quantiles(latencies, n=100)[98]
    waited = sum(1 for latency in latencies if latency > 0.1)
    with capsys.disabled():
        print(
            f"\nPostgres hung {elapsed:.1f}s: {len(latencies)} authentications, p50 "
            f"{1000 * p50:.2f} ms, p99 {1000 * p99:.1f} ms, max {1000 * latencies[-1]:.0f} ms; "
            f"{waited} waited > 100 ms; breaker opened {breaker.openings}x; {outcomes}"
        )
    # Every cached key kept working; only the never-seen keys were refused (503).
    assert outcomes["refused"] == 0
    assert outcomes["unavailable"] == ROUNDS // 4
    assert outcomes["ok"] == len(latencies) - outcomes["unavailable"]
    assert latencies[-1] < 1.0  # bounded by the 0.4 s deadline, far below Envoy's 2 s
    assert waited < len(latencies) / 10  # the breaker: most requests did not wait at all
    assert breaker.openings >= 1

    # Postgres answers again: a half-open probe closes the breaker, entries are fresh.
    recovered_at: list[float] = []

    async def fresh() -> bool:
        await auth.authenticate(bearer(keys[0].key))
        if not cache.loader_failing and breaker.state_name == "closed":
            recovered_at.append(time.monotonic())
            return True
        return False

    thawed = time.monotonic()
    assert await poll_async(fresh, timeout=15, interval=0.05)
    with capsys.disabled():
        print(f"Postgres thawed: lookups fresh again after {recovered_at[0] - thawed:.2f}s")
    await cache.close()

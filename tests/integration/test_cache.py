"""The memory → Redis → Postgres key cache against the real services: which tier answers,
negative caching in both tiers, single flight, tombstones, and Redis being down."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest
import redis.asyncio as aioredis

from ext_proc.auth.keys import KeyRecord, KeyRecordCodec, hash_key
from ext_proc.auth.store import create_key, key_cache, lookup_key, revoke_key
from ext_proc.metrics import Metrics
from ext_proc.stores.cache import TieredCache, invalidate_shared, redis_key
from ext_proc.stores.redis import create_redis

pytestmark = pytest.mark.integration

GATEWAY = """\
providers:
  mock: {type: openai, base_url: "http://127.0.0.1:8001"}
applications:
  support-bot: {org: acme}
"""


@pytest.fixture
def gateway_yaml() -> str:
    """What the shared ``pool`` fixture applies."""
    return GATEWAY


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = create_redis(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


def lookups(metrics: Metrics, tier: str) -> float:
    value = metrics.registry.get_sample_value(
        "ext_proc_cache_lookups_total", {"cache": "keys", "tier": tier}
    )
    return value or 0.0


class CountingLoader:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self.calls = 0

    async def __call__(self, key_hash: str) -> KeyRecord | None:
        self.calls += 1
        return await lookup_key(self.pool, key_hash)


async def test_memory_then_redis_then_postgres(
    pool: asyncpg.Pool, redis: aioredis.Redis, redis_prefix: str
) -> None:
    new = await create_key(pool, "support-bot")
    key_hash = hash_key(new.key)
    first_metrics, second_metrics = Metrics(), Metrics()
    first = key_cache(pool, redis=redis, prefix=redis_prefix, metrics=first_metrics)
    record = await first.get(key_hash)
    assert record is not None and record.key_id == new.info.key_id
    assert await first.get(key_hash) == record
    assert (lookups(first_metrics, "postgres"), lookups(first_metrics, "memory")) == (1, 1)
    # Redis keeps it for the stale window (an hour), stamped with its load time: fresh
    # for other replicas for 60 s, their fallback while Postgres is down after that.
    ttl = await redis.pttl(redis_key(redis_prefix, "keys", key_hash))
    assert 3_595_000 < ttl <= 3_600_000

    # Another replica: nothing in its memory, the entry comes from Redis.
    second = key_cache(pool, redis=redis, prefix=redis_prefix, metrics=second_metrics)
    assert await second.get(key_hash) == record
    assert lookups(second_metrics, "redis") == 1
    assert second.stats().loads == 0


async def test_unknown_keys_are_cached_briefly_in_both_tiers(
    pool: asyncpg.Pool, redis: aioredis.Redis, redis_prefix: str
) -> None:
    loader = CountingLoader(pool)
    metrics = Metrics()
    cache = TieredCache(
        "keys", loader, codec=KeyRecordCodec(), redis=redis, prefix=redis_prefix, metrics=metrics
    )
    bad = hash_key("gwk_" + "Z" * 43)
    for _ in range(200):
        assert await cache.get(bad) is None
    assert loader.calls == 1
    assert (lookups(metrics, "miss"), lookups(metrics, "memory")) == (1, 199)
    ttl = await redis.pttl(redis_key(redis_prefix, "keys", bad))
    assert 0 < ttl <= 5_000

    other_loader = CountingLoader(pool)
    other = TieredCache(
        "keys", other_loader, codec=KeyRecordCodec(), redis=redis, prefix=redis_prefix
    )
    assert await other.get(bad) is None
    assert other_loader.calls == 0  # answered by Redis' negative entry


async def test_fifty_concurrent_misses_make_one_query(
    pool: asyncpg.Pool, redis: aioredis.Redis, redis_prefix: str
) -> None:
    new = await create_key(pool, "support-bot")
    loader = CountingLoader(pool)
    cache = TieredCache("keys", loader, codec=KeyRecordCodec(), redis=redis, prefix=redis_prefix)
    results = await asyncio.gather(*(cache.get(hash_key(new.key)) for _ in range(50)))
    assert loader.calls == 1
    assert {r.key_id for r in results if r is not None} == {new.info.key_id}
    assert len(results) == 50 and all(r is not None for r in results)


class OpenBreaker:
    def __init__(self) -> None:
        self.failures = self.successes = 0

    def allow(self) -> bool:
        return False

    def record_success(self) -> None:
        self.successes += 1

    def record_failure(self) -> None:
        self.failures += 1


async def test_lookups_work_without_redis(
    pool: asyncpg.Pool, redis: aioredis.Redis, redis_prefix: str
) -> None:
    new = await create_key(pool, "support-bot")
    key_hash = hash_key(new.key)
    dead = create_redis("redis://127.0.0.1:1/0")  # nothing listens there
    metrics = Metrics()
    try:
        cache = key_cache(pool, redis=dead, prefix=redis_prefix, metrics=metrics)
        record = await cache.get(key_hash)
        assert record is not None and record.key_id == new.info.key_id
        assert cache.stats().redis_errors == 2  # the GET and the SET, neither raised
        assert (
            metrics.registry.get_sample_value("ext_proc_dependency_up", {"dependency": "redis"})
            == 0
        )
        assert await cache.get(key_hash) == record  # memory still works
        assert await cache.get(hash_key("gwk_" + "Q" * 43)) is None
    finally:
        await dead.aclose()

    breaker = OpenBreaker()
    cache = key_cache(pool, redis=redis, prefix=redis_prefix, breaker=breaker)
    assert await cache.get(key_hash) is not None
    assert await redis.exists(redis_key(redis_prefix, "keys", key_hash)) == 0  # not even tried
    assert breaker.failures == breaker.successes == 0


async def test_a_tombstone_keeps_stale_values_out_of_redis(
    pool: asyncpg.Pool, redis: aioredis.Redis, redis_prefix: str
) -> None:
    new = await create_key(pool, "support-bot")
    key_hash = hash_key(new.key)
    # A replica read the key just before it was revoked, and writes it back afterwards.
    stale = await lookup_key(pool, key_hash)
    await revoke_key(pool, new.info.key_id, redis=redis, prefix=redis_prefix)

    async def read_before_the_revocation(_: str) -> KeyRecord | None:
        return stale

    slow = TieredCache(
        "keys", read_before_the_revocation, codec=KeyRecordCodec(), redis=redis, prefix=redis_prefix
    )
    assert await slow.get(key_hash) == stale
    assert await redis.get(redis_key(redis_prefix, "keys", key_hash)) == b"x"

    fresh = key_cache(pool, redis=redis, prefix=redis_prefix)
    record = await fresh.get(key_hash)
    assert record is not None and record.revoked_at is not None
    assert fresh.stats().loads == 1

    # "*" removes every entry of the cache from Redis.
    other = await create_key(pool, "support-bot")
    await fresh.get(hash_key(other.key))
    await invalidate_shared(redis, redis_prefix, "keys", "key", "*")
    assert [k async for k in redis.scan_iter(match=f"{redis_prefix}cache:keys:*")] == []

"""TieredCache without Redis: the memory tier's LRU bound and TTLs, negative caching,
single flight, invalidation during a load, loader failures and the metric by tier."""

from __future__ import annotations

import asyncio

import pytest

from ext_proc.metrics import Metrics
from ext_proc.stores.cache import CacheUnavailable, TieredCache


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class TextCodec:
    def encode(self, value: str) -> bytes:
        return value.encode()

    def decode(self, data: bytes) -> str:
        return data.decode()


class Loader:
    """Answers from a dict, counting calls; ``gate`` (when set) holds every load."""

    def __init__(self, values: dict[str, str]) -> None:
        self.values = values
        self.calls: list[str] = []
        self.gate: asyncio.Event | None = None
        self.fail: Exception | None = None

    async def __call__(self, id: str) -> str | None:
        self.calls.append(id)
        value = self.values.get(id)  # read first: a slow load returns what it read
        if self.gate is not None:
            await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        return value


def make(
    loader: Loader, clock: Clock | None = None, metrics: Metrics | None = None, **options: float
) -> TieredCache[str]:
    return TieredCache(
        "test",
        loader,
        codec=TextCodec(),
        clock=clock or Clock(),
        metrics=metrics,
        **options,  # type: ignore[arg-type]
    )


def lookups(metrics: Metrics, tier: str) -> float:
    value = metrics.registry.get_sample_value(
        "ext_proc_cache_lookups_total", {"cache": "test", "tier": tier}
    )
    return value or 0.0


async def test_hits_come_from_memory_until_the_ttl_passes() -> None:
    loader, clock, metrics = Loader({"a": "A"}), Clock(), Metrics()
    cache = make(loader, clock, metrics, ttl=60)
    assert await cache.get("a") == "A"
    clock.now += 59.9
    assert await cache.get("a") == "A"
    assert loader.calls == ["a"]
    clock.now += 0.2
    assert await cache.get("a") == "A"
    assert loader.calls == ["a", "a"]
    assert (lookups(metrics, "postgres"), lookups(metrics, "memory")) == (2, 1)


async def test_unknown_ids_are_cached_for_the_shorter_negative_ttl() -> None:
    loader, clock, metrics = Loader({}), Clock(), Metrics()
    cache = make(loader, clock, metrics, ttl=60, negative_ttl=5)
    for _ in range(100):
        assert await cache.get("bad") is None
    assert loader.calls == ["bad"]
    assert (lookups(metrics, "miss"), lookups(metrics, "memory")) == (1, 99)
    clock.now += 5.01
    assert await cache.get("bad") is None
    assert loader.calls == ["bad", "bad"]


async def test_the_memory_tier_is_a_bounded_lru() -> None:
    loader = Loader({k: k.upper() for k in "abcd"})
    cache = make(loader, max_entries=3)
    for key in "abc":
        await cache.get(key)
    await cache.get("a")  # now b is the least recently used
    await cache.get("d")
    assert cache.stats().entries == 3
    loader.calls.clear()
    for key in "acd":
        await cache.get(key)
    assert loader.calls == []
    await cache.get("b")
    assert loader.calls == ["b"]


async def test_concurrent_misses_share_one_load() -> None:
    loader = Loader({"a": "A"})
    loader.gate = asyncio.Event()
    cache = make(loader)
    waiters = [asyncio.create_task(cache.get("a")) for _ in range(50)]
    for _ in range(10):  # let every waiter reach the shared load
        await asyncio.sleep(0)
    loader.gate.set()
    assert await asyncio.gather(*waiters) == ["A"] * 50
    assert loader.calls == ["a"]


async def test_a_caller_giving_up_does_not_cancel_the_others() -> None:
    loader = Loader({"a": "A"})
    loader.gate = asyncio.Event()
    cache = make(loader)
    first = asyncio.create_task(cache.get("a"))
    second = asyncio.create_task(cache.get("a"))
    await asyncio.sleep(0)
    first.cancel()
    loader.gate.set()
    assert await second == "A"
    assert first.cancelled() and loader.calls == ["a"]


async def test_a_load_spanning_an_invalidation_is_not_kept() -> None:
    loader = Loader({"a": "old"})
    loader.gate = asyncio.Event()
    cache = make(loader)
    pending = asyncio.create_task(cache.get("a"))
    for _ in range(10):  # until the load has read the old value
        await asyncio.sleep(0)
    assert loader.calls == ["a"]
    loader.values["a"] = "new"  # changed in the database; the invalidation arrives mid-load
    cache.invalidate("a")
    loader.gate.set()
    assert await pending == "old"  # what that caller's load read; it is not kept:
    loader.gate = None
    assert cache.stats().entries == 0
    assert await cache.get("a") == "new"
    assert loader.calls == ["a", "a"]


async def test_invalidate_one_or_everything() -> None:
    loader = Loader({"a": "A", "b": "B"})
    cache = make(loader)
    await cache.get("a")
    await cache.get("b")
    cache.invalidate("a")
    assert cache.stats().entries == 1
    await cache.get("a")
    # "*" (a listener reconnected: messages may have been missed): every entry is
    # revalidated by its next lookup, but kept as a fallback should the loader be down.
    cache.invalidate("*")
    assert cache.stats().entries == 2
    await cache.get("a")
    assert loader.calls == ["a", "b", "a", "a"]
    await cache.invalidate_everywhere("b")  # no Redis: memory only, no error
    assert cache.stats().entries == 1


async def test_loader_failures_raise_and_are_not_cached() -> None:
    loader = Loader({"a": "A"})
    loader.fail = ConnectionRefusedError("postgres is down")
    cache = make(loader)
    with pytest.raises(CacheUnavailable) as info:
        await cache.get("a")
    assert isinstance(info.value.__cause__, ConnectionRefusedError)
    loader.fail = None
    assert await cache.get("a") == "A"
    assert loader.calls == ["a", "a"]


def test_sizes_and_ttls_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        make(Loader({}), max_entries=0)
    with pytest.raises(ValueError, match="positive"):
        make(Loader({}), ttl=0)

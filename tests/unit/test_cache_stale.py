"""TieredCache when its loader (Postgres) is down or hung, on fake clocks: known-good
entries keep answering up to ``stale_ttl`` (a 10-minute outage and past it), unknown ids
are never answered from a stale entry, invalidations still drop stale entries, entries
in use are refreshed in the background, and a hung loader costs at most the deadline
until its breaker opens."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

import pytest

from ext_proc.auth.authenticator import Authenticator, AuthError
from ext_proc.auth.keys import KeyRecord, KeyRecordCodec, generate_key, hash_key
from ext_proc.auth.store import (
    DEFAULT_KEY_TTL,
    KEY_LOOKUP_DEADLINE,
    KEY_REFRESH_AFTER,
    KEY_STALE_TTL,
    key_cache,
)
from ext_proc.metrics import Metrics
from ext_proc.stores.cache import CacheUnavailable, TieredCache
from ext_proc.stores.circuit import CircuitBreaker


class Clocks:
    """A monotonic and a wall clock moving together."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.wall_now = 1_700_000_000.0

    def mono(self) -> float:
        return self.now

    def wall(self) -> float:
        return self.wall_now

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.wall_now += seconds


class TextCodec:
    def encode(self, value: str) -> bytes:
        return value.encode()

    def decode(self, data: bytes) -> str:
        return data.decode()


class Loader:
    """Answers from a dict; ``down`` makes it refuse, ``hang`` makes it never answer."""

    def __init__(self, values: dict[str, str]) -> None:
        self.values = values
        self.calls: list[str] = []
        self.down = False
        self.hang = False

    async def __call__(self, id: str) -> str | None:
        self.calls.append(id)
        if self.hang:
            await asyncio.Event().wait()
        if self.down:
            raise ConnectionRefusedError("postgres is down")
        return self.values.get(id)


def make(
    loader: Loader, clocks: Clocks, metrics: Metrics | None = None, **options: object
) -> TieredCache[str]:
    defaults: dict[str, object] = {
        "ttl": 60.0,
        "refresh_after": 45.0,
        "stale_ttl": 3600.0,
        "deadline": 0.05,
        "load_timeout": 0.5,
    }
    defaults.update(options)
    return TieredCache(
        "keys",
        loader,
        codec=TextCodec(),
        clock=clocks.mono,
        wall_clock=clocks.wall,
        metrics=metrics,
        **defaults,  # type: ignore[arg-type]
    )


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, {"cache": "keys", **labels}) or 0.0


async def settle() -> None:
    """Let background loads (refresh-ahead, probes) run to their end."""
    for _ in range(20):
        await asyncio.sleep(0)


async def test_a_key_in_use_keeps_working_through_a_ten_minute_outage() -> None:
    loader, clocks, metrics = Loader({"a": "A"}), Clocks(), Metrics()
    cache = make(loader, clocks, metrics)
    assert await cache.get("a") == "A"
    loader.down = True
    # A request every 5 s for 10 minutes, then every minute up to the hour.
    for _ in range(120):
        clocks.advance(5)
        assert await cache.get("a") == "A"
        await settle()
    for _ in range(49):
        clocks.advance(60)
        assert await cache.get("a") == "A"
        await settle()
    assert cache.loader_failing
    stale = sample(metrics, "ext_proc_cache_stale_served_total", reason="unavailable")
    assert stale > 150  # every lookup past the 60 s of freshness
    assert sample(metrics, "ext_proc_cache_lookups_total", tier="stale") == stale
    # The background retries are paced (once per id and second), not once per request.
    assert len(loader.calls) < 200
    # Past the stale window (an hour after the last successful load) it is refused.
    clocks.advance(60)
    with pytest.raises(CacheUnavailable):
        await cache.get("a")
    # Postgres is back: the key works again, fresh.
    loader.down = False
    assert await cache.get("a") == "A"
    assert not cache.loader_failing


async def test_unknown_and_never_loaded_ids_are_refused_during_an_outage() -> None:
    loader, clocks = Loader({"a": "A"}), Clocks()
    cache = make(loader, clocks, negative_ttl=5.0)
    assert await cache.get("bad") is None  # known unknown: answered from memory for 5 s
    loader.down = True
    assert await cache.get("bad") is None
    clocks.advance(5.1)
    with pytest.raises(CacheUnavailable):  # a "not found" is never served stale
        await cache.get("bad")
    with pytest.raises(CacheUnavailable):  # never loaded: nothing to fall back on
        await cache.get("a")


async def test_an_invalidation_drops_a_stale_entry() -> None:
    loader, clocks = Loader({"a": "A", "b": "B"}), Clocks()
    cache = make(loader, clocks)
    assert await cache.get("a") == "A"
    assert await cache.get("b") == "B"
    loader.down = True
    clocks.advance(120)
    assert await cache.get("a") == "A"  # stale, served
    cache.invalidate("a")  # revoked: heard through Redis or Postgres while it is down
    with pytest.raises(CacheUnavailable):
        await cache.get("a")
    # "*" (a listener reconnected) only asks for revalidation: still a fallback.
    cache.invalidate("*")
    assert await cache.get("b") == "B"


async def test_entries_in_use_are_refreshed_in_the_background() -> None:
    loader, clocks = Loader({"a": "old"}), Clocks()
    cache = make(loader, clocks)
    assert await cache.get("a") == "old"
    loader.values["a"] = "new"
    clocks.advance(44)
    assert await cache.get("a") == "old"
    assert loader.calls == ["a"]
    clocks.advance(2)  # past refresh_after: answered at once, reloaded behind
    assert await cache.get("a") == "old"
    await settle()
    assert loader.calls == ["a", "a"]
    assert await cache.get("a") == "new"
    clocks.advance(59)  # fresh for 60 s from the refresh, not from the first load
    assert await cache.get("a") == "new"
    assert len(loader.calls) == 2


async def test_a_hung_loader_costs_the_deadline_until_its_breaker_opens() -> None:
    loader, clocks, metrics = Loader({"a": "A"}), Clocks(), Metrics()
    breaker = CircuitBreaker("postgres", metrics, failure_threshold=3, open_seconds=2.0)
    cache = make(loader, clocks, metrics, deadline=0.05, load_timeout=0.2, loader_breaker=breaker)
    assert await cache.get("a") == "A"
    clocks.advance(61)
    loader.hang = True
    waits = []
    for i in range(5):
        started = time.monotonic()
        with pytest.raises(CacheUnavailable):
            await cache.get(f"new-{i}")  # never loaded: refused once the deadline passes
        waits.append(time.monotonic() - started)
    # Three loads past the deadline opened the breaker: the next ones are not tried.
    assert breaker.state_name == "open"
    assert loader.calls == ["a", "new-0", "new-1", "new-2"]
    assert all(wait < 1.0 for wait in waits)  # the deadline (0.05 s), never a load timeout
    started = time.monotonic()
    for _ in range(100):
        assert await cache.get("a") == "A"  # stale, at once: nobody waits on the hung loader
    assert time.monotonic() - started < 1.0
    assert sample(metrics, "ext_proc_cache_load_failures_total", reason="timeout") == 3
    assert sample(metrics, "ext_proc_cache_load_failures_total", reason="circuit_open") >= 1
    await cache.close()


async def test_a_slow_load_still_fills_the_cache_after_the_deadline() -> None:
    gate = asyncio.Event()

    async def slow(id: str) -> str | None:
        await gate.wait()
        return id.upper()

    clocks = Clocks()
    cache: TieredCache[str] = TieredCache(
        "keys",
        slow,
        codec=TextCodec(),
        deadline=0.02,
        load_timeout=5.0,
        clock=clocks.mono,
        wall_clock=clocks.wall,
    )
    with pytest.raises(CacheUnavailable, match="deadline"):
        await cache.get("a")
    gate.set()
    await settle()
    assert await cache.get("a") == "A"  # the load ran on and was kept
    assert not cache.loader_failing


async def test_authentication_through_an_outage_keeps_checking_expiry() -> None:
    """A stale record still says when the key expires: an expired key is refused even
    while the key cannot be reloaded."""
    clocks = Clocks()
    key = generate_key()
    expires = datetime.fromtimestamp(clocks.wall_now, UTC) + timedelta(minutes=5)
    record = KeyRecord("key_0123456789ab", "app", "org", "default", key[:12], expires, None)
    down = False
    calls = 0

    async def load(key_hash: str) -> KeyRecord | None:
        nonlocal calls
        calls += 1
        if down:
            raise ConnectionRefusedError("postgres is down")
        return record if key_hash == hash_key(key) else None

    cache: TieredCache[KeyRecord] = TieredCache(
        "keys",
        load,
        codec=KeyRecordCodec(),
        ttl=DEFAULT_KEY_TTL,
        refresh_after=KEY_REFRESH_AFTER,
        stale_ttl=KEY_STALE_TTL,
        deadline=KEY_LOOKUP_DEADLINE,
        clock=clocks.mono,
        wall_clock=clocks.wall,
    )
    auth = Authenticator(cache, clock=lambda: datetime.fromtimestamp(clocks.wall_now, UTC))
    headers = {"authorization": f"Bearer {key}"}
    assert (await auth.authenticate(headers)).key_id == record.key_id
    down = True
    clocks.advance(240)  # past its freshness: served stale
    assert (await auth.authenticate(headers)).key_id == record.key_id
    clocks.advance(120)  # past its expiry
    with pytest.raises(AuthError) as info:
        await auth.authenticate(headers)
    assert info.value.reason == "expired"
    assert calls >= 2  # it did try Postgres


async def test_without_a_database_keys_cannot_be_checked() -> None:
    cache = key_cache(None)
    with pytest.raises(CacheUnavailable, match="no database configured"):
        await cache.get(hash_key(generate_key()))


def test_option_bounds() -> None:
    loader, clocks = Loader({}), Clocks()
    with pytest.raises(ValueError, match="refresh_after"):
        make(loader, clocks, refresh_after=60.0)
    with pytest.raises(ValueError, match="stale_ttl"):
        make(loader, clocks, stale_ttl=30.0)
    with pytest.raises(ValueError, match="load_timeout"):
        make(loader, clocks, deadline=1.0, load_timeout=0.5)

"""API keys in Postgres: create, list, revoke, rotate, and the lookup behind authentication.

Keys belong to an application's environment ("default" unless given). The plaintext key
exists only in ``NewKey.key``, returned once by ``create_key`` / ``rotate_key``; the
database holds its sha256 and visible prefix (``ext_proc.auth.keys``).

Revoking or rotating a key changes what caches hold. Two channels tell every replica:
the commit itself sends ``NOTIFY ext_proc_invalidate, 'key:<hash>'`` (a trigger,
schema/0005_key_notify.sql, so plain SQL changes are heard too), and after it these
functions tombstone the key's Redis cache entry and publish ``key:<hash>`` when given a
Redis client (``invalidate_shared``). Every replica drops the key within about a second
while either Redis or Postgres reaches it; one that hears neither revalidates the key
when its entry's freshness ends (``DEFAULT_KEY_TTL``) and Postgres answers, and serves
it at most ``KEY_STALE_TTL`` after its last successful load otherwise.

How the key cache rides out outages (see ``ext_proc.stores.cache``): an entry is fresh
for ``DEFAULT_KEY_TTL`` (60 s) and renewed in the background after ``KEY_REFRESH_AFTER``
(45 s) while in use; a lookup waits for Postgres at most ``KEY_LOOKUP_DEADLINE``
(0.4 s, far below Envoy's 2 s ext_proc message timeout) and a breaker stops asking a
failing Postgres; while it cannot answer, a key loaded within ``KEY_STALE_TTL`` (1 h)
keeps working. A key never loaded (or unknown) cannot be checked then: 503.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

import asyncpg
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from ext_proc.auth.keys import (
    KeyRecord,
    KeyRecordCodec,
    generate_key,
    generate_key_id,
    hash_key,
    key_prefix,
)
from ext_proc.config.model import DEFAULT_ENVIRONMENT
from ext_proc.metrics import Metrics
from ext_proc.stores.cache import TieredCache, invalidate_shared
from ext_proc.stores.redis import Breaker

KEY_CACHE_NAME = "keys"  # the cache's metric label and Redis key part
KEY_KIND = "key"  # invalidation messages: "key:<sha256>" or "key:*"
DEFAULT_KEY_CACHE_SIZE = 10_000
DEFAULT_KEY_TTL = 60.0  # fresh: answered without asking Postgres
KEY_REFRESH_AFTER = 45.0  # a key in use is reloaded in the background from this age
KEY_STALE_TTL = 3600.0  # while Postgres cannot answer, keys loaded this recently work
KEY_LOOKUP_DEADLINE = 0.4  # the longest a request waits for a key's load
KEY_LOAD_TIMEOUT = 2.0  # the longest a load runs (in the background past the deadline)
DEFAULT_GRACE = 24 * 3600.0  # seconds a rotated key keeps working

KeyListStatus = Literal["active", "expired", "revoked", "rotating"]


class KeyStoreError(Exception):
    """A key operation cannot be done as asked; the message says why and what to do."""


class UnknownApplication(KeyStoreError):
    pass


class UnknownEnvironment(KeyStoreError):
    pass


class UnknownKey(KeyStoreError):
    pass


class KeyNotActive(KeyStoreError):
    pass


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """A key as listed (never the key itself)."""

    key_id: str
    app: str
    org: str
    environment: str
    prefix: str
    description: str | None
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    rotated_from: str | None  # the key this one replaced
    replaced_by: str | None  # the key that replaced this one (rotation)
    last_used_at: datetime | None

    def status(self, now: datetime) -> KeyListStatus:
        """``rotating``: replaced by a newer key, still valid until its grace ends."""
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= now:
            return "expired"
        if self.replaced_by is not None and self.expires_at is not None:
            return "rotating"
        return "active"


@dataclass(frozen=True, slots=True)
class NewKey:
    key: str  # the plaintext: shown once, stored nowhere
    info: KeyInfo
    replaced: KeyInfo | None = None  # rotate_key: the old key, with its grace end
    published: bool = False  # the old key's invalidation reached Redis
    publish_error: str | None = None


@dataclass(frozen=True, slots=True)
class RevokedKey:
    info: KeyInfo
    already_revoked: bool
    published: bool
    publish_error: str | None = None


_INFO = """
SELECT k.id, a.name AS app, o.name AS org, e.name AS environment, k.prefix, k.description,
       k.created_at, k.expires_at, k.revoked_at, k.rotated_from, k.last_used_at,
       (SELECT n.id FROM api_keys n WHERE n.rotated_from = k.id
         ORDER BY n.created_at DESC LIMIT 1) AS replaced_by
  FROM api_keys k
  JOIN applications a ON a.id = k.application_id
  JOIN organizations o ON o.id = a.organization_id
  JOIN application_environments e ON e.id = k.environment_id
"""

_LOOKUP = """
SELECT k.id, a.name AS app, o.name AS org, e.name AS environment, k.prefix,
       k.expires_at, k.revoked_at
  FROM api_keys k
  JOIN applications a ON a.id = k.application_id
  JOIN organizations o ON o.id = a.organization_id
  JOIN application_environments e ON e.id = k.environment_id
 WHERE k.key_hash = $1
"""


def _info(row: asyncpg.Record) -> KeyInfo:
    return KeyInfo(
        key_id=row["id"],
        app=row["app"],
        org=row["org"],
        environment=row["environment"],
        prefix=row["prefix"],
        description=row["description"],
        created_at=row["created_at"],
        expires_at=row["expires_at"],
        revoked_at=row["revoked_at"],
        rotated_from=row["rotated_from"],
        replaced_by=row["replaced_by"],
        last_used_at=row["last_used_at"],
    )


async def lookup_key(
    pool: asyncpg.Pool, key_hash: str, *, timeout: float | None = None
) -> KeyRecord | None:
    """The key whose sha256 (hex) is ``key_hash``, whatever its status; None if unknown.

    ``timeout`` bounds taking a connection, the query and giving it back (each)."""
    async with pool.acquire(timeout=timeout) as conn:
        row = await conn.fetchrow(_LOOKUP, key_hash, timeout=timeout)
    if row is None:
        return None
    return KeyRecord(
        key_id=row["id"],
        app=row["app"],
        org=row["org"],
        environment=row["environment"],
        prefix=row["prefix"],
        expires_at=row["expires_at"],
        revoked_at=row["revoked_at"],
    )


async def _no_database(key_hash: str) -> KeyRecord | None:
    raise ConnectionError("no database configured (DATABASE_URL): keys cannot be checked")


def key_cache(
    pool: asyncpg.Pool | None,
    *,
    redis: aioredis.Redis | None = None,
    prefix: str = "gw:",
    metrics: Metrics | None = None,
    breaker: Breaker | None = None,
    postgres_breaker: Breaker | None = None,
    max_entries: int = DEFAULT_KEY_CACHE_SIZE,
    ttl: float = DEFAULT_KEY_TTL,
    refresh_after: float | None = KEY_REFRESH_AFTER,
    stale_ttl: float = KEY_STALE_TTL,
    deadline: float | None = KEY_LOOKUP_DEADLINE,
    load_timeout: float | None = KEY_LOAD_TIMEOUT,
    clock: Callable[[], float] = time.monotonic,
    wall_clock: Callable[[], float] = time.time,
) -> TieredCache[KeyRecord]:
    """The key-hash -> KeyRecord cache authentication reads (memory → Redis → Postgres).

    ``breaker`` guards Redis, ``postgres_breaker`` the lookups in ``pool`` (a small pool
    of its own is best: usage writes cannot then delay authentication). Subscribe it to
    invalidations: ``redis_listener.subscribe(KEY_KIND, cache.invalidate)`` and
    ``postgres_listener.subscribe(KEY_KIND, cache.drop)``.
    """
    loader = (
        _no_database if pool is None else functools.partial(lookup_key, pool, timeout=load_timeout)
    )
    if refresh_after is not None and refresh_after >= ttl:
        refresh_after = None  # a short test TTL: no refresh-ahead
    return TieredCache(
        KEY_CACHE_NAME,
        loader,
        codec=KeyRecordCodec(),
        redis=redis,
        prefix=prefix,
        kind=KEY_KIND,
        max_entries=max_entries,
        ttl=ttl,
        refresh_after=refresh_after,
        stale_ttl=max(stale_ttl, ttl),
        deadline=deadline,
        load_timeout=load_timeout,
        breaker=breaker,
        loader_breaker=postgres_breaker,
        metrics=metrics,
        clock=clock,
        wall_clock=wall_clock,
    )


async def get_key(conn: asyncpg.Connection | asyncpg.Pool, key_id: str) -> KeyInfo | None:
    row = await conn.fetchrow(_INFO + " WHERE k.id = $1", key_id)
    return None if row is None else _info(row)


async def list_keys(
    pool: asyncpg.Pool, *, app: str | None = None, include_inactive: bool = False
) -> list[KeyInfo]:
    """Keys by application then creation time; revoked and expired ones only with
    ``include_inactive``. Raises ``UnknownApplication`` for an unknown ``app``."""
    if app is not None:
        await _application(pool, app)
    conditions = []
    if app is not None:
        conditions.append("a.name = $1")
    if not include_inactive:
        conditions.append("k.revoked_at IS NULL AND (k.expires_at IS NULL OR k.expires_at > now())")
    where = f" WHERE {' AND '.join(conditions)}" if conditions else ""
    rows = await pool.fetch(
        _INFO + where + " ORDER BY a.name, k.created_at, k.id", *([app] if app else [])
    )
    return [_info(row) for row in rows]


async def create_key(
    pool: asyncpg.Pool,
    app: str,
    *,
    environment: str = DEFAULT_ENVIRONMENT,
    description: str | None = None,
    expires_in: float | None = None,
) -> NewKey:
    """A new key for ``app`` in ``environment``, valid for ``expires_in`` seconds (None:
    until revoked). Raises ``UnknownApplication`` / ``UnknownEnvironment``."""
    if expires_in is not None and expires_in <= 0:
        raise KeyStoreError("expires_in must be positive")
    async with pool.acquire() as conn, conn.transaction():
        app_id = await _application(conn, app)
        env_id = await _environment(conn, app, app_id, environment)
        key, key_id = await _insert(conn, app_id, env_id, description, expires_in, None)
        info = await get_key(conn, key_id)
    assert info is not None
    return NewKey(key=key, info=info)


async def revoke_key(
    pool: asyncpg.Pool,
    key_id: str,
    *,
    redis: aioredis.Redis | None = None,
    prefix: str = "gw:",
) -> RevokedKey:
    """Revoke at once. Revoking a revoked key changes nothing (and publishes again)."""
    row = await pool.fetchrow(
        "UPDATE api_keys SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL "
        "RETURNING key_hash",
        key_id,
    )
    already = row is None
    if already:
        key_hash = await pool.fetchval("SELECT key_hash FROM api_keys WHERE id = $1", key_id)
        if key_hash is None:
            raise UnknownKey(_unknown_key(key_id))
    else:
        key_hash = row["key_hash"]
    info = await get_key(pool, key_id)
    assert info is not None
    published, error = await _invalidate(redis, prefix, key_hash)
    return RevokedKey(info, already_revoked=already, published=published, publish_error=error)


async def rotate_key(
    pool: asyncpg.Pool,
    key_id: str,
    *,
    grace: float = DEFAULT_GRACE,
    expires_in: float | None = None,
    description: str | None = None,
    redis: aioredis.Redis | None = None,
    prefix: str = "gw:",
) -> NewKey:
    """A new key for the same application and environment; the old one keeps working
    for ``grace`` seconds (or until its own expiry if sooner), then counts as expired.

    Raises ``UnknownKey``, or ``KeyNotActive`` for a revoked, expired or already rotated
    key (rotate its replacement instead).
    """
    if grace < 0:
        raise KeyStoreError("grace must not be negative")
    async with pool.acquire() as conn, conn.transaction():
        old = await conn.fetchrow(
            "SELECT application_id, environment_id, key_hash, description, "
            "revoked_at IS NOT NULL AS revoked, "
            "expires_at IS NOT NULL AND expires_at <= now() AS expired, "
            "(SELECT n.id FROM api_keys n WHERE n.rotated_from = k.id LIMIT 1) AS successor "
            "FROM api_keys k WHERE id = $1 FOR UPDATE",
            key_id,
        )
        if old is None:
            raise UnknownKey(_unknown_key(key_id))
        if old["revoked"] or old["expired"]:
            state = "revoked" if old["revoked"] else "expired"
            raise KeyNotActive(
                f"key {key_id} is {state}: there is nothing to rotate; create a new key "
                "with `ext-proc keys create`"
            )
        if old["successor"] is not None:
            raise KeyNotActive(
                f"key {key_id} was already rotated to {old['successor']}; "
                f"rotate {old['successor']} instead"
            )
        key, new_id = await _insert(
            conn,
            old["application_id"],
            old["environment_id"],
            description if description is not None else old["description"],
            expires_in,
            key_id,
        )
        # LEAST ignores NULL: a key without expiry gets the grace end.
        await conn.execute(
            "UPDATE api_keys SET expires_at = LEAST(expires_at, now() + make_interval(secs => $2))"
            " WHERE id = $1",
            key_id,
            grace,
        )
        info = await get_key(conn, new_id)
        replaced = await get_key(conn, key_id)
    assert info is not None and replaced is not None
    published, error = await _invalidate(redis, prefix, old["key_hash"])
    return NewKey(key=key, info=info, replaced=replaced, published=published, publish_error=error)


# --- helpers ----------------------------------------------------------------------------


async def _application(conn: asyncpg.Connection | asyncpg.Pool, app: str) -> int:
    app_id = await conn.fetchval("SELECT id FROM applications WHERE name = $1", app)
    if app_id is None:
        names = [r["name"] for r in await conn.fetch("SELECT name FROM applications ORDER BY name")]
        known = ", ".join(names) if names else "none: run `ext-proc apply -f gateway.yaml` first"
        raise UnknownApplication(f"unknown application '{app}' (known: {known})")
    return int(app_id)


async def _environment(conn: asyncpg.Connection, app: str, app_id: int, environment: str) -> int:
    env_id = await conn.fetchval(
        "SELECT id FROM application_environments WHERE application_id = $1 AND name = $2",
        app_id,
        environment,
    )
    if env_id is None:
        names = [
            r["name"]
            for r in await conn.fetch(
                "SELECT name FROM application_environments WHERE application_id = $1 "
                "ORDER BY name <> 'default', name",
                app_id,
            )
        ]
        raise UnknownEnvironment(
            f"application '{app}' has no environment '{environment}' "
            f"(environments: {', '.join(names)})"
        )
    return int(env_id)


async def _insert(
    conn: asyncpg.Connection,
    app_id: int,
    env_id: int,
    description: str | None,
    expires_in: float | None,
    rotated_from: str | None,
) -> tuple[str, str]:
    for _ in range(5):  # a 48-bit id collision is a once-in-a-lifetime event; retry anyway
        key, key_id = generate_key(), generate_key_id()
        try:
            async with conn.transaction():  # a savepoint, so a collision can be retried
                await conn.execute(
                    "INSERT INTO api_keys (id, application_id, environment_id, key_hash, prefix,"
                    " description, expires_at, rotated_from) VALUES ($1, $2, $3, $4, $5, $6, "
                    "CASE WHEN $7::float8 IS NULL THEN NULL"
                    " ELSE now() + make_interval(secs => $7::float8) END, $8)",
                    key_id,
                    app_id,
                    env_id,
                    hash_key(key),
                    key_prefix(key),
                    description,
                    expires_in,
                    rotated_from,
                )
        except asyncpg.UniqueViolationError:
            continue
        return key, key_id
    raise KeyStoreError("could not generate a unique key id; try again")


async def _invalidate(
    redis: aioredis.Redis | None, prefix: str, key_hash: str
) -> tuple[bool, str | None]:
    if redis is None:
        return False, "no Redis configured"
    try:
        await invalidate_shared(redis, prefix, KEY_CACHE_NAME, KEY_KIND, key_hash)
    except (RedisError, OSError, TimeoutError) as exc:
        return False, f"{type(exc).__name__}: {exc}"
    return True, None


def _unknown_key(key_id: str) -> str:
    return f"no key with id '{key_id}' (see `ext-proc keys list --all`)"

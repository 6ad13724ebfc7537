"""``ext-proc keys``: create, list, revoke and rotate gateway API keys.

Contract for scripts: ``keys create`` and ``keys rotate`` print the new key alone on
the last line of stdout (``ext-proc keys create --app x | tail -n1``). Everything else
they print comes before it. Exit codes: 0 done (also when Redis could not carry the
invalidation: the commit's Postgres NOTIFY does; a warning says so), 2 nothing done
(unknown application, environment or key; database unreachable or not migrated).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime

import asyncpg
import redis.asyncio as aioredis

from ext_proc.auth.store import (
    DEFAULT_GRACE,
    DEFAULT_KEY_TTL,
    KeyInfo,
    KeyStoreError,
    create_key,
    list_keys,
    revoke_key,
    rotate_key,
)
from ext_proc.config.durations import DurationError, parse_duration
from ext_proc.config.model import DEFAULT_ENVIRONMENT
from ext_proc.settings import Settings
from ext_proc.stores.catalog import CatalogNotMigrated, is_migrated
from ext_proc.stores.postgres import DATABASE_ERRORS, create_pool, database_error_message
from ext_proc.stores.redis import create_redis

EXIT_OK = 0
EXIT_FAILED = 2


def _duration(allow_zero: bool) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            return parse_duration(text, allow_zero=allow_zero)
        except DurationError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def add_keys_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="keys_command", required=True, metavar="ACTION")

    p = sub.add_parser("create", help="create a key; prints it once, on the last line")
    p.add_argument("--app", required=True, help="the application the key belongs to")
    p.add_argument(
        "--env",
        default=DEFAULT_ENVIRONMENT,
        help=f"the application's environment (default: {DEFAULT_ENVIRONMENT})",
    )
    p.add_argument("--description", help="what the key is for (shown in listings)")
    p.add_argument(
        "--expires-in",
        type=_duration(allow_zero=False),
        metavar="DURATION",
        help="the key stops working after this long (e.g. 30d, 12h; default: never)",
    )

    p = sub.add_parser("list", help="list keys (never the keys themselves)")
    p.add_argument("--app", help="only this application's keys")
    p.add_argument("--all", action="store_true", help="include revoked and expired keys")

    p = sub.add_parser("revoke", help="revoke a key at once")
    p.add_argument("key_id", metavar="ID", help="the key's id (key_...)")

    p = sub.add_parser(
        "rotate", help="replace a key; the old one works for a grace period (last line: new key)"
    )
    p.add_argument("key_id", metavar="ID", help="the key's id (key_...)")
    p.add_argument(
        "--grace",
        type=_duration(allow_zero=True),
        default=DEFAULT_GRACE,
        metavar="DURATION",
        help="how long the old key keeps working (default: 24h; 0: stop now)",
    )
    p.add_argument(
        "--expires-in",
        type=_duration(allow_zero=False),
        metavar="DURATION",
        help="the new key stops working after this long (default: never)",
    )


def run_keys(ns: argparse.Namespace, settings: Settings) -> int:
    assert settings.database_url, "the caller checks DATABASE_URL"
    actions: dict[str, Callable[[asyncpg.Pool, aioredis.Redis | None, str], Awaitable[int]]] = {
        "create": lambda pool, _redis, _prefix: _create(pool, ns),
        "list": lambda pool, _redis, _prefix: _list(pool, ns),
        "revoke": lambda pool, redis, prefix: _revoke(pool, redis, prefix, ns),
        "rotate": lambda pool, redis, prefix: _rotate(pool, redis, prefix, ns),
    }
    action = actions[ns.keys_command]
    try:
        return asyncio.run(_with_stores(settings, action))
    except KeyStoreError as exc:
        print(f"ext-proc keys {ns.keys_command}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except CatalogNotMigrated as exc:
        print(f"ext-proc keys: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except DATABASE_ERRORS as exc:
        message = database_error_message(settings.database_url, exc)
        print(f"ext-proc keys: {message}", file=sys.stderr)
        return EXIT_FAILED


async def _with_stores(
    settings: Settings,
    action: Callable[[asyncpg.Pool, aioredis.Redis | None, str], Awaitable[int]],
) -> int:
    assert settings.database_url is not None
    pool = await create_pool(settings.database_url, min_size=1, max_size=2)
    redis = create_redis(settings.redis_url) if settings.redis_url else None
    try:
        if not await is_migrated(pool):
            raise CatalogNotMigrated()
        return await action(pool, redis, settings.redis_prefix)
    finally:
        if redis is not None:
            await redis.aclose()
        await pool.close()


async def _create(pool: asyncpg.Pool, ns: argparse.Namespace) -> int:
    new = await create_key(
        pool, ns.app, environment=ns.env, description=ns.description, expires_in=ns.expires_in
    )
    info = new.info
    print(
        f"created key {info.key_id} for application {info.app} (org {info.org}), "
        f"environment {info.environment}"
    )
    print(f"prefix {info.prefix}, expires {_when(info.expires_at)}")
    print("the key is shown only this once; store it now:")
    print(new.key)
    return EXIT_OK


async def _list(pool: asyncpg.Pool, ns: argparse.Namespace) -> int:
    keys = await list_keys(pool, app=ns.app, include_inactive=ns.all)
    if not keys:
        where = f" for application {ns.app}" if ns.app else ""
        print(f"no {'' if ns.all else 'active '}keys{where}")
        return EXIT_OK
    print(format_keys(keys, datetime.now(UTC)))
    return EXIT_OK


def format_keys(keys: Sequence[KeyInfo], now: datetime) -> str:
    header = ("ID", "APP", "ENV", "PREFIX", "CREATED", "EXPIRES", "STATUS")
    rows = [header] + [
        (
            k.key_id,
            k.app,
            k.environment,
            k.prefix,
            _when(k.created_at),
            _when(k.expires_at),
            k.status(now) + (f" -> {k.replaced_by}" if k.replaced_by else ""),
        )
        for k in keys
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


async def _revoke(
    pool: asyncpg.Pool, redis: aioredis.Redis | None, prefix: str, ns: argparse.Namespace
) -> int:
    result = await revoke_key(pool, ns.key_id, redis=redis, prefix=prefix)
    info = result.info
    if result.already_revoked:
        assert info.revoked_at is not None
        print(f"key {info.key_id} ({info.prefix}) was already revoked at {_when(info.revoked_at)}")
    else:
        print(
            f"revoked key {info.key_id} ({info.prefix}) of application {info.app}, "
            f"environment {info.environment}"
        )
    return _report_publish(redis, result.published, result.publish_error)


async def _rotate(
    pool: asyncpg.Pool, redis: aioredis.Redis | None, prefix: str, ns: argparse.Namespace
) -> int:
    new = await rotate_key(
        pool, ns.key_id, grace=ns.grace, expires_in=ns.expires_in, redis=redis, prefix=prefix
    )
    old, info = new.replaced, new.info
    assert old is not None
    print(
        f"rotated key {old.key_id} -> {info.key_id} (application {info.app}, "
        f"environment {info.environment})"
    )
    print(f"the old key {old.prefix}... keeps working until {_when(old.expires_at)}")
    print(f"new key prefix {info.prefix}, expires {_when(info.expires_at)}")
    status = _report_publish(redis, new.published, new.publish_error)
    print("the new key is shown only this once; store it now:")
    print(new.key)
    return status


def _report_publish(redis: aioredis.Redis | None, published: bool, error: str | None) -> int:
    """The change is effective either way: its commit sent a Postgres NOTIFY that every
    replica listens to (schema/0005_key_notify.sql); Redis is the second channel."""
    if published:
        return EXIT_OK
    later = (
        "replicas hear of it through Postgres (LISTEN/NOTIFY) within about a second (one "
        f"cut off from both notices within {DEFAULT_KEY_TTL:.0f}s of reaching Postgres)"
    )
    if redis is None:
        print(
            f"note: REDIS_URL is not set, nothing was published on Redis; {later}", file=sys.stderr
        )
        return EXIT_OK
    print(f"warning: could not publish on Redis ({error}); {later}", file=sys.stderr)
    return EXIT_OK


def _when(moment: datetime | None) -> str:
    if moment is None:
        return "never"
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")

"""The benchmark's own database and Redis key prefix; both removed at the end.

Postgres and Redis are shared with everything else on the machine: the benchmark creates
``bench_<random>`` on the server ``DATABASE_URL`` names (or on an embedded pgserver under
the run's temp folder when it is unset) and drops it at the end; it uses the Redis key
prefix ``bench:<random>:`` on ``REDIS_URL`` (or a private embedded redis-server) and
deletes those keys at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from ext_proc.stores import embedded
from ext_proc.stores.postgres import redact_url


def _with_database(url: str, dbname: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + dbname, parts.query, parts.fragment))


class BenchDatabase:
    """``bench_<random>`` on a Postgres server; counts usage rows; dropped by ``close()``."""

    def __init__(self, server_url: str, run_id: str) -> None:
        self.server_url = server_url
        self.name = f"bench_{run_id}"
        self.url = _with_database(server_url, self.name)
        self._loop = asyncio.new_event_loop()
        self._conn: asyncpg.Connection | None = None
        self._created = False

    def create(self) -> None:
        async def _create() -> None:
            conn = await asyncpg.connect(self.server_url, timeout=10)
            try:
                await conn.execute(f'CREATE DATABASE "{self.name}"')
            finally:
                await conn.close()

        self._loop.run_until_complete(_create())
        self._created = True

    def count_rows(self) -> int:
        """Rows in ``usage_records`` now (0 before the schema exists)."""

        async def _count() -> int:
            if self._conn is None or self._conn.is_closed():
                self._conn = await asyncpg.connect(self.url, timeout=10)
            try:
                return int(await self._conn.fetchval("SELECT count(*) FROM usage_records"))
            except asyncpg.UndefinedTableError:
                return 0

        return self._loop.run_until_complete(_count())

    def close(self) -> None:
        """Close our connection and drop the database (FORCE: nothing may hold it)."""

        async def _drop() -> None:
            if self._conn is not None and not self._conn.is_closed():
                await self._conn.close()
            if not self._created:
                return
            conn = await asyncpg.connect(self.server_url, timeout=10)
            try:
                await conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
            finally:
                await conn.close()

        try:
            self._loop.run_until_complete(_drop())
        finally:
            self._loop.close()

    def describe(self) -> str:
        return f"database {self.name} on {redact_url(self.server_url)}"


def delete_redis_prefix(redis_url: str, prefix: str) -> int:
    """Delete every key under ``prefix`` (SCAN, never KEYS); the number deleted."""
    import redis

    client = redis.Redis.from_url(redis_url, socket_timeout=10)
    deleted = 0
    try:
        batch: list[bytes] = []
        for key in client.scan_iter(match=prefix + "*", count=1000):
            batch.append(key)
            if len(batch) >= 500:
                deleted += int(client.delete(*batch))
                batch.clear()
        if batch:
            deleted += int(client.delete(*batch))
    finally:
        client.close()
    return deleted


@dataclass
class Backends:
    """Where the gateway's Postgres and Redis are for this run, and how to undo it."""

    database: BenchDatabase
    redis_url: str
    redis_prefix: str
    redis_shared: bool  # True: REDIS_URL's server (delete our prefix); False: our own
    _pg: embedded.EmbeddedPostgres | None = None
    _redis: embedded.EmbeddedRedis | None = None

    @classmethod
    def start(cls, run_id: str, tmp: Path, say: Callable[[str], None] = print) -> Backends:
        """Our database on DATABASE_URL's server (or an embedded one), our Redis prefix on
        REDIS_URL (or a private embedded server)."""
        log = say
        pg: embedded.EmbeddedPostgres | None = None
        redis_server: embedded.EmbeddedRedis | None = None
        database: BenchDatabase | None = None
        try:
            server_url = os.environ.get("DATABASE_URL")
            if not server_url:
                log("DATABASE_URL is unset: starting an embedded Postgres (pgserver) ...")
                pg = embedded.start_postgres(tmp / "postgres")
                server_url = pg.url
            database = BenchDatabase(server_url, run_id)
            database.create()
            redis_url = os.environ.get("REDIS_URL")
            shared = bool(redis_url)
            if not redis_url:
                log("REDIS_URL is unset: starting an embedded redis-server ...")
                redis_server = embedded.start_redis(tmp / "redis")
                redis_url = redis_server.url
            return cls(
                database=database,
                redis_url=redis_url,
                redis_prefix=f"bench:{run_id}:",
                redis_shared=shared,
                _pg=pg,
                _redis=redis_server,
            )
        except BaseException:
            if database is not None:
                with contextlib.suppress(Exception):
                    database.close()
            if redis_server is not None:
                redis_server.stop()
            if pg is not None:
                pg.stop()
            raise

    def close(self) -> list[str]:
        """Drop the database, delete our Redis keys, stop embedded servers; problems."""
        problems: list[str] = []
        try:
            self.database.close()
        except Exception as exc:  # keep cleaning the rest; the caller reports it
            problems.append(f"could not drop {self.database.describe()}: {exc}")
        if self.redis_shared:
            try:
                delete_redis_prefix(self.redis_url, self.redis_prefix)
            except Exception as exc:
                problems.append(f"could not delete Redis keys {self.redis_prefix}*: {exc}")
        if self._redis is not None:
            self._redis.stop()
        if self._pg is not None:
            self._pg.stop()
        return problems

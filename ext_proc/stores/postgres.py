"""Postgres: the connection pool and the schema migrations.

Migrations are the ordered SQL files in the repository's ``schema/`` folder
(``0001_usage_records.sql``, ``0002_...``). Each file is applied once, in name order,
in its own transaction, and recorded with its sha256 in ``schema_migrations``. A Postgres
advisory lock serialises concurrent runners (several replicas starting at once), and a
file that changed after it was applied is refused: fix forward with a new file.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg

# The repo's schema/ folder, reached through the package's `_schema` link so that an
# installed wheel (which carries the SQL files as package data) finds it too.
SCHEMA_DIR = Path(__file__).resolve().parents[1] / "_schema"

APPLICATION_NAME = "ext-proc"
CONNECT_TIMEOUT = 5.0  # seconds to establish one connection
COMMAND_TIMEOUT = 30.0  # default per-statement timeout on pooled connections
MIGRATION_LOCK_WAIT = 120.0  # how long a runner waits for another one to finish

# pg_advisory_lock key shared by every migration runner ("ext_proc" as a big-endian int).
# Advisory locks are per database, so runners on different databases never contend.
_MIGRATION_LOCK_KEY = int.from_bytes(b"ext_proc", "big")
_FILE_NAME = re.compile(r"^(\d+)_[A-Za-z0-9_.-]+\.sql$")

# How "the database cannot be used" shows: unreachable, refused, timed out, or an error
# from the server. Commands catch these and answer with ``database_error_message``.
DATABASE_ERRORS: tuple[type[Exception], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
)

_CREATE_MIGRATIONS_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    integer     PRIMARY KEY,
    name       text        NOT NULL UNIQUE,
    sha256     text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


class MigrationError(RuntimeError):
    """The schema folder or the database's migration history is inconsistent."""


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    path: Path
    sha256: str
    sql: str  # exactly the bytes the checksum covers


async def create_pool(
    url: str,
    *,
    min_size: int = 1,
    max_size: int = 4,
    application_name: str = APPLICATION_NAME,
    connect_timeout: float = CONNECT_TIMEOUT,
) -> asyncpg.Pool:
    """A pool with bounded connect and statement times, named in ``pg_stat_activity``.

    With ``min_size=0`` no connection is opened until first use, so the pool can be
    created while Postgres is down (callers that must not fail at start-up use that).
    """
    return await asyncpg.create_pool(
        url,
        min_size=min_size,
        max_size=max_size,
        timeout=connect_timeout,
        command_timeout=COMMAND_TIMEOUT,
        # Recycle idle connections so a failover or a restarted server is picked up.
        max_inactive_connection_lifetime=300.0,
        server_settings={"application_name": application_name},
    )


def discover_migrations(schema_dir: Path = SCHEMA_DIR) -> list[Migration]:
    """The ``NNNN_name.sql`` files of ``schema_dir`` in name order, with their checksums."""
    if not schema_dir.is_dir():
        raise MigrationError(f"schema folder {schema_dir} does not exist")
    migrations: list[Migration] = []
    seen: dict[int, str] = {}
    for path in sorted(schema_dir.glob("*.sql"), key=lambda p: p.name):
        match = _FILE_NAME.match(path.name)
        if match is None:
            raise MigrationError(
                f"{path}: migration files are named NNNN_description.sql "
                "(digits, underscore, letters/digits/._-)"
            )
        version = int(match.group(1))
        if version in seen:
            raise MigrationError(
                f"{path.name} and {seen[version]} share version {version}; renumber one"
            )
        seen[version] = path.name
        content = path.read_bytes()
        digest = hashlib.sha256(content).hexdigest()
        try:
            sql = content.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise MigrationError(f"{path}: not UTF-8 text ({exc})") from None
        migrations.append(Migration(version, path.name, path, digest, sql))
    return migrations


async def _connect(url: str) -> asyncpg.Connection:
    return await asyncpg.connect(
        url,
        timeout=CONNECT_TIMEOUT,
        server_settings={"application_name": f"{APPLICATION_NAME} migrate"},
    )


async def _applied(conn: asyncpg.Connection) -> dict[str, str]:
    """name -> sha256 of the migrations recorded in the database ({} before the first)."""
    exists = await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
    if not exists:
        return {}
    rows = await conn.fetch("SELECT name, sha256 FROM schema_migrations ORDER BY version")
    return {row["name"]: row["sha256"] for row in rows}


def _pending(migrations: list[Migration], applied: dict[str, str]) -> list[Migration]:
    """The migrations not applied yet; refuses if an applied file's content changed."""
    pending: list[Migration] = []
    for migration in migrations:
        recorded = applied.get(migration.name)
        if recorded is None:
            pending.append(migration)
        elif recorded != migration.sha256:
            raise MigrationError(
                f"{migration.name} was changed after it was applied to this database "
                f"(recorded sha256 {recorded[:12]}..., file now {migration.sha256[:12]}...). "
                "Applied migrations are immutable: restore the file and add a new "
                "migration with the change."
            )
    # A database migrated by a newer release may list files this checkout lacks; that
    # is not an error here (rolling deploys run old and new code side by side).
    return pending


async def pending_migrations(url: str, schema_dir: Path = SCHEMA_DIR) -> list[str]:
    """Names of the files ``migrate`` would apply now, in order."""
    migrations = discover_migrations(schema_dir)
    conn = await _connect(url)
    try:
        return [m.name for m in _pending(migrations, await _applied(conn))]
    finally:
        await conn.close()


async def migrate(url: str, schema_dir: Path = SCHEMA_DIR) -> list[str]:
    """Apply the pending migrations in name order; return their names ([] if up to date).

    Each file runs in its own transaction together with its ``schema_migrations`` row,
    so a failing file leaves the earlier ones applied and itself pending. The whole run
    holds a session advisory lock: a concurrent runner waits, then finds nothing to do.
    """
    migrations = discover_migrations(schema_dir)
    conn = await _connect(url)
    try:
        try:
            await conn.execute(
                "SELECT pg_advisory_lock($1)", _MIGRATION_LOCK_KEY, timeout=MIGRATION_LOCK_WAIT
            )
        except TimeoutError:
            raise MigrationError(
                f"another migration run held the lock for over {MIGRATION_LOCK_WAIT:.0f}s"
            ) from None
        await conn.execute(_CREATE_MIGRATIONS_TABLE)
        applied_now: list[str] = []
        for migration in _pending(migrations, await _applied(conn)):
            try:
                async with conn.transaction():
                    await conn.execute(migration.sql)
                    await conn.execute(
                        "INSERT INTO schema_migrations (version, name, sha256) VALUES ($1, $2, $3)",
                        migration.version,
                        migration.name,
                        migration.sha256,
                    )
            except asyncpg.PostgresError as exc:
                raise MigrationError(
                    f"{migration.name} failed and was rolled back: {type(exc).__name__}: {exc}"
                ) from exc
            applied_now.append(migration.name)
        return applied_now
    finally:
        # Ending the session releases the advisory lock (also when the run failed).
        await conn.close()


def redact_url(url: str) -> str:
    """``url`` without its password, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    userinfo = (parts.username or "") + ":***"
    return urlunsplit((parts.scheme, f"{userinfo}@{netloc[-1]}", *parts[2:]))


def database_error_message(url: str, exc: BaseException) -> str:
    """``cannot use the database at URL: Error: message``, the password left out."""
    return f"cannot use the database at {redact_url(url)}: {type(exc).__name__}: {exc}"


def run_migrate(url: str) -> int:
    """``ext-proc migrate``: apply pending migrations and say what was done.

    Exit codes: 0 done (or nothing to do), 1 a migration or the history is wrong,
    2 the database cannot be reached.
    """
    try:
        applied = asyncio.run(migrate(url))
    except MigrationError as exc:
        print(f"migration failed: {exc}", file=sys.stderr)
        return 1
    except DATABASE_ERRORS as exc:
        print(database_error_message(url, exc), file=sys.stderr)
        return 2
    if not applied:
        print("schema up to date")
    for name in applied:
        print(f"applied {name}")
    return 0

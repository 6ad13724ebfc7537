"""The control plane end to end: a real Envoy, two ext_proc processes, the mock upstream,
the official openai SDK as the app.

Through process A's admin API: an organization, an application, a policy and a key;
then traffic through Envoy, which both processes enforce (each counts the policy's
denials); usage with cost from the API; the key revoked (refused by both); the audit
log; and a finished request arriving on the live activity stream. The time for a change
made through A to reach B (its loaded catalog's fingerprint, on its /readyz) is printed.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import DatabaseFactory
from tests.e2e.stack_helpers import OwnStack, unique_prefix

pytestmark = pytest.mark.e2e

ADMIN = "e2e-admin-token"
HELLO = [{"role": "user", "content": "Hello there"}]
# Only what needs an Envoy cluster (a provider) comes from the file; the rest is made
# through the API. gpt-4o-mini is priced by the public price table.
CONFIG = """\
providers:
  mock: {type: openai, base_url: "http://127.0.0.1:{mock}"}
models:
  gpt-4o-mini: {provider: mock}
  gpt-4o: {provider: mock}
applications:
  seed: {org: seed}
"""


@pytest.fixture(scope="module")
async def gw(
    databases: DatabaseFactory, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[OwnStack]:
    stack = await OwnStack.start(
        databases,
        Path(tmp_path_factory.mktemp("admin-lifecycle")),
        CONFIG,
        redis_url=redis_url,
        redis_prefix=unique_prefix("admin-lifecycle"),
        key_app="seed",
        processes=2,
        label="admin",
        extra_env={"EXT_PROC_ADMIN_TOKEN": ADMIN},
    )
    try:
        yield stack
    finally:
        await stack.stop()


def admin(gw: OwnStack, index: int) -> httpx.AsyncClient:
    port = gw.stack.ext_proc_ports[index][2]
    return httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{port}",
        headers={"authorization": f"Bearer {ADMIN}"},
        timeout=10,
    )


async def fingerprint(client: httpx.AsyncClient) -> str:
    """The catalog the process serves (/healthz says it without probing anything)."""
    return str((await client.get("/healthz")).json().get("config", ""))


async def converged(clients: list[httpx.AsyncClient], before: str, timeout: float = 5.0) -> float:
    """Seconds until every process serves the same catalog, other than ``before``."""
    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        prints = await asyncio.gather(*(fingerprint(c) for c in clients))
        if len(set(prints)) == 1 and prints[0] != before:
            return time.perf_counter() - started
        await asyncio.sleep(0.005)
    raise AssertionError(f"the processes did not converge within {timeout}s")


async def change(
    a: httpx.AsyncClient, b: httpx.AsyncClient, method: str, path: str, body: dict[str, Any]
) -> tuple[httpx.Response, float]:
    """One change through A; seconds from its answer until B serves it."""
    before = await fingerprint(b)
    response = await a.request(method, path, json=body)
    assert response.status_code in (200, 201), response.text
    return response, await converged([a, b], before)


async def test_lifecycle_through_envoy_and_two_replicas(gw: OwnStack) -> None:
    async with admin(gw, 0) as a, admin(gw, 1) as b:
        delays: list[float] = []
        for method, path, body in (
            ("POST", "/v1/organizations", {"name": "acme", "description": "Acme Corp"}),
            (
                "POST",
                "/v1/policies",
                {"name": "three-per-minute", "type": "rate_limit", "requests": 3, "window": "1m"},
            ),
            (
                "POST",
                "/v1/policies",
                {"name": "mini-only", "type": "model_allowlist", "models": ["gpt-4o-mini"]},
            ),
            (
                "POST",
                "/v1/applications",
                {
                    "name": "support-bot",
                    "org": "acme",
                    "policies": ["mini-only", "three-per-minute"],
                },
            ),
        ):
            _, delay = await change(a, b, method, path, body)
            delays.append(delay)
        created = await a.post("/v1/keys", json={"app": "support-bot", "name": "e2e"})
        assert created.status_code == 201, created.text
        key = created.json()
        assert key["key"].startswith("gwk_") and key["org"] == "acme"

        client = openai.AsyncOpenAI(base_url=gw.base_url, api_key=key["key"], max_retries=0)
        # Both processes enforce the allowlist made through A's API.
        for _ in range(6):
            with pytest.raises(openai.PermissionDeniedError) as denied:
                await client.chat.completions.create(model="gpt-4o", messages=HELLO)
            assert denied.value.body["code"] == "model_not_allowed"  # type: ignore[index]
        for index in range(2):
            counted = await gw.metric(
                index, "ext_proc_requests_total", decision="denied", policy="mini-only"
            )
            assert counted >= 1, f"process {index} never enforced mini-only"

        # The rate limit: 3 a minute, shared by both processes through Redis.
        ids = []
        for _ in range(3):
            raw = await client.chat.completions.with_raw_response.create(
                model="gpt-4o-mini", messages=HELLO
            )
            ids.append(raw.headers["x-request-id"])
        with pytest.raises(openai.RateLimitError):
            await client.chat.completions.create(model="gpt-4o-mini", messages=HELLO)

        # Usage with cost, from the API (rows are written in batches: poll, bounded).
        deadline = time.monotonic() + 20
        row: dict[str, Any] = {}
        while time.monotonic() < deadline:
            usage = await a.get(
                "/v1/usage", params={"by": "app_id,model", "since": "1h", "app": "support-bot"}
            )
            assert usage.status_code == 200, usage.text
            rows = {r["model"]: r for r in usage.json()["rows"]}
            row = rows.get("gpt-4o-mini", {})
            if row.get("requests", 0) >= 3:
                break
            await asyncio.sleep(0.2)
        assert row.get("requests", 0) >= 3, row
        assert row["cost_usd"] is not None and float(row["cost_usd"]) > 0, row

        # Revoked through A: refused by every process (whichever Envoy picks).
        revoked = await a.post(f"/v1/keys/{key['id']}/revoke")
        assert revoked.status_code == 200 and revoked.json()["status"] == "revoked"
        fresh = openai.AsyncOpenAI(base_url=gw.base_url, api_key=key["key"], max_retries=0)
        deadline = time.monotonic() + 5
        refused = 0
        while refused < 6 and time.monotonic() < deadline:
            try:
                await fresh.models.list()
            except openai.AuthenticationError:
                refused += 1
        assert refused == 6

        # The audit log says who did what.
        audit = (await b.get("/v1/audit", params={"limit": 50})).json()["data"]
        done = {
            (row["action"], row["kind"], row["name"]) for row in audit if row["actor"] == "admin"
        }
        assert {
            ("create", "organization", "acme"),
            ("create", "policy", "mini-only"),
            ("create", "application", "support-bot"),
            ("create", "key", key["id"]),
            ("revoke", "key", key["id"]),
        } <= done
        # (the stack's own `ext-proc apply` of the file is in the log as well)
        assert {row["actor"] for row in audit} == {"admin", "ext-proc apply"}

        # More changes through A, each timed until B serves it.
        for requests in (4, 5, 6, 7, 8):
            _, delay = await change(
                a, b, "PATCH", "/v1/policies/three-per-minute", {"requests": requests}
            )
            delays.append(delay)
        print(
            f"\npropagation A -> B over {len(delays)} API changes: median "
            f"{1000 * statistics.median(delays):.0f} ms, max {1000 * max(delays):.0f} ms"
        )
        assert max(delays) < 1.0


async def test_activity_stream_sees_a_request(gw: OwnStack) -> None:
    clients = [admin(gw, 0), admin(gw, 1)]
    try:
        key = await gw.create_key("seed")
        seen: list[str] = []
        ready = [asyncio.Event(), asyncio.Event()]
        arrived = asyncio.Event()

        async def listen(index: int) -> None:
            async with clients[index].stream("GET", "/v1/activity", timeout=30) as stream:
                async for line in stream.aiter_lines():
                    ready[index].set()
                    if line.startswith("data: "):
                        seen.append(line)
                        arrived.set()

        listeners = [asyncio.create_task(listen(i)) for i in range(2)]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in ready)), 10)
        client = openai.AsyncOpenAI(base_url=gw.base_url, api_key=key, max_retries=0)
        raw = await client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=HELLO
        )
        request_id = raw.headers["x-request-id"]
        deadline = time.monotonic() + 10
        while not any(request_id in line for line in seen) and time.monotonic() < deadline:
            arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(arrived.wait(), max(0.0, deadline - time.monotonic()))
        for task in listeners:
            task.cancel()
        await asyncio.gather(*listeners, return_exceptions=True)
        (event,) = [line for line in seen if request_id in line]
        assert (
            '"app":"seed"' in event and '"status":200' in event and '"decision":"allowed"' in event
        )
    finally:
        for client in clients:
            await client.aclose()

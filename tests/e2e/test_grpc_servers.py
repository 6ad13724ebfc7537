"""The ext_proc service on each gRPC server library (``EXT_PROC_GRPC_SERVER``).

The rest of the suite runs on the default library; this module runs one stack per
library through the real Envoy and checks what differs between them: requests in and
answers out (plain and streamed, with their usage rows), a denial answered by ext_proc
itself, header bytes that are not UTF-8 (decoded by our own ``wire.decode_request`` on
both), and the gRPC health service on the ext_proc port.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ext_proc.settings import GRPC_SERVERS
from tests.conftest import DatabaseFactory
from tests.e2e.stack_helpers import OwnStack, unique_prefix

pytestmark = pytest.mark.e2e

CONFIG = """
providers:
  mock: {type: openai, base_url: "http://127.0.0.1:{mock}"}
models:
  gpt-4o-mini: {provider: mock}
  not-allowed: {provider: mock}
policies:
  roomy: {type: rate_limit, requests: 100000, window: 1h}
  only-mini: {type: model_allowlist, models: [gpt-4o-mini]}
applications:
  wire-app: {org: wire, policies: [roomy, only-mini]}
"""
BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hello there"}]}


@pytest.fixture(scope="module", params=GRPC_SERVERS)
async def own(
    request: pytest.FixtureRequest,
    databases: DatabaseFactory,
    redis_url: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[OwnStack]:
    server: str = request.param
    stack = await OwnStack.start(
        databases,
        tmp_path_factory.mktemp(f"grpc-{server}"),
        CONFIG,
        redis_url=redis_url,
        redis_prefix=unique_prefix(f"grpc-{server}"),
        key_app="wire-app",
        label=f"grpc_{server}",
        extra_env={"EXT_PROC_GRPC_SERVER": server},
    )
    try:
        yield stack
    finally:
        await stack.stop()


def _auth(own: OwnStack) -> dict[str, str]:
    return {"authorization": f"Bearer {own.api_key}"}


async def test_plain_and_streamed_requests_are_answered_and_recorded(own: OwnStack) -> None:
    async with httpx.AsyncClient(base_url=own.base_url, timeout=30) as client:
        plain = await client.post("/chat/completions", json=BODY, headers=_auth(own))
        assert plain.status_code == 200, plain.text
        assert plain.json()["usage"]["completion_tokens"] > 0
        async with client.stream(
            "POST",
            "/chat/completions",
            json={**BODY, "stream": True, "stream_options": {"include_usage": True}},
            headers=_auth(own),
        ) as streamed:
            assert streamed.status_code == 200
            chunks = [line async for line in streamed.aiter_lines() if line.startswith("data: ")]
    assert chunks[-1] == "data: [DONE]"
    ids = [plain.headers["x-request-id"], streamed.headers["x-request-id"]]
    rows = await own.rows_for(ids)
    assert set(rows) == set(ids)
    for request_id in ids:
        row = rows[request_id]
        assert row["status_code"] == 200
        assert row["decision"] == "allowed"
        assert row["completion_tokens"] > 0
        assert row["app_id"] == "wire-app"


async def test_a_denial_is_answered_by_ext_proc_and_recorded(own: OwnStack) -> None:
    async with httpx.AsyncClient(base_url=own.base_url, timeout=30) as client:
        denied = await client.post(
            "/chat/completions", json={**BODY, "model": "not-allowed"}, headers=_auth(own)
        )
        no_key = await client.post("/chat/completions", json=BODY)
    assert denied.status_code == 403, denied.text
    assert "not-allowed" in denied.json()["error"]["message"]
    assert no_key.status_code == 401
    assert no_key.json()["error"]["type"]
    row = (await own.rows_for([denied.headers["x-request-id"]]))[denied.headers["x-request-id"]]
    assert row["decision"] == "denied"
    assert row["status_code"] == 403


async def test_header_bytes_that_are_not_utf8_survive(own: OwnStack) -> None:
    # Envoy forwards obs-text header bytes as they are; protobuf's own decoder would
    # reject them as a string field. Latin-1 "café" is not valid UTF-8.
    headers = [
        (b"authorization", f"Bearer {own.api_key}".encode()),
        (b"x-customer", "caf\u00e9".encode("latin-1")),
    ]
    async with httpx.AsyncClient(base_url=own.base_url, timeout=30) as client:
        answer = await client.post("/chat/completions", json=BODY, headers=headers)
    assert answer.status_code == 200, answer.text


async def test_grpc_health_on_the_ext_proc_port(own: OwnStack) -> None:
    grpc_port = own.stack.ext_proc_ports[0][0]

    async def check(service: str) -> int:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            answer = await asyncio.wait_for(
                stub.Check(health_pb2.HealthCheckRequest(service=service)), 10
            )
            return int(answer.status)

    serving = health_pb2.HealthCheckResponse.SERVING
    assert await check("") == serving
    assert await check("envoy.service.ext_proc.v3.ExternalProcessor") == serving
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await check("no.such.Service")
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND

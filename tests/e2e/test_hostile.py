"""Hostile input through the real Envoy: bytes that are not UTF-8 in key headers, JSON
nested too deep or repeating a key, headers that must never reach a provider, an Azure
deployment path that names an allowed model but resolves to another, and a key sent in
the query string. Each answer is the gateway's clean error (never a 5xx, never grpc's
internals) and each request has its usage row."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import DatabaseFactory
from tests.e2e.stack_helpers import OwnStack, unique_prefix

pytestmark = pytest.mark.e2e

CONFIG = """
providers:
  mock: {type: openai, base_url: "http://127.0.0.1:{mock}", retries: {attempts: 0}}
  org-mock: {type: openai, base_url: "http://127.0.0.1:{mock}", retries: {attempts: 0},
             pass_headers: [OpenAI-Organization]}
  azure-mock: {type: azure_openai, base_url: "http://127.0.0.1:{mock}", api_version: "2024-10-21",
               api_key_env: HOSTILE_AZURE_KEY, retries: {attempts: 0}}
models:
  gpt-4o-mini: {provider: mock}
  org-model: {provider: org-mock, deployment: gpt-4o-mini}
  big: {provider: azure-mock, deployment: gpt-4o-mini}
policies:
  mini-only: {type: model_allowlist, models: [gpt-4o-mini]}
applications:
  hostile-app: {org: hostile}
  mini-app: {org: hostile, policies: [mini-only]}
"""

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}]}
SCOPING = {
    "openai-organization": "org-of-someone-else",
    "openai-project": "proj-of-someone-else",
    "anthropic-beta": "some-beta",
    "x-gateway-provider": "azure-mock",
    "x-gateway-anything": "internal",
}


@pytest.fixture(scope="module")
async def own(
    databases: DatabaseFactory, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[OwnStack]:
    stack = await OwnStack.start(
        databases,
        Path(tmp_path_factory.mktemp("hostile")),
        CONFIG,
        redis_url=redis_url,
        redis_prefix=unique_prefix("hostile"),
        key_app="hostile-app",
        label="hostile",
        extra_env={"HOSTILE_AZURE_KEY": "azure-provider-key"},
    )
    try:
        yield stack
    finally:
        await stack.stop()


def _url(own: OwnStack) -> str:
    return own.stack.listener_url


async def _raw_post(own: OwnStack, headers: list[tuple[bytes, bytes]], body: bytes) -> bytes:
    """An HTTP/1.1 POST with header bytes no HTTP library would send (not UTF-8)."""
    port = own.stack.options.listener_port
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n"
    for name, value in headers:
        head += name + b": " + value + b"\r\n"
    head += b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n"
    writer.write(head + body)
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return answer


def _parse(answer: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return status, headers, body


@pytest.mark.parametrize(
    ("header", "value", "status", "code"),
    [
        (b"authorization", b"Bearer gwk_\xff\xfe\xfd", 401, "invalid_api_key"),
        (b"x-api-key", b"\xc3\x28-not-utf8", 401, "invalid_api_key"),
        (b"api-key", b"\x80\x81", 401, "invalid_api_key"),
    ],
)
async def test_key_headers_that_are_not_utf8_are_a_clean_401(
    own: OwnStack, header: bytes, value: bytes, status: int, code: str
) -> None:
    answer = await _raw_post(
        own, [(header, value), (b"content-type", b"application/json")], json.dumps(CHAT).encode()
    )
    got, headers, body = _parse(answer)
    assert got == status, answer[:400]
    error = json.loads(body)["error"]
    assert error["code"] == code and "UTF-8" in error["message"]
    assert "Decode" not in body.decode("latin-1") and "grpc" not in body.decode("latin-1")
    [row] = (await own.rows_for([headers["x-request-id"]])).values()
    assert (row["status_code"], row["decision"]) == (status, "denied")


async def test_content_type_that_is_not_utf8_is_a_clean_400(own: OwnStack) -> None:
    answer = await _raw_post(
        own,
        [
            (b"authorization", f"Bearer {own.api_key}".encode()),
            (b"content-type", b"application/json\xff"),
        ],
        json.dumps(CHAT).encode(),
    )
    got, headers, body = _parse(answer)
    assert got == 400 and json.loads(body)["error"]["code"] == "invalid_content_type"
    [row] = (await own.rows_for([headers["x-request-id"]])).values()
    assert row["status_code"] == 400


@pytest.mark.parametrize("stream", [False, True])
async def test_json_nested_deeper_than_128_is_400(own: OwnStack, stream: bool) -> None:
    head = json.dumps({**CHAT, "stream": stream})[:-1]
    deep = head + ', "metadata": ' + "[" * 300 + "]" * 300 + "}"
    async with httpx.AsyncClient(timeout=10) as http:
        response = await http.post(
            f"{_url(own)}/v1/chat/completions",
            content=deep.encode(),
            headers={"authorization": f"Bearer {own.api_key}", "content-type": "application/json"},
        )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "invalid_json"
    assert "nested deeper than 128" in response.json()["error"]["message"]


async def test_a_repeated_key_is_400_and_nothing_is_forwarded(own: OwnStack) -> None:
    body = (
        b'{"model": "gpt-4o-mini", "model": "big", "messages": [{"role": "user", "content": "x"}]}'
    )
    async with httpx.AsyncClient(timeout=10) as http:
        response = await http.post(
            f"{_url(own)}/v1/chat/completions",
            content=body,
            headers={"authorization": f"Bearer {own.api_key}", "content-type": "application/json"},
        )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "invalid_json" and "'model'" in error["message"]
    [row] = (await own.rows_for([response.headers["x-request-id"]])).values()
    assert (row["status_code"], row["error_code"]) == (400, "invalid_json")


async def _mock_saw(own: OwnStack, marker: str) -> dict[str, str]:
    mock = own.stack.mock_port
    async with httpx.AsyncClient(timeout=5) as http:
        response = await http.get(
            f"http://127.0.0.1:{mock}/_mock/requests", params={"header": f"x-test-id:{marker}"}
        )
    data = response.json()
    [seen] = data["requests"] if isinstance(data, dict) else data
    return {k.lower(): v for k, v in seen["headers"].items()}


@pytest.mark.parametrize(
    ("model", "passed"),
    [("gpt-4o-mini", set()), ("org-model", {"openai-organization"})],
)
async def test_scoping_and_gateway_headers_never_reach_the_provider(
    own: OwnStack, model: str, passed: set[str]
) -> None:
    marker = f"scoping-{model}"
    async with httpx.AsyncClient(timeout=10) as http:
        response = await http.post(
            f"{_url(own)}/v1/chat/completions",
            json={**CHAT, "model": model},
            headers={"authorization": f"Bearer {own.api_key}", "x-test-id": marker, **SCOPING},
        )
    assert response.status_code == 200, response.text
    seen = await _mock_saw(own, marker)
    arrived = {name for name in SCOPING if name in seen}
    assert arrived == passed  # only what the provider's pass_headers lets through
    assert not any(name.startswith("x-gateway-") for name in seen)
    assert own.api_key not in json.dumps(seen)
    assert seen.get("user-agent") and seen.get("x-test-id") == marker  # the rest still pass


async def test_allowlist_judges_the_model_an_azure_deployment_path_serves(own: OwnStack) -> None:
    key = await own.create_key("mini-app")
    # `gpt-4o-mini` is an allowed model's name, but as an Azure deployment it is `big`.
    async with httpx.AsyncClient(timeout=10) as http:
        response = await http.post(
            f"{_url(own)}/openai/deployments/gpt-4o-mini/chat/completions",
            params={"api-version": "2024-10-21"},
            json=CHAT,
            headers={"api-key": key},
        )
        assert response.status_code == 403, response.text
        assert response.json()["error"]["code"] == "model_not_allowed"
        allowed = await http.post(
            f"{_url(own)}/v1/chat/completions",
            json=CHAT,
            headers={"authorization": f"Bearer {key}"},
        )
        assert allowed.status_code == 200


async def test_a_key_in_the_query_string_is_not_written_to_the_access_log(own: OwnStack) -> None:
    secret = "gwk_" + "s" * 43
    async with httpx.AsyncClient(timeout=10) as http:
        response = await http.post(
            f"{_url(own)}/v1/chat/completions",
            params={"api-key": secret},
            json=CHAT,
            headers={"authorization": f"Bearer {own.api_key}"},
        )
    assert response.status_code == 200
    request_id = response.headers["x-request-id"]
    await own.rows_for([request_id])
    logs = own.stack.log_dir / "envoy-access.log"
    usage_log = own.stack.usage_log
    for path in (logs, usage_log):
        text = await _text_with(path, request_id)
        assert request_id in text and secret not in text, path


async def _text_with(path: Path, needle: str, timeout: float = 5.0) -> str:
    """The file's text once it holds ``needle`` (Envoy flushes logs every 100 ms), or as
    it is after ``timeout``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    text = await asyncio.to_thread(path.read_text)
    while needle not in text and loop.time() < deadline:
        await asyncio.sleep(0.05)
        text = await asyncio.to_thread(path.read_text)
    return text

"""The alternative Envoy rendering with a request-headers message (`--headers-phase`):
keys and request rates are refused from the headers, and everything else still works."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import openai
import pytest

from tests.conftest import DatabaseFactory
from tests.e2e.stack_helpers import OwnStack, unique_prefix

pytestmark = pytest.mark.e2e

CONFIG = """
providers:
  mock: {type: openai, base_url: "http://127.0.0.1:{mock}", retries: {attempts: 0}}
models:
  gpt-4o-mini: {provider: mock}
  gpt-4o: {provider: mock}
policies:
  two-per-hour: {type: rate_limit, requests: 2, window: 1h}
  mini-only: {type: model_allowlist, models: [gpt-4o-mini]}
applications:
  headers-app: {org: h, policies: [two-per-hour, mini-only]}
"""
HELLO = [{"role": "user", "content": "Hello"}]


@pytest.fixture(scope="module")
async def gw(
    databases: DatabaseFactory, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[OwnStack]:
    stack = await OwnStack.start(
        databases,
        Path(tmp_path_factory.mktemp("headers")),
        CONFIG,
        redis_url=redis_url,
        redis_prefix=unique_prefix("headers"),
        key_app="headers-app",
        label="headers",
        headers_phase=True,
    )
    try:
        yield stack
    finally:
        await stack.stop()


async def test_headers_phase_end_to_end(gw: OwnStack) -> None:
    client = openai.AsyncOpenAI(base_url=gw.base_url, api_key=gw.api_key, max_retries=0)
    raw = await client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=HELLO
    )
    assert raw.headers["x-ratelimit-remaining-requests"] == "1"
    completion = raw.parse()
    [row] = await gw.wait_rows("request_id = $1", (raw.headers["x-request-id"],), 1)
    assert row["status_code"] == 200 and row["app_id"] == "headers-app"
    assert completion.usage is not None
    assert row["prompt_tokens"] == completion.usage.prompt_tokens
    with pytest.raises(openai.PermissionDeniedError):  # a body check still runs
        await client.chat.completions.create(model="gpt-4o", messages=HELLO)

    with pytest.raises(openai.RateLimitError) as info:  # refused from the headers
        await client.chat.completions.create(model="gpt-4o-mini", messages=HELLO)
    assert info.value.code == "rate_limit_exceeded"
    bad = openai.AsyncOpenAI(base_url=gw.base_url, api_key="gwk_nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        await bad.chat.completions.create(model="gpt-4o-mini", messages=HELLO)
    models = [m.id async for m in await client.models.list()]
    assert models == ["gpt-4o-mini"]  # the allowlist applies to the listing

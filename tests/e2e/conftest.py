"""End-to-end fixtures: the real stack (mock upstream, ext_proc server, Envoy) started
once per test session with the project's own Envoy renderer, on free ports, against a
database of its own on the real Postgres and a private Redis key prefix.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anthropic
import asyncpg
import httpx
import openai
import pytest

from ext_proc.dev import Stack, free_port
from tests.conftest import DatabaseFactory, delete_prefix
from tests.e2e.stack_helpers import new_stack, unique_prefix

E2E_CONFIG = """
providers:
  mock:  {{type: openai, base_url: "http://127.0.0.1:{mock}", timeout: 30s, retries: {{attempts: 0}}}}
  azure-mock: {{type: azure_openai, base_url: "http://127.0.0.1:{mock}", api_version: "2024-10-21",
               api_key_env: E2E_AZURE_KEY, retries: {{attempts: 0}}}}
  keyed-mock: {{type: openai, base_url: "http://127.0.0.1:{mock}/v1", api_key_env: E2E_OPENAI_KEY,
               retries: {{attempts: 0}}}}
  anthropic-mock: {{type: anthropic, base_url: "http://127.0.0.1:{mock}", api_key_env: E2E_ANTHROPIC_KEY,
                   retries: {{attempts: 0}}}}
  file-keyed: {{type: openai, base_url: "http://127.0.0.1:{mock}", api_key_file: {key_file},
               retries: {{attempts: 0}}}}
models:
  gpt-4o-mini: {{provider: mock}}
  gpt-4o: {{provider: mock}}
  gpt-4: {{provider: mock}}
  text-embedding-3-small: {{provider: mock}}
  azure-4o: {{provider: azure-mock, deployment: gpt-4o-prod}}
  renamed: {{provider: keyed-mock, deployment: gpt-4o-mini}}
  claude-sonnet-4: {{provider: anthropic-mock, deployment: claude-sonnet-4-20250514}}
  file-model: {{provider: file-keyed, deployment: gpt-4o-mini}}
  priced-4o: {{provider: mock, deployment: gpt-4o, price: {{input: 2.5, cached_input: 1.25, output: 10}}}}
policies:
  three-per-hour: {{type: rate_limit, requests: 3, window: 1h}}
  per-key-two: {{type: rate_limit, requests: 2, window: 1h, scope: key}}
  token-budget: {{type: token_limit, tokens: 400, window: 1h, default_max_tokens: 100}}
  mini-only: {{type: model_allowlist, models: [gpt-4o-mini, "text-*"]}}
  small-bodies: {{type: request_size, max_bytes: 4000, max_messages: 3}}
  no-streams: {{type: custom_cel, pre_check_expression: "!stream", message: "streaming is disabled for this app"}}
  short-answers: {{type: custom_cel, post_check_expression: "completion_tokens < 20", cooldown: 1h}}
  generous: {{type: rate_limit, requests: 100000, window: 1h}}
  tenth-of-a-cent: {{type: budget, usd: 0.001, period: month, default_max_tokens: 50}}
applications:
  e2e-app: {{org: e2e, policies: [generous]}}
  limited-app: {{org: e2e, policies: [three-per-hour]}}
  keyed-app: {{org: e2e, policies: [per-key-two]}}
  budget-app: {{org: e2e, policies: [token-budget]}}
  checked-app: {{org: e2e, policies: [mini-only, small-bodies, no-streams]}}
  post-app: {{org: e2e, policies: [short-answers]}}
  env-app: {{org: e2e, environments: {{prod: {{policies: [mini-only]}}}}}}
  spender-app: {{org: e2e, policies: [tenth-of-a-cent]}}
"""

AZURE_KEY = "azure-provider-key-" + uuid.uuid4().hex[:8]
OPENAI_KEY = "openai-provider-key-" + uuid.uuid4().hex[:8]
ANTHROPIC_KEY = "anthropic-provider-key-" + uuid.uuid4().hex[:8]


class E2E:
    """Handles for a running stack: URLs, the database, and helpers tests share."""

    def __init__(self, stack: Stack, database_url: str, mock_port: int) -> None:
        self.stack = stack
        assert stack.api_key is not None
        self.api_key: str = stack.api_key
        self.database_url = database_url
        self.mock_port = mock_port
        self.base_url = stack.listener_url
        self.metrics_url = f"http://127.0.0.1:{stack.options.metrics_port}/metrics"
        self.mock_url = f"http://127.0.0.1:{mock_port}"
        self.provider_key_file: Path | None = None

    async def usage_row(self, request_id: str, timeout: float = 15.0) -> dict[str, Any]:
        """The usage row for a request, polling (bounded) until the writer has flushed it."""
        conn = await asyncpg.connect(self.database_url)
        try:
            deadline = time.monotonic() + timeout
            while True:
                row = await conn.fetchrow(
                    "SELECT * FROM usage_records WHERE request_id = $1", request_id
                )
                if row is not None:
                    return dict(row)
                if time.monotonic() > deadline:
                    raise AssertionError(f"no usage row for request {request_id} after {timeout}s")
                await asyncio.sleep(0.05)
        finally:
            await conn.close()

    async def count_rows(self, request_id: str) -> int:
        conn = await asyncpg.connect(self.database_url)
        try:
            return int(
                await conn.fetchval(
                    "SELECT count(*) FROM usage_records WHERE request_id = $1", request_id
                )
            )
        finally:
            await conn.close()

    async def create_key(self, app: str, environment: str = "default") -> str:
        return await asyncio.to_thread(self.stack.create_key, app, environment)

    def sdk(
        self, marker: str | None = None, *, key: str | None = None, **headers: str
    ) -> openai.AsyncOpenAI:
        """The ``openai`` SDK through the gateway (no retries): the stack's API key unless
        ``key`` is given, ``x-test-id: marker`` on every request when ``marker`` is."""
        if marker is not None:
            headers = {"x-test-id": marker, **headers}
        return openai.AsyncOpenAI(
            base_url=f"{self.base_url}/v1",
            api_key=self.api_key if key is None else key,
            max_retries=0,
            default_headers=headers or None,
            timeout=30,
        )

    def mock_requests(self, marker: str) -> list[dict[str, Any]]:
        """What the mock upstream received for requests carrying ``x-test-id: marker``."""
        response = httpx.get(
            f"{self.mock_url}/_mock/requests", params={"header": f"x-test-id:{marker}"}, timeout=5
        )
        response.raise_for_status()
        data = response.json()
        return list(data["requests"] if isinstance(data, dict) else data)

    def metric(self, name: str, **labels: str) -> float:
        """Sum of a Prometheus sample (by exact name) over series matching ``labels``."""
        text = httpx.get(self.metrics_url, timeout=5).text
        total = 0.0
        for line in text.splitlines():
            if not line.startswith(name) or line.startswith("#"):
                continue
            series, _, value = line.rpartition(" ")
            metric_name, _, label_text = series.partition("{")
            if metric_name != name:
                continue
            if all(f'{k}="{v}"' in label_text for k, v in labels.items()):
                total += float(value)
        return total


@pytest.fixture(scope="session")
async def e2e(
    databases: DatabaseFactory, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[E2E]:
    database_url = await databases.create("e2e")
    tmp = Path(tmp_path_factory.mktemp("e2e"))
    mock_port = free_port()
    key_file = tmp / "provider-key"
    key_file.write_text("file-key-1\n")
    stack = new_stack(
        tmp,
        E2E_CONFIG.format(mock=mock_port, key_file=key_file),
        mock_port,
        key_app="e2e-app",
        database_url=database_url,
        redis_url=redis_url,
        redis_prefix=unique_prefix("e2e"),
        extra_env={
            "E2E_AZURE_KEY": AZURE_KEY,
            "E2E_OPENAI_KEY": OPENAI_KEY,
            "E2E_ANTHROPIC_KEY": ANTHROPIC_KEY,
        },
    )
    await asyncio.to_thread(stack.start)
    try:
        e2e = E2E(stack, database_url, mock_port)
        e2e.provider_key_file = key_file
        yield e2e
    finally:
        await asyncio.to_thread(stack.stop)
        await delete_prefix(redis_url, stack.options.redis_prefix)


@pytest.fixture(autouse=True)
async def close_sdk_clients(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[None]:
    """Close every async SDK client a test makes, when the test ends.

    An unclosed ``AsyncOpenAI`` collected by the garbage collector while another client
    is busy stalls some of that client's requests until their read timeout (seen with
    openai 3.54's httpx2 transport, against Envoy and against a bare HTTP server alike);
    closing clients explicitly avoids it.
    """
    made: dict[int, Any] = {}
    for cls in (openai.AsyncOpenAI, anthropic.AsyncAnthropic):
        original = cls.__init__

        def init(self: Any, *args: Any, __original: Any = original, **kwargs: Any) -> None:
            __original(self, *args, **kwargs)
            made[id(self)] = self

        monkeypatch.setattr(cls, "__init__", init)
    yield
    for client in made.values():
        await client.close()


@pytest.fixture
def marker() -> Iterator[str]:
    """A unique value for the ``x-test-id`` header, to find this test's upstream calls."""
    yield uuid.uuid4().hex

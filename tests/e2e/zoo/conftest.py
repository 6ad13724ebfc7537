"""Fixtures of the provider-zoo tests: the zoo server, a gateway stack whose providers
all point at it, and what a test needs to check a request's usage row.

The stack is the module's own (own database, the shared Redis under a private prefix,
no mock upstream). On a failure, the tails of the stack's process logs are attached to
the report.
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
import openai
import pytest

from ext_proc.dev import Stack, StackOptions, free_port
from tests.conftest import DatabaseFactory
from tests.e2e.stack_helpers import OwnStack, unique_prefix
from tests.e2e.zoo.server import Received, ZooServer

OPENAI_KEY = "zoo-openai-key-" + uuid.uuid4().hex[:8]
AZURE_KEY = "zoo-azure-key-" + uuid.uuid4().hex[:8]
ANTHROPIC_KEY = "zoo-anthropic-key-" + uuid.uuid4().hex[:8]
AZURE_API_VERSION = "2024-10-21"
PROVIDER_TIMEOUT_S = 2

CONFIG = """
providers:
  zoo:        {{type: openai, base_url: "http://127.0.0.1:{port}", api_key_env: ZOO_OPENAI_KEY,
               timeout: {timeout}s, retries: {{attempts: 0}}}}
  zoo-azure:  {{type: azure_openai, base_url: "http://127.0.0.1:{port}", api_version: "{version}",
               api_key_env: ZOO_AZURE_KEY, timeout: {timeout}s, retries: {{attempts: 0}}}}
  zoo-claude: {{type: anthropic, base_url: "http://127.0.0.1:{port}",
               api_key_env: ZOO_ANTHROPIC_KEY, timeout: {timeout}s, retries: {{attempts: 0}}}}
models:
  zoo-gpt:    {{provider: zoo, deployment: gpt-4o-mini}}
  zoo-embed:  {{provider: zoo, deployment: text-embedding-3-small}}
  zoo-az:     {{provider: zoo-azure, deployment: gpt-4o-prod}}
  zoo-sonnet: {{provider: zoo-claude, deployment: claude-sonnet-4-20250514}}
applications:
  zoo-app: {{org: zoo}}
"""

LOG_TAIL_LINES = 40


class ZooGateway:
    """The running stack in front of the zoo, and the helpers the tests share."""

    def __init__(self, own: OwnStack, zoo: ZooServer) -> None:
        self.own = own
        self.zoo = zoo
        self.api_key = own.api_key
        self.listener = own.stack.listener_url

    # --- clients: every request names its zoo case and carries the test's marker

    def _headers(self, case: str, marker: str) -> dict[str, str]:
        return {"x-zoo": case, "x-test-id": marker}

    def openai(self, case: str, marker: str) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(
            base_url=f"{self.listener}/v1",
            api_key=self.api_key,
            max_retries=0,
            timeout=30,
            default_headers=self._headers(case, marker),
        )

    def azure(self, case: str, marker: str) -> openai.AsyncAzureOpenAI:
        return openai.AsyncAzureOpenAI(
            azure_endpoint=self.listener,
            api_key=self.api_key,
            api_version=AZURE_API_VERSION,
            max_retries=0,
            timeout=30,
            default_headers=self._headers(case, marker),
        )

    def anthropic(self, case: str, marker: str) -> anthropic.AsyncAnthropic:
        return anthropic.AsyncAnthropic(
            base_url=self.listener,
            api_key=self.api_key,
            max_retries=0,
            timeout=30,
            default_headers=self._headers(case, marker),
        )

    # --- the usage row

    async def row(self, request_id: str, timeout: float = 15.0) -> dict[str, Any]:
        """The request's usage row (polled, bounded), after checking it is the only one."""
        assert request_id, "the response carried no x-request-id"
        assert "zoo" not in request_id, (
            f"the app got the provider's x-request-id {request_id!r}, not the gateway's"
        )
        conn = await asyncpg.connect(self.own.database_url)
        try:
            deadline = time.monotonic() + timeout
            while True:
                rows = await conn.fetch(
                    "SELECT * FROM usage_records WHERE request_id = $1", request_id
                )
                if rows or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.05)
            count = await conn.fetchval(
                "SELECT count(*) FROM usage_records WHERE request_id = $1", request_id
            )
        finally:
            await conn.close()
        assert rows, f"no usage row for request {request_id} after {timeout}s"
        assert count == 1, f"{count} usage rows for request {request_id}"
        return dict(rows[0])

    # --- what reached the provider

    def upstream(self, marker: str, credential: tuple[str, str]) -> Received:
        """The one request the zoo got for ``marker``, checked for key hygiene:
        the provider's credential arrived (``credential``: header, value), the gateway
        key did not, anywhere."""
        got = self.zoo.requests(marker)
        assert len(got) == 1, f"the zoo got {len(got)} requests for this test, expected 1"
        [seen] = got
        header, value = credential
        assert seen.headers.get(header) == value, (
            f"provider credential: {header}={seen.headers.get(header)!r}, expected {value!r}"
        )
        everything = repr(seen.headers) + seen.target + seen.body.decode("utf-8", "replace")
        assert self.api_key not in everything, "the gateway key reached the provider"
        return seen

    # --- debugging

    def log_tails(self) -> str:
        parts = []
        for path in sorted(Path(self.own.stack.log_dir).glob("*.log")):
            lines = path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
            parts.append(f"--- {path.name} (last {len(lines)} lines)\n" + "\n".join(lines))
        return "\n".join(parts) or "(no logs)"


OPENAI_CREDENTIAL = ("authorization", f"Bearer {OPENAI_KEY}")
AZURE_CREDENTIAL = ("api-key", AZURE_KEY)
ANTHROPIC_CREDENTIAL = ("x-api-key", ANTHROPIC_KEY)


@pytest.fixture(scope="module")
def zoo() -> Iterator[ZooServer]:
    server = ZooServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
async def zoo_gw(
    zoo: ZooServer,
    databases: DatabaseFactory,
    redis_url: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[ZooGateway]:
    tmp = Path(tmp_path_factory.mktemp("zoo"))
    config_path = tmp / "gateway.yaml"
    config_path.write_text(
        CONFIG.format(port=zoo.port, version=AZURE_API_VERSION, timeout=PROVIDER_TIMEOUT_S)
    )
    database_url = await databases.create("zoo")
    stack = Stack(
        StackOptions(
            config_path=config_path,
            data_dir=tmp / "data",
            listener_port=free_port(),
            envoy_admin_port=free_port(),
            grpc_port=free_port(),
            metrics_port=free_port(),
            admin_port=free_port(),
            start_mock=False,
            quiet=True,
            key_app="zoo-app",
            database_url=database_url,
            redis_url=redis_url,
            redis_prefix=unique_prefix("zoo"),
            extra_env={
                "ZOO_OPENAI_KEY": OPENAI_KEY,
                "ZOO_AZURE_KEY": AZURE_KEY,
                "ZOO_ANTHROPIC_KEY": ANTHROPIC_KEY,
            },
        )
    )
    await asyncio.to_thread(stack.start)  # stops what it started on failure
    own = OwnStack(stack, database_url)
    try:
        yield ZooGateway(own, zoo)
    finally:
        await own.stop()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.when == "call" and report.failed:
        gw = getattr(item, "funcargs", {}).get("zoo_gw")
        if isinstance(gw, ZooGateway):
            report.sections.append(("zoo stack logs", gw.log_tails()))
    return report

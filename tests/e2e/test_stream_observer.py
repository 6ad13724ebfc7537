"""Which response filter counts a stream, end to end: the observe-only one (Envoy sends
each chunk without waiting) for streams the gateway does not rewrite, the mutating one
for translated streams. Either way the request leaves one exact row. The provider quirks
(no content type, gzip, no usage chunk, cut mid-stream, held until the app cancels)
through the observer are the zoo's stream cases (``tests/e2e/zoo``).
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import asyncpg
import pytest

from ext_proc.tokens.encodings import encoding_for_model
from tests.e2e.conftest import E2E

pytestmark = pytest.mark.e2e

MESSAGES = [{"role": "user", "content": "Say hello to the stream observer."}]


async def usage_log_line(e2e: E2E, request_id: str, timeout: float = 10.0) -> dict[str, Any]:
    """Envoy's usage-log line of a request (polling, bounded: Envoy flushes every 100 ms)."""
    deadline = time.monotonic() + timeout
    path = e2e.stack.usage_log
    while True:
        for raw in path.read_bytes().splitlines():
            if request_id.encode() in raw:
                entry: dict[str, Any] = json.loads(raw)
                if entry.get("id") == request_id:
                    return entry
        if time.monotonic() > deadline:
            raise AssertionError(f"no usage-log line for {request_id} after {timeout}s")
        await asyncio.sleep(0.05)


async def rows(e2e: E2E, request_id: str) -> int:
    conn = await asyncpg.connect(e2e.database_url)
    try:
        count: int = await conn.fetchval(
            "SELECT count(*) FROM usage_records WHERE request_id = $1", request_id
        )
        return count
    finally:
        await conn.close()


async def test_a_plain_stream_is_observed_and_exact(e2e: E2E, marker: str) -> None:
    c = e2e.sdk(marker, **{"x-mock-chunks": "9"})
    async with c.chat.completions.with_streaming_response.create(
        model="gpt-4o-mini",
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
    ) as response:
        request_id = response.headers["x-request-id"]
        chunks = [chunk async for chunk in await response.parse()]
    usage = chunks[-1].usage
    assert usage is not None
    line = await usage_log_line(e2e, request_id)
    assert line["route"] == "to_mock_observed" and line["ob"] == "1"
    assert "rp" not in line  # the observer answers nothing: the route marks the request
    row = await e2e.usage_row(request_id)
    assert row["recorded_by"] == "response"
    assert (row["prompt_tokens"], row["completion_tokens"], row["total_tokens"]) == (
        usage.prompt_tokens,
        usage.completion_tokens,
        usage.total_tokens,
    )
    assert row["tokens_estimated"] is False and row["partial"] is False
    assert row["ttft_ms"] is not None and row["response_bytes"] > 0
    await asyncio.sleep(0.3)  # past Envoy's next flush: nothing writes a second record
    assert await rows(e2e, request_id) == 1


async def test_a_cancelled_observed_stream_has_one_row_with_what_was_delivered(
    e2e: E2E, marker: str
) -> None:
    c = e2e.sdk(marker, **{"x-mock-chunks": "60", "x-mock-chunk-delay-ms": "40"})
    received = ""
    async with c.chat.completions.with_streaming_response.create(
        model="gpt-4o-mini",
        messages=MESSAGES,
        stream=True,
        extra_headers={"x-mock-completion-tokens": "60"},
    ) as response:
        request_id = response.headers["x-request-id"]
        stream = await response.parse()
        async for chunk in stream:
            if chunk.choices:
                received += chunk.choices[0].delta.content or ""
            if len(received) > 20:
                break
        await stream.close()
    line = await usage_log_line(e2e, request_id)
    assert line["route"] == "to_mock_observed"
    row = await e2e.usage_row(request_id)
    # The log waited for the observer's record instead of standing in for it.
    assert row["recorded_by"] == "response"
    assert row["partial"] is True and row["tokens_estimated"] is True
    delivered = len(encoding_for_model("gpt-4o-mini").encode(received))
    assert delivered <= row["completion_tokens"] < 60
    assert await rows(e2e, request_id) == 1


async def test_a_translated_stream_keeps_the_mutating_filter(e2e: E2E, marker: str) -> None:
    c = e2e.sdk(marker)
    async with c.chat.completions.with_streaming_response.create(
        model="claude-sonnet-4",
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
    ) as response:
        request_id = response.headers["x-request-id"]
        chunks = [chunk async for chunk in await response.parse()]
    assert chunks[0].object == "chat.completion.chunk"  # rewritten into OpenAI's shape
    usage = chunks[-1].usage
    assert usage is not None
    line = await usage_log_line(e2e, request_id)
    assert line["route"] == "to_anthropic-mock_via_response_processor"
    assert line["rp"] == "1" and "ob" not in line
    row = await e2e.usage_row(request_id)
    assert (row["prompt_tokens"], row["completion_tokens"]) == (
        usage.prompt_tokens,
        usage.completion_tokens,
    )
    assert row["recorded_by"] == "response" and row["tokens_estimated"] is False

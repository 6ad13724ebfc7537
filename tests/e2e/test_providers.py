"""Providers end to end: Anthropic natively and behind the OpenAI SDK, credentials.

The mock upstream plays Anthropic; assertions cover what the SDK gets, what the
"provider" received (its key, never the app's), and the usage row.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import anthropic
import openai
import pytest

from tests.e2e.conftest import ANTHROPIC_KEY, E2E

pytestmark = pytest.mark.e2e

CLAUDE = "claude-sonnet-4"
DEPLOYMENT = "claude-sonnet-4-20250514"
QUESTION = [{"role": "user", "content": "Name three colours."}]


def claude(e2e: E2E, marker: str, **headers: str) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(
        base_url=e2e.base_url,
        api_key=e2e.api_key,
        max_retries=0,
        default_headers={"x-test-id": marker, **headers},
    )


async def test_anthropic_sdk_messages(e2e: E2E, marker: str) -> None:
    raw = await claude(e2e, marker).messages.with_raw_response.create(
        model=CLAUDE, max_tokens=64, messages=QUESTION
    )
    message = await raw.parse()
    assert message.content[0].type == "text" and message.content[0].text
    [seen] = e2e.mock_requests(marker)
    assert seen["path"] == "/v1/messages"
    assert seen["headers"]["x-api-key"] == ANTHROPIC_KEY
    assert seen["headers"]["anthropic-version"] == "2023-06-01"
    assert e2e.api_key not in json.dumps(seen["headers"])
    assert json.loads(seen["body"])["model"] == DEPLOYMENT
    row = await e2e.usage_row(raw.headers["x-request-id"])
    assert (row["endpoint"], row["provider"], row["model"]) == (
        "/v1/messages",
        "anthropic-mock",
        CLAUDE,
    )
    assert row["response_model"] == message.model
    assert row["prompt_tokens"] == message.usage.input_tokens
    assert row["completion_tokens"] == message.usage.output_tokens
    assert row["tokens_estimated"] is False


async def test_anthropic_sdk_stream_counts_once(e2e: E2E, marker: str) -> None:
    client = claude(e2e, marker, **{"x-mock-completion-tokens": "25", "x-mock-chunks": "5"})
    async with client.messages.stream(model=CLAUDE, max_tokens=64, messages=QUESTION) as stream:
        text = "".join([t async for t in stream.text_stream])
        final = await stream.get_final_message()
    assert text
    [seen] = e2e.mock_requests(marker)
    row = await e2e.usage_row(seen["headers"]["x-request-id"])
    assert row["stream"] is True
    # message_start carries an initial output count, message_delta the final one: the
    # row takes the final value, not their sum.
    assert row["completion_tokens"] == final.usage.output_tokens == 25
    assert row["prompt_tokens"] == final.usage.input_tokens
    assert row["tokens_estimated"] is False and row["partial"] is False


async def test_openai_sdk_to_anthropic_model(e2e: E2E, marker: str) -> None:
    raw = await e2e.sdk(marker).chat.completions.with_raw_response.create(
        model=CLAUDE,
        messages=[{"role": "system", "content": "Be brief."}, *QUESTION],
        max_tokens=50,
    )
    completion = raw.parse()
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.content
    assert completion.choices[0].finish_reason == "stop"
    [seen] = e2e.mock_requests(marker)
    sent = json.loads(seen["body"])
    assert seen["path"] == "/v1/messages"
    assert sent["system"] == "Be brief." and sent["max_tokens"] == 50
    assert sent["messages"] == [{"role": "user", "content": "Name three colours."}]
    row = await e2e.usage_row(raw.headers["x-request-id"])
    assert row["endpoint"] == "/v1/chat/completions" and row["provider"] == "anthropic-mock"
    assert completion.usage is not None
    assert row["prompt_tokens"] == completion.usage.prompt_tokens
    assert row["completion_tokens"] == completion.usage.completion_tokens


async def test_openai_sdk_stream_to_anthropic_model(e2e: E2E, marker: str) -> None:
    client = e2e.sdk(marker, **{"x-mock-completion-tokens": "12", "x-mock-chunks": "4"})
    async with client.chat.completions.with_streaming_response.create(
        model=CLAUDE,
        messages=QUESTION,
        stream=True,
        stream_options={"include_usage": True},
    ) as response:
        request_id = response.headers["x-request-id"]
        chunks = [c async for c in await response.parse()]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12
    row = await e2e.usage_row(request_id)
    assert row["stream"] is True and row["completion_tokens"] == 12
    assert row["tokens_estimated"] is False


async def test_anthropic_errors_are_anthropic_shaped(e2e: E2E) -> None:
    bad = anthropic.AsyncAnthropic(base_url=e2e.base_url, api_key="gwk_wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as info:
        await bad.messages.create(model=CLAUDE, max_tokens=10, messages=QUESTION)
    body = info.value.response.json()
    assert body["type"] == "error" and body["error"]["type"] == "authentication_error"
    good = anthropic.AsyncAnthropic(base_url=e2e.base_url, api_key=e2e.api_key, max_retries=0)
    with pytest.raises(anthropic.BadRequestError) as info2:
        await good.messages.create(model="gpt-4o-mini", max_tokens=10, messages=QUESTION)
    assert info2.value.response.json()["error"]["code"] == "unsupported_endpoint"


async def test_translation_refuses_what_anthropic_cannot_do(e2e: E2E, marker: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await e2e.sdk(marker).chat.completions.create(model=CLAUDE, messages=QUESTION, n=2)
    assert info.value.param == "n"
    assert e2e.mock_requests(marker) == []


async def test_provider_key_file_reloaded_on_sighup(e2e: E2E, marker: str) -> None:
    assert e2e.provider_key_file is not None
    client = e2e.sdk(marker)
    await client.chat.completions.create(model="file-model", messages=QUESTION)
    assert e2e.mock_requests(marker)[-1]["headers"]["authorization"] == "Bearer file-key-1"
    e2e.provider_key_file.write_text("file-key-2\n")
    for name, process in e2e.stack.processes:
        if name.startswith("ext-proc"):
            os.kill(process.pid, signal.SIGHUP)
    deadline = time.monotonic() + 5
    while True:
        await client.chat.completions.create(model="file-model", messages=QUESTION)
        if e2e.mock_requests(marker)[-1]["headers"]["authorization"] == "Bearer file-key-2":
            break
        assert time.monotonic() < deadline, "the new provider key was not picked up"
        await asyncio.sleep(0.05)

"""Cohere end to end: the stock OpenAI SDK through the real Envoy and ext_proc to the
mock upstream's Cohere v2 API (a stack of this module's own, with a ``type: cohere``
provider). Each test asserts what the app got, what "Cohere" received (its own request
shape, the provider's key and never the app's), and the usage row: exact billed tokens
from Cohere's own bytes, the served model, the cost from genai-prices' Cohere list, and
one row per request.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from ext_proc.mock.cohere_api import COHERE_ENCODING
from ext_proc.tokens.encodings import get_encoding
from tests.conftest import DatabaseFactory
from tests.e2e.stack_helpers import OwnStack, unique_prefix

pytestmark = pytest.mark.e2e

COHERE_KEY = "cohere-provider-key-e2e"
CONFIG = """
providers:
  cohere-mock: {type: cohere, base_url: "http://127.0.0.1:{mock}", api_key_env: E2E_COHERE_KEY,
                timeout: 30s, retries: {attempts: 0}}
models:
  command-r: {provider: cohere-mock, deployment: command-r-08-2024}
  embed: {provider: cohere-mock, deployment: embed-v4.0}
applications:
  cohere-app: {org: e2e}
"""
DEPLOYMENT = "command-r-08-2024"
# genai-prices' Cohere list, USD per million tokens.
COMMAND_R_PRICE = (Decimal("0.15"), Decimal("0.6"))
EMBED_PRICE = Decimal("0.12")
QUESTION: list[Any] = [{"role": "user", "content": "Name three colours."}]
WEATHER_TOOL: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"location": {"type": "string"}},
            "required": ["location"],
        },
    },
}


def tokens(text: str) -> int:
    """A count in the mock's stand-in tokenizer for Cohere's."""
    return len(get_encoding(COHERE_ENCODING).encode_ordinary(text))


def cost(prompt: int, completion: int, price: tuple[Decimal, Decimal]) -> Decimal:
    return ((prompt * price[0] + completion * price[1]) / Decimal(1_000_000)).quantize(
        Decimal("1e-10")
    )


@pytest.fixture(scope="module")
async def gw(
    databases: DatabaseFactory, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[OwnStack]:
    stack = await OwnStack.start(
        databases,
        Path(tmp_path_factory.mktemp("cohere")),
        CONFIG,
        redis_url=redis_url,
        redis_prefix=unique_prefix("cohere"),
        key_app="cohere-app",
        label="cohere",
        extra_env={"E2E_COHERE_KEY": COHERE_KEY},
    )
    try:
        yield stack
    finally:
        await stack.stop()


def sdk(gw: OwnStack, marker: str, **headers: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=gw.base_url,
        api_key=gw.api_key,
        max_retries=0,
        timeout=30,
        default_headers={"x-test-id": marker, **headers},
    )


def received(gw: OwnStack, marker: str) -> list[dict[str, Any]]:
    """What the mock upstream received for requests carrying ``x-test-id: marker``."""
    response = httpx.get(
        f"http://127.0.0.1:{gw.stack.options.mock_port}/_mock/requests",
        params={"header": f"x-test-id:{marker}"},
        timeout=5,
    )
    response.raise_for_status()
    return list(response.json())


async def the_row(gw: OwnStack, request_id: str) -> dict[str, Any]:
    """The request's usage row, and that it is the only one."""
    row = (await gw.rows_for([request_id]))[request_id]
    count = await gw.fetch(
        "SELECT count(*) AS n FROM usage_records WHERE request_id = $1", request_id
    )
    assert count[0]["n"] == 1
    return row


def assert_exact(row: dict[str, Any], prompt: int, completion: int) -> None:
    assert (row["prompt_tokens"], row["completion_tokens"], row["total_tokens"]) == (
        prompt,
        completion,
        prompt + completion,
    )
    assert row["tokens_estimated"] is False and row["partial"] is False
    assert (row["provider"], row["deployment"]) == ("cohere-mock", DEPLOYMENT)
    assert row["response_model"] is None  # Cohere's answers do not name the model
    assert row["cost_usd"] == cost(prompt, completion, COMMAND_R_PRICE)
    assert (row["status_code"], row["decision"]) == (200, "allowed")


async def test_chat_json(gw: OwnStack, marker: str) -> None:
    raw = await sdk(gw, marker).chat.completions.with_raw_response.create(
        model="command-r",
        messages=[{"role": "system", "content": "Be brief."}, *QUESTION],
        max_tokens=50,
    )
    completion = raw.parse()
    answer = f"This is a mock response from {DEPLOYMENT}."
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.content == answer
    assert completion.choices[0].finish_reason == "stop"
    [seen] = received(gw, marker)
    assert seen["path"] == "/v2/chat"
    assert seen["headers"]["authorization"] == f"Bearer {COHERE_KEY}"
    assert gw.api_key not in json.dumps(seen["headers"])
    assert json.loads(seen["body"]) == {
        "model": DEPLOYMENT,
        "messages": [{"role": "system", "content": "Be brief."}, *QUESTION],
        "max_tokens": 50,
    }
    # Cohere's billed tokens: the text sent and the text written (not its template).
    prompt, output = tokens("Be brief.") + tokens("Name three colours."), tokens(answer)
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (prompt, output)
    row = await the_row(gw, raw.headers["x-request-id"])
    assert (row["endpoint"], row["model"], row["stream"]) == (
        "/v1/chat/completions",
        "command-r",
        False,
    )
    assert_exact(row, prompt, output)


@pytest.mark.parametrize("include_usage", [True, False])
async def test_chat_stream(gw: OwnStack, marker: str, include_usage: bool) -> None:
    client = sdk(gw, marker, **{"x-mock-completion-tokens": "12", "x-mock-chunks": "4"})
    async with client.chat.completions.with_streaming_response.create(
        model="command-r",
        messages=QUESTION,
        stream=True,
        stream_options={"include_usage": True} if include_usage else openai.omit,
    ) as response:
        request_id = response.headers["x-request-id"]
        chunks = [chunk async for chunk in await response.parse()]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert tokens(text) == 12
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    [seen] = received(gw, marker)
    sent = json.loads(seen["body"])
    assert sent["stream"] is True and "stream_options" not in sent
    if include_usage:
        assert chunks[-1].choices == [] and chunks[-1].usage is not None
        assert chunks[-1].usage.completion_tokens == 12
    else:
        assert all(chunk.usage is None for chunk in chunks)
    # Cohere's stream always reports usage: the row is exact either way.
    row = await the_row(gw, request_id)
    assert row["stream"] is True
    assert_exact(row, tokens("Name three colours."), 12)
    assert row["ttft_ms"] is not None and row["ttft_ms"] <= row["latency_ms"]


async def test_tool_calls_both_ways(gw: OwnStack, marker: str) -> None:
    client = sdk(gw, marker)
    messages: list[Any] = [{"role": "user", "content": "Weather in Oslo?"}]
    first = await client.chat.completions.with_raw_response.create(
        model="command-r", messages=messages, tools=[WEATHER_TOOL]
    )
    completion = first.parse()
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls is not None
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"location": "mock"}
    plan = choice.message.content
    assert plan == "I will use get_weather to answer this."
    tools_json = json.dumps([WEATHER_TOOL], separators=(",", ":"))
    row = await the_row(gw, first.headers["x-request-id"])
    assert_exact(
        row,
        tokens("Weather in Oslo?") + tokens(tools_json),
        tokens(plan) + tokens("get_weather") + tokens(call.function.arguments),
    )

    # The call and its result go back; the streamed answer is text.
    messages += [
        {
            "role": "assistant",
            "content": plan,
            "tool_calls": [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": call.function.arguments},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call.id, "content": "12C, raining"},
    ]
    async with client.chat.completions.with_streaming_response.create(
        model="command-r", messages=messages, tools=[WEATHER_TOOL], stream=True
    ) as response:
        request_id = response.headers["x-request-id"]
        chunks = [chunk async for chunk in await response.parse()]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    sent = json.loads(received(gw, marker)[-1]["body"])["messages"]
    assert sent[1] == {
        "role": "assistant",
        "tool_plan": plan,
        "tool_calls": [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": "get_weather", "arguments": call.function.arguments},
            }
        ],
    }
    assert sent[2] == {"role": "tool", "tool_call_id": call.id, "content": "12C, raining"}
    prompt = sum(
        tokens(t)
        for t in (
            "Weather in Oslo?",
            plan,
            "get_weather",
            call.function.arguments,
            "12C, raining",
            tools_json,
        )
    )
    assert_exact(await the_row(gw, request_id), prompt, tokens(text))


async def test_embeddings(gw: OwnStack, marker: str) -> None:
    # The SDK asks for base64 by default (the gateway packs Cohere's floats as OpenAI does).
    raw = await sdk(gw, marker).embeddings.with_raw_response.create(
        model="embed", input=["first text", "a second, longer text"]
    )
    result = raw.parse()
    [seen] = received(gw, marker)
    assert seen["path"] == "/v2/embed"
    assert json.loads(seen["body"]) == {
        "model": "embed-v4.0",
        "texts": ["first text", "a second, longer text"],
        "input_type": "search_document",
        "embedding_types": ["float"],
    }
    assert [len(d.embedding) for d in result.data] == [8, 8]
    prompt = tokens("first text") + tokens("a second, longer text")
    assert (result.usage.prompt_tokens, result.usage.total_tokens) == (prompt, prompt)
    row = await the_row(gw, raw.headers["x-request-id"])
    assert (row["endpoint"], row["model"], row["deployment"]) == (
        "/v1/embeddings",
        "embed",
        "embed-v4.0",
    )
    assert (row["prompt_tokens"], row["completion_tokens"], row["total_tokens"]) == (
        prompt,
        0,
        prompt,
    )
    assert row["tokens_estimated"] is False and row["response_model"] is None
    assert row["cost_usd"] == (prompt * EMBED_PRICE / Decimal(1_000_000)).quantize(Decimal("1e-10"))
    # An embedding for queries: Cohere's own input_type through extra_body.
    await sdk(gw, marker).embeddings.create(
        model="embed", input="query", extra_body={"input_type": "search_query"}
    )
    assert json.loads(received(gw, marker)[-1]["body"])["input_type"] == "search_query"


@pytest.mark.parametrize("stream", [False, True])
async def test_provider_error_is_openai_shaped(gw: OwnStack, marker: str, stream: bool) -> None:
    client = sdk(gw, marker, **{"x-mock-status": "429"})
    with pytest.raises(openai.RateLimitError) as info:
        await client.chat.completions.create(model="command-r", messages=QUESTION, stream=stream)
    assert info.value.status_code == 429
    assert info.value.code == "rate_limit_exceeded"
    assert "x-mock-status: 429" in info.value.message
    row = await the_row(gw, info.value.response.headers["x-request-id"])
    assert (row["status_code"], row["decision"]) == (429, "error")
    assert (row["prompt_tokens"], row["completion_tokens"]) == (0, 0)
    assert row["cost_usd"] == 0


async def test_refused_parameter_never_reaches_cohere(gw: OwnStack, marker: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await sdk(gw, marker).chat.completions.create(model="command-r", messages=QUESTION, n=2)
    assert info.value.param == "n"
    assert received(gw, marker) == []
    row = await the_row(gw, info.value.response.headers["x-request-id"])
    assert (row["status_code"], row["decision"], row["prompt_tokens"]) == (400, "error", 0)


async def test_stream_cancelled_by_the_app(gw: OwnStack, marker: str) -> None:
    client = sdk(gw, marker, **{"x-mock-chunks": "60", "x-mock-chunk-delay-ms": "40"})
    received_text = ""
    async with client.chat.completions.with_streaming_response.create(
        model="command-r",
        messages=QUESTION,
        stream=True,
        extra_headers={"x-mock-completion-tokens": "60"},
    ) as response:
        request_id = response.headers["x-request-id"]
        stream = await response.parse()
        async for chunk in stream:
            if chunk.choices:
                received_text += chunk.choices[0].delta.content or ""
            if len(received_text) > 20:
                break
        await stream.close()
    row = await the_row(gw, request_id)
    assert row["partial"] is True and row["tokens_estimated"] is True
    # Counted from what was delivered: Envoy may have passed on a few chunks the app had
    # not read yet, never all 60; the prompt is the gateway's estimate.
    assert tokens(received_text) <= row["completion_tokens"] < 60
    assert row["prompt_tokens"] == row["estimated_prompt_tokens"] > 0
    assert row["cost_usd"] == cost(row["prompt_tokens"], row["completion_tokens"], COMMAND_R_PRICE)


async def test_stream_cut_by_the_provider(gw: OwnStack, marker: str) -> None:
    client = sdk(
        gw,
        marker,
        **{"x-mock-chunks": "10", "x-mock-cut-after": "3", "x-mock-chunk-delay-ms": "40"},
    )
    received_text = ""
    with pytest.raises(Exception):  # noqa: B017 - the SDK raises its transport error
        async with client.chat.completions.with_streaming_response.create(
            model="command-r",
            messages=QUESTION,
            stream=True,
            extra_headers={"x-mock-completion-tokens": "10"},
        ) as response:
            async for chunk in await response.parse():
                if chunk.choices:
                    received_text += chunk.choices[0].delta.content or ""
    [seen] = received(gw, marker)
    row = await the_row(gw, seen["headers"]["x-request-id"])
    assert row["partial"] is True and row["tokens_estimated"] is True
    assert tokens(received_text) <= row["completion_tokens"] <= 3

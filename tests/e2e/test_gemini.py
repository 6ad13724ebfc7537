"""Google Gemini behind the stock OpenAI SDK, end to end through the real Envoy.

A stack of its own (Envoy, ext_proc, the mock upstream playing Gemini's API) serves
Gemini models to an app on the openai SDK: chat (JSON and streams, with and without
the usage chunk), tool calls both ways, embeddings, a provider error, a parameter
Gemini cannot honour, a stream the app cancels and one the provider cuts. Each test
checks what the app got, what the "provider" received (its key, never the app's), and
the usage row: exact tokens from Gemini's own usage, the served model, the cost from
the public price table (genai-prices' google list), one row per request. The mock's
shapes are checked against the official google-genai SDK too.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from google import genai
from google.genai import types as gemini

from tests.conftest import DatabaseFactory
from tests.e2e.stack_helpers import OwnStack, unique_prefix

pytestmark = pytest.mark.e2e

GEMINI_KEY = "AIza-e2e-" + uuid.uuid4().hex[:12]
CONFIG = """
providers:
  gemini: {type: gemini, base_url: "http://127.0.0.1:{mock}", api_key_env: E2E_GEMINI_KEY,
           timeout: 30s, retries: {attempts: 0}}
models:
  gemini-flash: {provider: gemini, deployment: gemini-2.5-flash}
  gemini-embed: {provider: gemini, deployment: gemini-embedding-001}
policies:
  roomy: {type: rate_limit, requests: 100000, window: 1h}
applications:
  gemini-app: {org: gemini-org, policies: [roomy]}
"""
DEPLOYMENT = "gemini-2.5-flash"
QUESTION: list[Any] = [{"role": "user", "content": "Name three colours."}]
WEATHER_TOOL: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
MILLION = Decimal(1_000_000)
# genai-prices' google list (USD per million): what the public table prices them at.
FLASH_PRICE = ("0.3", "0.03", "2.5")
EMBEDDING_INPUT_PRICE = Decimal("0.15")


@pytest.fixture(scope="module")
async def gw(
    databases: DatabaseFactory, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[OwnStack]:
    stack = await OwnStack.start(
        databases,
        Path(tmp_path_factory.mktemp("gemini")),
        CONFIG,
        redis_url=redis_url,
        redis_prefix=unique_prefix("gemini"),
        key_app="gemini-app",
        label="gemini",
        extra_env={"E2E_GEMINI_KEY": GEMINI_KEY},
    )
    try:
        yield stack
    finally:
        await stack.stop()


@pytest.fixture
async def client(gw: OwnStack, marker: str) -> AsyncIterator[openai.AsyncOpenAI]:
    sdk = sdk_for(gw, marker)
    yield sdk
    await sdk.close()


def sdk_for(gw: OwnStack, marker: str, **headers: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=gw.base_url,
        api_key=gw.api_key,
        max_retries=0,
        timeout=30,
        default_headers={"x-test-id": marker, **headers},
    )


def mock_url(gw: OwnStack) -> str:
    return f"http://127.0.0.1:{gw.stack.options.mock_port}"


def received(gw: OwnStack, marker: str) -> list[dict[str, Any]]:
    """What the mock upstream received for requests carrying ``x-test-id: marker``."""
    response = httpx.get(
        f"{mock_url(gw)}/_mock/requests", params={"header": f"x-test-id:{marker}"}, timeout=5
    )
    response.raise_for_status()
    return list(response.json())


async def only_row(gw: OwnStack, request_id: str) -> dict[str, Any]:
    rows = await gw.wait_rows("request_id = $1", (request_id,), 1)
    assert len(rows) == 1, rows  # one row per request
    return rows[0]


def by_hand(row: dict[str, Any], input_: str, cached: str, output: str) -> Decimal:
    """The row's cost from its own counts: uncached prompt at the input price, cached
    prompt at the cached price, completion (thinking included) at the output price."""
    prompt, hit = row["prompt_tokens"], row["cached_tokens"] or 0
    total = (
        (prompt - hit) * Decimal(input_)
        + hit * Decimal(cached)
        + row["completion_tokens"] * Decimal(output)
    )
    return total / MILLION


def assert_exact(row: dict[str, Any], prompt: int, completion: int, *, stream: bool) -> None:
    assert (row["prompt_tokens"], row["completion_tokens"]) == (prompt, completion)
    assert row["total_tokens"] == prompt + completion
    assert row["tokens_estimated"] is False and row["partial"] is False
    assert (row["status_code"], row["decision"], row["stream"]) == (200, "allowed", stream)
    assert (row["provider"], row["deployment"], row["model"]) == (
        "gemini",
        DEPLOYMENT,
        "gemini-flash",
    )
    assert row["endpoint"] == "/v1/chat/completions"
    assert row["response_model"] == DEPLOYMENT  # Gemini's modelVersion
    assert row["cost_usd"] == by_hand(row, *FLASH_PRICE)


# --------------------------------------------------------------------------- chat


async def test_chat_json(gw: OwnStack, client: openai.AsyncOpenAI, marker: str) -> None:
    raw = await client.chat.completions.with_raw_response.create(
        model="gemini-flash",
        messages=[{"role": "system", "content": "Be brief."}, *QUESTION],
        max_tokens=50,
        extra_headers={
            "x-mock-completion-tokens": "30",
            "x-mock-cached-tokens": "4",
            "x-mock-reasoning-tokens": "12",
        },
    )
    completion = raw.parse()
    assert completion.object == "chat.completion" and completion.model == DEPLOYMENT
    choice = completion.choices[0]
    assert choice.finish_reason == "stop"
    assert choice.message.content is not None and len(choice.message.content.split()) == 30
    usage = completion.usage
    assert usage is not None and usage.completion_tokens == 30 + 12
    assert usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens == 4
    assert usage.completion_tokens_details is not None
    assert usage.completion_tokens_details.reasoning_tokens == 12

    [seen] = received(gw, marker)
    assert seen["path"] == f"/v1beta/models/{DEPLOYMENT}:generateContent"
    assert seen["headers"]["x-goog-api-key"] == GEMINI_KEY
    assert gw.api_key not in json.dumps(seen["headers"])
    assert "authorization" not in seen["headers"]
    sent = json.loads(seen["body"])
    assert sent["systemInstruction"] == {"parts": [{"text": "Be brief."}]}
    assert sent["contents"] == [{"role": "user", "parts": [{"text": "Name three colours."}]}]
    assert sent["generationConfig"] == {"maxOutputTokens": 50}

    row = await only_row(gw, raw.headers["x-request-id"])
    assert_exact(row, usage.prompt_tokens, 42, stream=False)
    assert (row["cached_tokens"], row["reasoning_tokens"]) == (4, 12)
    assert row["cost_usd"] > 0 and row["recorded_by"] == "response"
    assert (row["app_id"], row["org_id"]) == ("gemini-app", "gemini-org")


async def stream_chat(client: openai.AsyncOpenAI, **kwargs: Any) -> tuple[str, list[Any]]:
    async with client.chat.completions.with_streaming_response.create(
        model="gemini-flash", messages=QUESTION, stream=True, **kwargs
    ) as response:
        request_id = response.headers["x-request-id"]
        chunks = [c async for c in await response.parse()]
    return request_id, chunks


async def test_stream_with_usage_chunk(
    gw: OwnStack, client: openai.AsyncOpenAI, marker: str
) -> None:
    request_id, chunks = await stream_chat(
        client,
        stream_options={"include_usage": True},
        extra_headers={"x-mock-completion-tokens": "20", "x-mock-chunks": "5"},
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(text.split()) == 20
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    final = chunks[-1]
    assert final.choices == [] and final.usage is not None
    assert final.usage.completion_tokens == 20
    [seen] = received(gw, marker)
    assert seen["path"] == f"/v1beta/models/{DEPLOYMENT}:streamGenerateContent"
    assert seen["query"] == "alt=sse"
    row = await only_row(gw, request_id)
    assert_exact(row, final.usage.prompt_tokens, 20, stream=True)
    assert row["ttft_ms"] is not None


async def test_stream_without_usage_chunk_is_still_exact(
    gw: OwnStack, client: openai.AsyncOpenAI
) -> None:
    request_id, chunks = await stream_chat(
        client, extra_headers={"x-mock-completion-tokens": "15", "x-mock-chunks": "3"}
    )
    assert chunks and all(c.choices and c.usage is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"
    # The row reads Gemini's own usage, which its streams always carry.
    json_call = await client.chat.completions.create(model="gemini-flash", messages=QUESTION)
    assert json_call.usage is not None
    row = await only_row(gw, request_id)
    assert_exact(row, json_call.usage.prompt_tokens, 15, stream=True)


async def test_tool_calls_both_ways(gw: OwnStack, client: openai.AsyncOpenAI, marker: str) -> None:
    question = [{"role": "user", "content": "Weather in Oslo?"}]
    first = await client.chat.completions.with_raw_response.create(
        model="gemini-flash", messages=question, tools=[WEATHER_TOOL]
    )
    choice = first.parse().choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls or []
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "mock"}

    async with client.chat.completions.with_streaming_response.create(
        model="gemini-flash",
        messages=[
            *question,
            choice.message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": -3}'},
        ],
        tools=[WEATHER_TOOL],
        stream=True,
    ) as response:
        second_id = response.headers["x-request-id"]
        chunks = [c async for c in await response.parse()]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == f"This is a mock response from {DEPLOYMENT}."

    first_sent, second_sent = (json.loads(r["body"]) for r in received(gw, marker))
    declaration = first_sent["tools"][0]["functionDeclarations"][0]
    assert declaration["parametersJsonSchema"] == WEATHER_TOOL["function"]["parameters"]
    model_turn, result_turn = second_sent["contents"][1:]
    assert model_turn["parts"][0]["functionCall"]["name"] == "get_weather"
    assert model_turn["parts"][0]["thoughtSignature"]  # carried back in the call's id
    assert result_turn["parts"][0]["functionResponse"]["name"] == "get_weather"
    assert result_turn["parts"][0]["functionResponse"]["response"] == {"temp_c": -3}

    first_row = await only_row(gw, first.headers["x-request-id"])
    usage = first.parse().usage
    assert usage is not None
    assert_exact(first_row, usage.prompt_tokens, usage.completion_tokens, stream=False)
    second_row = await only_row(gw, second_id)
    assert second_row["tokens_estimated"] is False and second_row["partial"] is False
    assert second_row["prompt_tokens"] > first_row["prompt_tokens"]


async def test_embeddings_are_estimated_from_the_input(
    gw: OwnStack, client: openai.AsyncOpenAI, marker: str
) -> None:
    raw = await client.embeddings.with_raw_response.create(
        model="gemini-embed", input=["red apples", "green pears"]
    )
    response = raw.parse()  # base64 on the wire, as the SDK asks by default
    assert [len(e.embedding) for e in response.data] == [8, 8]
    assert all(isinstance(v, float) for v in response.data[0].embedding)
    floats = await client.embeddings.create(
        model="gemini-embed", input="red apples", encoding_format="float"
    )
    assert floats.data[0].embedding == pytest.approx(response.data[0].embedding)
    seen = received(gw, marker)[0]
    assert seen["path"] == "/v1beta/models/gemini-embedding-001:batchEmbedContents"
    assert [r["content"]["parts"][0]["text"] for r in json.loads(seen["body"])["requests"]] == [
        "red apples",
        "green pears",
    ]
    row = await only_row(gw, raw.headers["x-request-id"])
    # Gemini reports no usage for embeddings: the prompt is the gateway's estimate.
    assert row["tokens_estimated"] is True and row["partial"] is False
    assert row["prompt_tokens"] == row["estimated_prompt_tokens"] > 0
    assert row["completion_tokens"] == 0 and row["total_tokens"] == row["prompt_tokens"]
    assert (row["endpoint"], row["model"], row["deployment"]) == (
        "/v1/embeddings",
        "gemini-embed",
        "gemini-embedding-001",
    )
    assert row["cost_usd"] == row["prompt_tokens"] * EMBEDDING_INPUT_PRICE / MILLION


# ------------------------------------------------------------------------- errors


async def test_provider_error_is_openai_shaped(gw: OwnStack, marker: str) -> None:
    client = sdk_for(gw, marker, **{"x-mock-status": "429"})
    with pytest.raises(openai.RateLimitError) as info:
        await client.chat.completions.create(model="gemini-flash", messages=QUESTION)
    await client.close()
    assert info.value.status_code == 429
    assert (info.value.code, info.value.type) == ("rate_limit_exceeded", "rate_limit_error")
    assert "x-mock-status: 429" in info.value.message
    row = await only_row(gw, info.value.response.headers["x-request-id"])
    assert (row["status_code"], row["decision"]) == (429, "error")
    assert (row["prompt_tokens"], row["completion_tokens"]) == (0, 0)  # Gemini billed nothing
    assert row["cost_usd"] == 0


async def test_parameter_gemini_cannot_honour_is_refused(
    gw: OwnStack, client: openai.AsyncOpenAI, marker: str
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(
            model="gemini-flash", messages=QUESTION, logit_bias={"1734": -100}
        )
    assert (info.value.param, info.value.code) == ("logit_bias", "unsupported_parameter")
    assert received(gw, marker) == []
    row = await only_row(gw, info.value.response.headers["x-request-id"])
    assert (row["status_code"], row["decision"], row["prompt_tokens"]) == (400, "error", 0)


async def test_stream_cancelled_by_the_app(gw: OwnStack, client: openai.AsyncOpenAI) -> None:
    reference = await client.chat.completions.create(model="gemini-flash", messages=QUESTION)
    assert reference.usage is not None
    delivered = ""
    async with client.chat.completions.with_streaming_response.create(
        model="gemini-flash",
        messages=QUESTION,
        stream=True,
        extra_headers={"x-mock-completion-tokens": "80", "x-mock-chunk-delay-ms": "40"},
    ) as response:
        request_id = response.headers["x-request-id"]
        async for chunk in await response.parse():
            if chunk.choices:
                delivered += chunk.choices[0].delta.content or ""
            if len(delivered.split()) >= 5:
                break  # the app stops reading and closes the connection
    row = await only_row(gw, request_id)
    assert row["partial"] is True and row["tokens_estimated"] is True
    # The prompt count is Gemini's (its running usage), the completion what was delivered.
    assert row["prompt_tokens"] == reference.usage.prompt_tokens
    assert 5 <= row["completion_tokens"] < 80
    assert row["cost_usd"] == by_hand(row, *FLASH_PRICE)


async def test_stream_cut_by_the_provider(gw: OwnStack, marker: str) -> None:
    # Chunks 40 ms apart: the stream is under way when the upstream dies.
    client = sdk_for(
        gw,
        marker,
        **{"x-mock-chunks": "10", "x-mock-cut-after": "3", "x-mock-chunk-delay-ms": "40"},
    )
    text = ""
    with pytest.raises(Exception):  # noqa: B017 - the SDK raises its transport error
        async with client.chat.completions.with_streaming_response.create(
            model="gemini-flash",
            messages=QUESTION,
            stream=True,
            extra_headers={"x-mock-completion-tokens": "10"},
        ) as response:
            async for chunk in await response.parse():
                if chunk.choices:
                    text += chunk.choices[0].delta.content or ""
    await client.close()
    # The cut can land before the response headers reach the app: take the request id
    # Envoy passed upstream.
    [seen] = received(gw, marker)
    row = await only_row(gw, seen["headers"]["x-request-id"])
    assert row["partial"] is True and row["tokens_estimated"] is True
    # Three one-token chunks went out before the cut; Envoy may drop data in flight when
    # it resets the app's stream, so the app can have received fewer.
    assert len(text.split()) <= row["completion_tokens"] <= 3
    assert row["prompt_tokens"] > 0


# ------------------------------------------------- the mock, by the official SDK


async def test_mock_speaks_gemini_to_the_google_genai_sdk(gw: OwnStack) -> None:
    client = genai.Client(
        api_key=GEMINI_KEY,
        http_options=gemini.HttpOptions(base_url=mock_url(gw), api_version="v1beta"),
    )
    answer = await client.aio.models.generate_content(
        model=DEPLOYMENT,
        contents="Name three colours.",
        config=gemini.GenerateContentConfig(system_instruction="Be brief.", max_output_tokens=5),
    )
    assert answer.text and answer.model_version == DEPLOYMENT
    assert (
        answer.candidates and answer.candidates[0].finish_reason == gemini.FinishReason.MAX_TOKENS
    )
    assert answer.usage_metadata is not None
    assert answer.usage_metadata.candidates_token_count == 5
    pieces = [
        c
        async for c in await client.aio.models.generate_content_stream(
            model=DEPLOYMENT, contents="Name three colours."
        )
    ]
    assert "".join(c.text or "" for c in pieces) == f"This is a mock response from {DEPLOYMENT}."
    last = pieces[-1].usage_metadata
    assert last is not None and last.candidates_token_count
    assert all(
        p.usage_metadata and not p.usage_metadata.candidates_token_count for p in pieces[:-1]
    )

    def get_weather(city: str) -> str:
        """Current weather in a city."""
        return f"-3C in {city}"

    # Automatic function calling: the SDK runs the call and sends its result back, with
    # the signature the mock requires.
    called = await client.aio.models.generate_content(
        model=DEPLOYMENT,
        contents="Weather in Oslo?",
        config=gemini.GenerateContentConfig(tools=[get_weather]),
    )
    history = called.automatic_function_calling_history or []
    assert [h.role for h in history] == ["user", "model", "user"]
    assert called.text == f"This is a mock response from {DEPLOYMENT}."
    embedded = await client.aio.models.embed_content(
        model="gemini-embedding-001", contents=["a", "b"]
    )
    assert embedded.embeddings is not None and len(embedded.embeddings) == 2

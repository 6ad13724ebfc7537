"""The Cohere provider type: its adapter, its registration, and round trips through the
stock OpenAI SDK.

The round-trip tests put the OpenAI SDK on one end and the mock upstream's Cohere API on
the other, with no network: an httpx transport plays the gateway (the adapter's call,
the mock answering it as Cohere would, the gateway's accounting reading Cohere's bytes
with the usage format, and the response translator, fed in pieces as Envoy cuts them),
so what the SDK hands the app is what an app would get, and the counts it sees are the
ones the usage row records.
"""

from __future__ import annotations

import base64
import random
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from decimal import Decimal
from types import MappingProxyType
from typing import Any

import httpx
import openai
import orjson
import pytest

from ext_proc.config import parse_config
from ext_proc.config.model import Provider
from ext_proc.http import AbortConnection, Request
from ext_proc.mock.cohere_api import (
    COHERE_ENCODING,
    END_OF_TURN_TOKENS,
    TEMPLATE_TOKENS,
    TEMPLATE_TOKENS_PER_MESSAGE,
)
from ext_proc.mock.upstream import MockUpstream
from ext_proc.routing.catalog import Catalog
from ext_proc.routing.endpoints import Endpoint, Operation, classify
from ext_proc.routing.providers import PROVIDER_TYPES, RESPONSE_TRANSLATORS, UpstreamCall
from ext_proc.routing.providers.cohere import CohereAdapter
from ext_proc.routing.translate import TranslationError
from ext_proc.routing.translate.openai_cohere import (
    CohereChatToChatCompletion,
    CohereEmbedToEmbeddings,
)
from ext_proc.tokens.encodings import get_encoding
from ext_proc.tokens.parsers import FORMATS, new_stream_parser, parse_json
from ext_proc.tokens.types import ResponseSummary

DEPLOYMENT = "command-r-08-2024"
EMBED_DEPLOYMENT = "embed-v4.0"
CHAT = classify("/v1/chat/completions")
EMBEDDINGS = classify("/v1/embeddings")
MESSAGES = classify("/v1/messages")
assert CHAT is not None and EMBEDDINGS is not None and MESSAGES is not None
QUESTION = [{"role": "user", "content": "Name three colours."}]
WEATHER_TOOL = {
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


def provider(base_url: str = "https://api.cohere.com", **fields: Any) -> Provider:
    return Provider(
        name="cohere", type="cohere", base_url=base_url, api_key_env="CO_API_KEY", **fields
    )


def adapter(**fields: Any) -> CohereAdapter:
    return CohereAdapter(provider(**fields), "co-key")


def tokens(text: str) -> int:
    return len(get_encoding(COHERE_ENCODING).encode_ordinary(text))


# ------------------------------------------------------------------------ adapter


@pytest.mark.parametrize(
    ("base_url", "prefix"),
    [
        ("https://api.cohere.com", ""),
        ("https://api.cohere.com/v1", ""),
        ("https://api.cohere.com/v2/", ""),
        ("http://127.0.0.1:8089", ""),
        ("https://gateway.example.com/cohere", "/cohere"),
        ("https://gateway.example.com/cohere/v2", "/cohere"),
    ],
)
def test_paths(base_url: str, prefix: str) -> None:
    a = CohereAdapter(provider(base_url), "k")
    chat = a.call(CHAT, DEPLOYMENT, {"model": "m", "messages": QUESTION})
    embed = a.call(EMBEDDINGS, EMBED_DEPLOYMENT, {"model": "e", "input": "x"})
    assert (chat.path, embed.path) == (f"{prefix}/v2/chat", f"{prefix}/v2/embed")


def test_headers_static_headers_and_no_key() -> None:
    a = CohereAdapter(provider(headers=MappingProxyType({"x-client-name": "gateway"})), "k")
    call = a.call(CHAT, DEPLOYMENT, {"model": "m", "messages": QUESTION})
    assert call.headers == (("authorization", "Bearer k"), ("x-client-name", "gateway"))
    assert a.has_credential is True
    # A key is declared but not loaded: no credential header, and the processor answers 503.
    missing = CohereAdapter(provider(), None)
    assert missing.has_credential is False
    assert missing.call(CHAT, DEPLOYMENT, {"model": "m", "messages": QUESTION}).headers == ()
    # A local server that needs no key.
    keyless = CohereAdapter(Provider("local", "cohere", "http://127.0.0.1:8089"), None)
    assert keyless.has_credential is True


def test_supports_chat_and_embeddings_only() -> None:
    a = adapter()
    assert a.response_format == "cohere"
    assert [op for op in Operation if a.supports(op)] == [Operation.CHAT, Operation.EMBEDDINGS]
    with pytest.raises(ValueError):
        a.call(MESSAGES, DEPLOYMENT, {"model": "m", "max_tokens": 5, "messages": QUESTION})


def test_chat_call_is_translated() -> None:
    body = {
        "model": "command-r",
        "messages": [{"role": "system", "content": "Be brief."}, *QUESTION],
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": 50,
    }
    original = orjson.dumps(body)
    call = adapter().call(CHAT, DEPLOYMENT, body)
    assert isinstance(call, UpstreamCall) and call.include_usage
    assert orjson.dumps(body) == original  # the processor still estimates from it
    assert call.body is not None
    assert orjson.loads(call.body) == {
        "model": DEPLOYMENT,
        "messages": [{"role": "system", "content": "Be brief."}, *QUESTION],
        "max_tokens": 50,
        "stream": True,
    }
    assert call.translation == "openai_cohere"
    assert isinstance(RESPONSE_TRANSLATORS[call.translation](True), CohereChatToChatCompletion)


def test_embeddings_call_names_its_encoding() -> None:
    a = adapter()
    floats = a.call(EMBEDDINGS, EMBED_DEPLOYMENT, {"model": "e", "input": ["a", "b"]})
    packed = a.call(
        EMBEDDINGS, EMBED_DEPLOYMENT, {"model": "e", "input": "a", "encoding_format": "base64"}
    )
    assert floats.body is not None
    assert orjson.loads(floats.body) == {
        "model": EMBED_DEPLOYMENT,
        "texts": ["a", "b"],
        "input_type": "search_document",
        "embedding_types": ["float"],
    }
    assert (floats.translation, packed.translation) == (
        "openai_cohere_embed",
        "openai_cohere_embed_base64",
    )
    for call in (floats, packed):
        assert isinstance(RESPONSE_TRANSLATORS[call.translation](False), CohereEmbedToEmbeddings)


def test_refusals_are_translation_errors() -> None:
    with pytest.raises(TranslationError) as caught:
        adapter().call(CHAT, DEPLOYMENT, {"model": "m", "messages": QUESTION, "n": 3})
    assert caught.value.param == "n"


def test_the_type_is_one_module_found_by_the_registries() -> None:
    cohere_type = PROVIDER_TYPES["cohere"]
    assert cohere_type.usage_format == "cohere" and "cohere" in FORMATS
    assert cohere_type.price_list == "cohere"
    assert not cohere_type.stream_usage_injectable  # Cohere streams always carry usage
    config = parse_config(
        """
providers:
  cohere: {type: cohere, base_url: "https://api.cohere.com", api_key_env: CO_API_KEY}
models:
  command-r: {provider: cohere, deployment: command-r-08-2024}
  embed: {provider: cohere, deployment: embed-v4.0}
  house-model: {provider: cohere, deployment: acme-command-custom}
applications:
  app: {org: acme}
"""
    )
    catalog = Catalog.build(config, {"cohere": "co-key"})
    route = catalog.resolve("command-r")
    assert route is not None and isinstance(route.adapter, CohereAdapter)
    # Priced from genai-prices' Cohere list; a model it does not know has no price.
    assert route.price is not None
    assert (route.price.input, route.price.output) == (Decimal("0.15"), Decimal("0.6"))
    embed = catalog.resolve("embed")
    assert embed is not None and embed.price is not None and embed.price.input > 0
    house = catalog.resolve("house-model")
    assert house is not None and house.price is None


# ------------------------------------------- round trips through the OpenAI SDK


@dataclass
class Exchange:
    """What one request went through: Cohere's body, status and bytes, and what the
    gateway's accounting read from those bytes."""

    cohere_request: dict[str, Any]
    status: int = 0
    raw: bytes = b""
    summary: ResponseSummary = field(default_factory=ResponseSummary)


async def _body(body: bytes | AsyncIterator[bytes]) -> tuple[bytes, bool]:
    """The whole body, and whether the mock cut it (``x-mock-cut-after``)."""
    if isinstance(body, bytes):
        return body, False
    pieces: list[bytes] = []
    try:
        async for piece in body:
            pieces.append(piece)  # noqa: PERF401 - keeps what came before a cut
    except AbortConnection:
        return b"".join(pieces), True
    return b"".join(pieces), False


def sdk_through_gateway(seen: list[Exchange], **mock_headers: str) -> openai.AsyncOpenAI:
    """An OpenAI client whose transport translates like the gateway, to the mock's Cohere."""
    a = adapter()
    mock = MockUpstream()
    rng = random.Random(3)

    async def handle(request: httpx.Request) -> httpx.Response:
        endpoint = classify(request.url.path)
        assert isinstance(endpoint, Endpoint)
        deployment = EMBED_DEPLOYMENT if endpoint.operation is Operation.EMBEDDINGS else DEPLOYMENT
        call = a.call(endpoint, deployment, orjson.loads(request.content))
        assert call.body is not None and call.translation
        exchange = Exchange(orjson.loads(call.body))
        seen.append(exchange)
        answer = await mock.handle(
            Request("POST", call.path, "", {**dict(call.headers), **mock_headers}, call.body)
        )
        raw, _ = await _body(answer.body)
        exchange.status, exchange.raw = answer.status, raw
        content_type = dict(answer.headers).get("content-type", "")
        translator = RESPONSE_TRANSLATORS[call.translation](call.include_usage)
        if content_type.startswith("text/event-stream"):
            parser = new_stream_parser(a.response_format)
            pieces = []
            pos = 0
            while pos < len(raw):  # Envoy cuts the body anywhere
                step = rng.randint(1, 40)
                parser.feed(raw[pos : pos + step])
                pieces.append(translator.feed(raw[pos : pos + step]))
                pos += step
            pieces.append(translator.finish())
            exchange.summary = parser.finish()
            return httpx.Response(
                answer.status, headers={"content-type": content_type}, content=b"".join(pieces)
            )
        exchange.summary = parse_json(a.response_format, raw)
        return httpx.Response(
            answer.status,
            headers={"content-type": "application/json"},
            content=translator.translate_json(raw, answer.status),
        )

    return openai.AsyncOpenAI(
        api_key="gw-key",
        base_url="http://gateway.test/v1",
        max_retries=0,
        http_client=httpx.AsyncClient(transport=httpx.MockTransport(handle)),
    )


def billed_input(*texts: str) -> int:
    return sum(tokens(text) for text in texts)


async def test_sdk_round_trip_json() -> None:
    seen: list[Exchange] = []
    client = sdk_through_gateway(seen)
    completion = await client.chat.completions.create(
        model="command-r",
        messages=[{"role": "system", "content": "Be brief."}, *QUESTION],
        max_tokens=50,
    )
    (exchange,) = seen
    assert exchange.cohere_request["messages"][0] == {"role": "system", "content": "Be brief."}
    answer = f"This is a mock response from {DEPLOYMENT}."
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.content == answer
    assert completion.choices[0].finish_reason == "stop"
    # The mock's honest counts: billed input is the text sent, output what it wrote; the
    # processed count adds the template Cohere does not bill.
    prompt = billed_input("Be brief.", "Name three colours.")
    raw_usage = orjson.loads(exchange.raw)["usage"]
    assert raw_usage["billed_units"] == {"input_tokens": prompt, "output_tokens": tokens(answer)}
    assert raw_usage["tokens"] == {
        "input_tokens": prompt + TEMPLATE_TOKENS + 2 * TEMPLATE_TOKENS_PER_MESSAGE,
        "output_tokens": tokens(answer) + END_OF_TURN_TOKENS,
    }
    # The app and the usage row see the same (billed) counts.
    usage = exchange.summary.usage
    assert usage is not None and completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (
        prompt,
        tokens(answer),
    )
    assert (usage.prompt_tokens, usage.completion_tokens) == (prompt, tokens(answer))
    assert exchange.summary.complete is True


@pytest.mark.parametrize("include_usage", [True, False])
async def test_sdk_round_trip_stream(include_usage: bool) -> None:
    seen: list[Exchange] = []
    client = sdk_through_gateway(seen, **{"x-mock-completion-tokens": "12", "x-mock-chunks": "4"})
    stream = await client.chat.completions.create(
        model="command-r",
        messages=QUESTION,
        stream=True,
        stream_options={"include_usage": True} if include_usage else openai.omit,
    )
    chunks = [chunk async for chunk in stream]
    (exchange,) = seen
    assert exchange.cohere_request["stream"] is True
    assert "stream_options" not in exchange.cohere_request
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert tokens(text) == 12
    assert exchange.summary.delivered_text and "".join(exchange.summary.delivered_text) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    # Cohere's stream always reports usage: the row is exact either way.
    assert exchange.summary.usage is not None and exchange.summary.complete
    assert exchange.summary.usage.completion_tokens == 12
    assert exchange.summary.usage.prompt_tokens == billed_input("Name three colours.")
    if include_usage:
        assert chunks[-1].choices == [] and chunks[-1].usage is not None
        assert chunks[-1].usage.completion_tokens == 12
        assert chunks[-1].usage.prompt_tokens == exchange.summary.usage.prompt_tokens
    else:
        assert all(c.usage is None for c in chunks)


@pytest.mark.parametrize("stream", [False, True])
async def test_sdk_round_trip_tool_calls_both_ways(stream: bool) -> None:
    seen: list[Exchange] = []
    client = sdk_through_gateway(seen)
    messages: list[Any] = [{"role": "user", "content": "Weather in Oslo?"}]
    if stream:
        chunks = [
            c
            async for c in await client.chat.completions.create(
                model="command-r", messages=messages, tools=[WEATHER_TOOL], stream=True
            )
        ]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        calls: dict[int, dict[str, str]] = {}
        for chunk in chunks:
            for delta in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
                call = calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
                call["id"] += delta.id or ""
                if delta.function is not None:
                    call["name"] += delta.function.name or ""
                    call["arguments"] += delta.function.arguments or ""
        finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
        (call,) = calls.values()
        call_id, name, arguments = call["id"], call["name"], call["arguments"]
    else:
        completion = await client.chat.completions.create(
            model="command-r", messages=messages, tools=[WEATHER_TOOL]
        )
        message = completion.choices[0].message
        text, finish = message.content or "", completion.choices[0].finish_reason
        assert message.tool_calls is not None
        (tool_call,) = message.tool_calls
        call_id, name, arguments = (
            tool_call.id,
            tool_call.function.name,
            tool_call.function.arguments,
        )
    assert finish == "tool_calls"
    assert text == "I will use get_weather to answer this."
    assert name == "get_weather" and orjson.loads(arguments) == {"location": "mock"}
    assert call_id.startswith("get_weather_")
    assert seen[0].cohere_request["tools"] == [WEATHER_TOOL]
    usage = seen[0].summary.usage
    assert usage is not None
    assert usage.completion_tokens == tokens(text) + tokens(name) + tokens(arguments)
    # The app sends the call and its result back: Cohere gets its own shapes.
    messages += [
        {
            "role": "assistant",
            "content": text,
            "tool_calls": [
                {
                    "id": call_id,
                    "type": "function",
                    "function": {"name": name, "arguments": arguments},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call_id, "content": "12C, raining"},
    ]
    final = await client.chat.completions.create(
        model="command-r", messages=messages, tools=[WEATHER_TOOL]
    )
    assert final.choices[0].finish_reason == "stop"
    assert final.choices[0].message.content
    sent = seen[1].cohere_request["messages"]
    assert sent[1] == {
        "role": "assistant",
        "tool_plan": text,
        "tool_calls": [
            {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
        ],
    }
    assert sent[2] == {"role": "tool", "tool_call_id": call_id, "content": "12C, raining"}
    # Billed input: every text sent, the call's name and arguments, and the tools' JSON.
    assert seen[1].summary.usage is not None
    assert seen[1].summary.usage.prompt_tokens == billed_input(
        "Weather in Oslo?",
        text,
        name,
        arguments,
        "12C, raining",
        orjson.dumps([WEATHER_TOOL]).decode(),
    )


async def test_sdk_round_trip_embeddings() -> None:
    seen: list[Exchange] = []
    client = sdk_through_gateway(seen)
    # The SDK asks for base64 by default and decodes it: the gateway packs Cohere's floats.
    result = await client.embeddings.create(model="embed", input=["first text", "second"])
    floats = await client.embeddings.create(
        model="embed",
        input="first text",
        encoding_format="float",
        extra_body={"input_type": "search_query"},
    )
    assert seen[0].cohere_request["input_type"] == "search_document"
    assert seen[1].cohere_request["input_type"] == "search_query"
    vectors = orjson.loads(seen[0].raw)["embeddings"]["float"]
    assert len(result.data) == 2
    for data, vector in zip(result.data, vectors, strict=True):
        assert data.embedding == pytest.approx(vector, abs=1e-6)  # float32 on the wire
    assert floats.data[0].embedding == vectors[0]
    assert result.usage.prompt_tokens == billed_input("first text", "second")
    assert seen[0].summary.usage is not None
    assert seen[0].summary.usage.prompt_tokens == result.usage.prompt_tokens
    assert seen[0].summary.usage.completion_tokens == 0


async def test_sdk_base64_matches_openai_packing() -> None:
    seen: list[Exchange] = []
    client = sdk_through_gateway(seen)
    raw = await client.embeddings.with_raw_response.create(
        model="embed", input="x", encoding_format="base64"
    )
    packed = base64.b64decode(orjson.loads(raw.content)["data"][0]["embedding"])
    vector = orjson.loads(seen[0].raw)["embeddings"]["float"][0]
    assert struct.unpack(f"<{len(vector)}f", packed) == pytest.approx(vector, abs=1e-6)


@pytest.mark.parametrize(
    ("status", "error", "code"),
    [
        (400, openai.BadRequestError, "invalid_request_error"),
        (401, openai.AuthenticationError, "invalid_api_key"),
        (429, openai.RateLimitError, "rate_limit_exceeded"),
        (500, openai.InternalServerError, "api_error"),
        (503, openai.InternalServerError, "service_unavailable"),
    ],
)
async def test_sdk_sees_provider_errors_as_openai_errors(
    status: int, error: type[openai.APIStatusError], code: str
) -> None:
    seen: list[Exchange] = []
    client = sdk_through_gateway(seen, **{"x-mock-status": str(status)})
    with pytest.raises(error) as caught:
        await client.chat.completions.create(model="command-r", messages=QUESTION)
    assert caught.value.status_code == status
    assert caught.value.code == code
    assert f"x-mock-status: {status}" in caught.value.message
    assert set(orjson.loads(seen[0].raw)) == {"id", "message"}  # Cohere's error shape
    assert seen[0].summary.usage is None and not seen[0].summary.complete
    with pytest.raises(error):
        await client.embeddings.create(model="embed", input="x")


async def test_sdk_bad_request_from_cohere() -> None:
    """What Cohere refuses (an output dimension the model does not have) comes back as
    OpenAI's 400 with Cohere's message."""
    seen: list[Exchange] = []
    client = sdk_through_gateway(seen)
    with pytest.raises(openai.BadRequestError) as caught:
        await client.embeddings.create(model="embed", input="x", dimensions=99999)
    assert "output_dimension" in caught.value.message


async def test_cut_stream_counts_what_was_delivered() -> None:
    seen: list[Exchange] = []
    client = sdk_through_gateway(
        seen, **{"x-mock-completion-tokens": "10", "x-mock-cut-after": "3"}
    )
    stream = await client.chat.completions.create(model="command-r", messages=QUESTION, stream=True)
    chunks = [chunk async for chunk in stream]  # no [DONE]: the stream just ends
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert all(c.choices[0].finish_reason is None for c in chunks if c.choices)
    summary = seen[0].summary
    assert summary.usage is None and summary.complete is False
    assert "".join(summary.delivered_text) == text and tokens(text) == 3

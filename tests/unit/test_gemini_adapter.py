"""The Gemini provider type: its adapter, its usage format, and round trips.

The round-trip tests put the stock OpenAI SDK in front of the translation and the mock
upstream's Gemini API behind it, in process, with no network: an httpx transport plays
the gateway (the adapter's call, the mock's answer through the response translator, the
provider's bytes read by the usage format), so what the SDK hands the app is what an app
would get, and the mock checks the translated requests as strictly as Gemini does.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from types import MappingProxyType
from typing import Any

import httpx
import openai
import orjson
import pytest
from google.genai import types as gemini

from ext_proc.config.loader import parse_config
from ext_proc.config.model import Provider
from ext_proc.http import Request
from ext_proc.mock import MockOptions, MockUpstream
from ext_proc.routing.catalog import Catalog
from ext_proc.routing.endpoints import Endpoint, Operation, classify
from ext_proc.routing.providers import PROVIDER_TYPES, RESPONSE_TRANSLATORS
from ext_proc.routing.providers.gemini import GeminiAdapter
from ext_proc.routing.translate import TranslationError
from ext_proc.routing.translate.openai_gemini import (
    EMBEDDINGS_BASE64_TRANSLATION,
    EMBEDDINGS_TRANSLATION,
    SIGNATURE_SEPARATOR,
    TRANSLATION,
    EmbeddingsToOpenAI,
    GenerateContentToChatCompletion,
)
from ext_proc.tokens.encodings import get_encoding
from ext_proc.tokens.parsers import new_stream_parser, parse_json
from ext_proc.tokens.types import ResponseSummary, Usage

KEY = "AIzaSy-test-key"
DEPLOYMENT = "gemini-2.5-flash"
CHAT = classify("/v1/chat/completions")
EMBEDDINGS = classify("/v1/embeddings")
COMPLETIONS = classify("/v1/completions")
MESSAGES = classify("/v1/messages")
assert CHAT is not None and EMBEDDINGS is not None and COMPLETIONS is not None
assert MESSAGES is not None
HELLO = [{"role": "user", "content": "Hello there"}]


def provider(
    base_url: str = "https://generativelanguage.googleapis.com", **fields: Any
) -> Provider:
    return Provider(
        name="gemini",
        type="gemini",
        base_url=base_url,
        api_key_env="GEMINI_API_KEY",
        options=MappingProxyType({}),
        **fields,
    )


def adapter(**fields: Any) -> GeminiAdapter:
    return GeminiAdapter(provider(**fields), KEY)


# ------------------------------------------------------------------------ the type


def test_the_type_is_found_and_registered() -> None:
    t = PROVIDER_TYPES["gemini"]
    assert t.usage_format == "google" and t.price_list == "google"
    assert not t.stream_usage_injectable and t.options == ()
    assert isinstance(RESPONSE_TRANSLATORS[TRANSLATION](True), GenerateContentToChatCompletion)
    assert isinstance(RESPONSE_TRANSLATORS[EMBEDDINGS_TRANSLATION](False), EmbeddingsToOpenAI)
    assert isinstance(
        RESPONSE_TRANSLATORS[EMBEDDINGS_BASE64_TRANSLATION](False), EmbeddingsToOpenAI
    )


def test_config_and_catalog_price_from_the_public_table() -> None:
    config = parse_config(
        """
providers:
  gemini: {type: gemini, base_url: "https://generativelanguage.googleapis.com",
           api_key_env: GEMINI_API_KEY}
models:
  gemini-flash: {provider: gemini, deployment: gemini-2.5-flash}
  gemini-embed: {provider: gemini, deployment: gemini-embedding-001}
  acme-tuned: {provider: gemini, deployment: tunedModels/acme-123}
"""
    )
    catalog = Catalog.build(config, {"gemini": KEY})
    flash = catalog.resolve("gemini-flash")
    assert flash is not None and flash.adapter.response_format == "google"
    # genai-prices' google list: $0.30 input, $0.03 cached, $2.50 output per million.
    assert flash.price_code == "0.3,2.5,0.03"
    embed = catalog.resolve("gemini-embed")
    assert embed is not None and embed.price_code
    tuned = catalog.resolve("acme-tuned")
    assert tuned is not None and not tuned.price_code  # unknown to the table: no cost


def test_an_unknown_option_is_refused_with_its_position() -> None:
    with pytest.raises(Exception, match="api_version"):
        parse_config(
            """
providers:
  gemini: {type: gemini, base_url: "https://generativelanguage.googleapis.com", api_version: v1}
models:
  g: {provider: gemini}
"""
        )


# ---------------------------------------------------------------------- adapter

CHAT_BODY = {"model": "gemini-flash", "messages": HELLO}


@pytest.mark.parametrize(
    ("base_url", "root"),
    [
        ("https://generativelanguage.googleapis.com", "/v1beta"),
        ("https://generativelanguage.googleapis.com/", "/v1beta"),
        ("https://generativelanguage.googleapis.com/v1beta", "/v1beta"),
        ("https://generativelanguage.googleapis.com/v1", "/v1beta"),
        ("http://127.0.0.1:8089", "/v1beta"),
        ("https://proxy.example.com/gemini", "/gemini/v1beta"),
        ("https://proxy.example.com/gemini/v1beta/", "/gemini/v1beta"),
    ],
)
def test_paths(base_url: str, root: str) -> None:
    a = GeminiAdapter(provider(base_url), KEY)
    assert a.call(CHAT, DEPLOYMENT, dict(CHAT_BODY)).path == (
        f"{root}/models/{DEPLOYMENT}:generateContent"
    )
    stream = a.call(CHAT, DEPLOYMENT, {**CHAT_BODY, "stream": True})
    assert stream.path == f"{root}/models/{DEPLOYMENT}:streamGenerateContent?alt=sse"
    embed = a.call(EMBEDDINGS, "gemini-embedding-001", {"model": "e", "input": "x"})
    assert embed.path == f"{root}/models/gemini-embedding-001:batchEmbedContents"


def test_deployment_resource_names() -> None:
    a = adapter()
    assert a.call(CHAT, "models/gemini-2.0-flash", dict(CHAT_BODY)).path == (
        "/v1beta/models/gemini-2.0-flash:generateContent"
    )
    assert a.call(CHAT, "tunedModels/acme-123", dict(CHAT_BODY)).path == (
        "/v1beta/tunedModels/acme-123:generateContent"
    )


def test_headers_static_headers_and_no_key() -> None:
    assert adapter().call(CHAT, DEPLOYMENT, dict(CHAT_BODY)).headers == (("x-goog-api-key", KEY),)
    with_static = GeminiAdapter(
        provider(headers=MappingProxyType({"x-goog-user-project": "p"})), KEY
    )
    assert with_static.call(CHAT, DEPLOYMENT, dict(CHAT_BODY)).headers == (
        ("x-goog-api-key", KEY),
        ("x-goog-user-project", "p"),
    )
    # A key is declared but not loaded: no credential header, and the processor answers 503.
    missing = GeminiAdapter(provider(), None)
    assert missing.has_credential is False
    assert missing.call(CHAT, DEPLOYMENT, dict(CHAT_BODY)).headers == ()
    # A local server that needs no key.
    keyless = GeminiAdapter(Provider("local", "gemini", "http://127.0.0.1:8089"), None)
    assert keyless.has_credential is True
    assert adapter().has_credential is True


def test_supports_and_translates() -> None:
    a = adapter()
    assert a.response_format == "google"
    assert a.supports(Operation.CHAT) and a.supports(Operation.EMBEDDINGS)
    for operation in (Operation.TEXT_COMPLETION, Operation.MESSAGES, Operation.LIST_MODELS):
        assert not a.supports(operation)
    body = {**CHAT_BODY, "stream": True, "stream_options": {"include_usage": True}}
    original = orjson.dumps(body)
    call = a.call(CHAT, DEPLOYMENT, body)
    assert orjson.dumps(body) == original  # the processor still estimates from it
    assert call.translation == TRANSLATION and call.include_usage is True
    assert call.body is not None
    assert orjson.loads(call.body) == {
        "contents": [{"role": "user", "parts": [{"text": "Hello there"}]}]
    }
    # include_usage only means something for a stream.
    assert not a.call(
        CHAT, DEPLOYMENT, {**CHAT_BODY, "stream_options": {"include_usage": True}}
    ).include_usage
    embed = a.call(EMBEDDINGS, "e", {"model": "e", "input": "x"})
    assert embed.translation == EMBEDDINGS_TRANSLATION
    embed64 = a.call(EMBEDDINGS, "e", {"model": "e", "input": "x", "encoding_format": "base64"})
    assert embed64.translation == EMBEDDINGS_BASE64_TRANSLATION


def test_refusals_and_programming_errors() -> None:
    with pytest.raises(TranslationError) as caught:
        adapter().call(CHAT, DEPLOYMENT, {**CHAT_BODY, "logit_bias": {"1": 5}})
    assert caught.value.param == "logit_bias"
    with pytest.raises(ValueError):
        adapter().call(COMPLETIONS, DEPLOYMENT, {"model": "x", "prompt": "hi"})


# ------------------------------------------------------------------ usage format


def sse(*chunks: dict[str, Any]) -> bytes:
    return b"".join(b"data: " + orjson.dumps(c) + b"\r\n\r\n" for c in chunks)


def text_chunk(
    text: str, usage: dict[str, Any], finish: str | None = None, index: int = 0
) -> dict[str, Any]:
    candidate: dict[str, Any] = {"content": {"parts": [{"text": text}], "role": "model"}}
    if finish:
        candidate["finishReason"] = finish
    if index:
        candidate["index"] = index
    return {"candidates": [candidate], "usageMetadata": usage, "modelVersion": "gemini-2.5-flash"}


def stream_summary(body: bytes, seed: int | None = None) -> ResponseSummary:
    parser = new_stream_parser("google")
    if seed is None:
        parser.feed(body)
    else:
        rng = random.Random(seed)
        pos = 0
        while pos < len(body):
            step = rng.randint(1, 30)
            parser.feed(body[pos : pos + step])
            pos += step
    return parser.finish()


RUNNING = {"promptTokenCount": 9, "totalTokenCount": 309, "thoughtsTokenCount": 300}
STREAM = sse(
    text_chunk("The", RUNNING),
    text_chunk(" sky is", RUNNING),
    text_chunk(
        " blue.",
        {
            "promptTokenCount": 9,
            "candidatesTokenCount": 5,
            "thoughtsTokenCount": 300,
            "cachedContentTokenCount": 4,
            "totalTokenCount": 314,
        },
        "STOP",
    ),
)


def test_format_complete_stream_is_exact() -> None:
    summary = stream_summary(STREAM)
    for seed in range(5):
        assert stream_summary(STREAM, seed) == summary
    assert summary.usage == Usage(
        prompt_tokens=9,
        completion_tokens=305,
        total_tokens=314,
        cached_tokens=4,
        reasoning_tokens=300,
    )
    assert summary.complete and summary.finish_reason == "STOP"
    assert summary.response_model == "gemini-2.5-flash"


def test_format_cut_stream_keeps_the_prompt_and_counts_what_was_delivered() -> None:
    """Before its last chunk a Gemini stream's usage is a running placeholder (the prompt,
    a total equal to it, or the thinking so far): never a final completion count."""
    cut = STREAM[: STREAM.index(b" blue.")]
    summary = stream_summary(cut)
    assert summary.complete is False
    assert summary.usage == Usage(prompt_tokens=9)  # completion: counted from the text
    assert summary.delivered_text == ["The", " sky is"]


def test_format_stream_is_complete_when_every_candidate_finished() -> None:
    running = {"promptTokenCount": 4, "totalTokenCount": 4}
    two = {
        "candidates": [
            {"content": {"parts": [{"text": "A"}], "role": "model"}},
            {"content": {"parts": [{"text": "B"}], "role": "model"}, "index": 1},
        ],
        "usageMetadata": running,
    }
    b_done = text_chunk(" b.", running, "STOP", index=1)
    a_done = text_chunk(
        " a.", {"promptTokenCount": 4, "candidatesTokenCount": 6, "totalTokenCount": 10}, "STOP"
    )
    partial = stream_summary(sse(two, b_done))
    assert not partial.complete and partial.usage == Usage(prompt_tokens=4)
    whole = stream_summary(sse(two, b_done, a_done))
    assert whole.complete and whole.usage == Usage(4, 6, 10)
    assert whole.delivered_text == ["A", "B", " b.", " a."]


def test_format_blocked_prompt_and_tool_use_prompt() -> None:
    blocked = {
        "promptFeedback": {"blockReason": "SAFETY"},
        "usageMetadata": {
            "promptTokenCount": 12,
            "toolUsePromptTokenCount": 3,
            "totalTokenCount": 15,
        },
    }
    for summary in (stream_summary(sse(blocked)), parse_json("google", orjson.dumps(blocked))):
        assert summary.complete is True
        assert summary.usage == Usage(prompt_tokens=15, completion_tokens=0, total_tokens=15)


def test_format_intermediate_usage_without_counts() -> None:
    # Vertex-style chunks carry {"trafficType": ...} alone until the end.
    traffic = {"trafficType": "ON_DEMAND"}
    summary = stream_summary(sse(text_chunk("Hi", traffic)))
    assert summary.usage is None and summary.delivered_text == ["Hi"]


def test_format_embeddings_answer_has_no_usage() -> None:
    summary = parse_json("google", orjson.dumps({"embeddings": [{"values": [0.1, 0.2]}]}))
    assert summary.usage is None and summary.complete is True and summary.delivered_text == []
    reported = {"embeddings": [{"values": [0.1]}], "usageMetadata": {"promptTokenCount": 3}}
    assert parse_json("google", orjson.dumps(reported)).usage == Usage(3, 0, 3)


# ------------------------------------------- round trip: OpenAI SDK -> mock Gemini


class Gateway:
    """The gateway's part of an exchange, in process: what went upstream, what came
    back, and what the usage format read from it."""

    def __init__(self, mock: MockUpstream) -> None:
        self.mock = mock
        self.adapter = adapter()
        self.upstream: list[tuple[str, dict[str, Any]]] = []  # (path, Gemini body)
        self.summaries: list[ResponseSummary] = []
        self._rng = random.Random(3)

    async def handle(self, request: httpx.Request) -> httpx.Response:
        endpoint = classify(request.url.path)
        assert isinstance(endpoint, Endpoint)
        body = orjson.loads(request.content)
        deployment = "gemini-embedding-001" if endpoint is EMBEDDINGS else DEPLOYMENT
        try:
            call = self.adapter.call(endpoint, deployment, body)
        except TranslationError as exc:  # the processor's answer
            error = {
                "error": {
                    "message": exc.message,
                    "type": "invalid_request_error",
                    "code": exc.code,
                    "param": exc.param,
                }
            }
            return httpx.Response(400, json=error)
        assert call.body is not None
        path, _, query = call.path.partition("?")
        headers = {k: v for k, v in request.headers.items() if k.startswith("x-mock-")}
        headers.update(call.headers)
        self.upstream.append((call.path, orjson.loads(call.body)))
        answer = await self.mock.handle(Request("POST", path, query, headers, call.body))
        if isinstance(answer.body, bytes):
            raw = answer.body
        else:
            raw = b"".join([piece async for piece in answer.body])
        content_type = dict(answer.headers).get("content-type", "")
        translator = RESPONSE_TRANSLATORS[call.translation](call.include_usage)
        if content_type.startswith("text/event-stream"):
            parser = new_stream_parser(self.adapter.response_format)
            pieces = []
            pos = 0
            while pos < len(raw):  # Envoy cuts the body anywhere
                step = self._rng.randint(1, 40)
                parser.feed(raw[pos : pos + step])
                pieces.append(translator.feed(raw[pos : pos + step]))
                pos += step
            pieces.append(translator.finish())
            self.summaries.append(parser.finish())
            for line in raw.split(b"\r\n\r\n"):
                if line:
                    gemini.GenerateContentResponse.model_validate_json(line[len(b"data: ") :])
            return httpx.Response(
                answer.status,
                headers={"content-type": "text/event-stream"},
                content=b"".join(pieces),
            )
        self.summaries.append(parse_json(self.adapter.response_format, raw))
        if answer.status == 200 and endpoint is CHAT:
            gemini.GenerateContentResponse.model_validate_json(raw)
        elif answer.status == 200:
            gemini.EmbedContentResponse.model_validate_json(raw)
        return httpx.Response(
            answer.status,
            headers={"content-type": "application/json"},
            content=translator.translate_json(raw, answer.status),
        )


@pytest.fixture(scope="module")
def mock() -> MockUpstream:
    upstream = MockUpstream(MockOptions())
    upstream.warm_up()
    return upstream


@pytest.fixture
async def gateway(mock: MockUpstream) -> AsyncIterator[tuple[openai.AsyncOpenAI, Gateway]]:
    gw = Gateway(mock)
    client = openai.AsyncOpenAI(
        api_key="gw-key",
        base_url="http://gateway.test/v1",
        max_retries=0,
        http_client=httpx.AsyncClient(transport=httpx.MockTransport(gw.handle)),
    )
    yield client, gw
    await client.close()


WEATHER_TOOL: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "unit": {"type": "string", "enum": ["c", "f"]},
            },
            "required": ["city"],
        },
    },
}


async def test_round_trip_json(gateway: tuple[openai.AsyncOpenAI, Gateway]) -> None:
    client, gw = gateway
    completion = await client.chat.completions.with_raw_response.create(
        model="gemini-flash",
        messages=[{"role": "system", "content": "Be brief."}, *HELLO],
        max_tokens=50,
        temperature=0.3,
        extra_headers={"x-mock-cached-tokens": "2", "x-mock-reasoning-tokens": "7"},
    )
    parsed = completion.parse()
    [(path, sent)] = gw.upstream
    assert path == f"/v1beta/models/{DEPLOYMENT}:generateContent"
    assert sent["systemInstruction"] == {"parts": [{"text": "Be brief."}]}
    assert sent["generationConfig"] == {"maxOutputTokens": 50, "temperature": 0.3}
    assert parsed.choices[0].message.content == f"This is a mock response from {DEPLOYMENT}."
    assert parsed.choices[0].finish_reason == "stop"
    assert parsed.model == DEPLOYMENT
    usage = parsed.usage
    assert usage is not None and usage.completion_tokens_details is not None
    assert usage.prompt_tokens_details is not None
    # The app's usage is the provider's, and so is what the gateway's row will hold.
    [summary] = gw.summaries
    assert summary.complete and summary.usage is not None
    assert (
        summary.usage.prompt_tokens == usage.prompt_tokens == 3 + 2
    )  # "Be brief." + "Hello there"
    answer_tokens = len(
        get_encoding("o200k_base").encode_ordinary(parsed.choices[0].message.content)
    )
    assert summary.usage.completion_tokens == usage.completion_tokens == answer_tokens + 7
    assert summary.usage.cached_tokens == usage.prompt_tokens_details.cached_tokens == 2
    assert summary.usage.reasoning_tokens == usage.completion_tokens_details.reasoning_tokens == 7
    assert summary.response_model == DEPLOYMENT


async def test_round_trip_stream_with_usage(gateway: tuple[openai.AsyncOpenAI, Gateway]) -> None:
    client, gw = gateway
    stream = await client.chat.completions.create(
        model="gemini-flash",
        messages=HELLO,
        stream=True,
        stream_options={"include_usage": True},
        extra_headers={"x-mock-completion-tokens": "20", "x-mock-chunks": "5"},
    )
    chunks = [c async for c in stream]
    [(path, sent)] = gw.upstream
    assert path.endswith(":streamGenerateContent?alt=sse") and "stream" not in sent
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(text.split()) == 20
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    [summary] = gw.summaries
    assert summary.complete and summary.usage is not None
    assert (
        (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens)
        == (
            summary.usage.prompt_tokens,
            summary.usage.completion_tokens,
        )
        == (2, 20)
    )


async def test_round_trip_tool_calls_with_thought_signatures(
    gateway: tuple[openai.AsyncOpenAI, Gateway],
) -> None:
    client, gw = gateway
    question = [{"role": "user", "content": "Weather in Oslo?"}]
    first = await client.chat.completions.create(
        model="gemini-flash", messages=question, tools=[WEATHER_TOOL]
    )
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls is not None
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather"
    assert orjson.loads(call.function.arguments) == {"city": "mock", "unit": "c"}
    assert SIGNATURE_SEPARATOR in call.id  # Gemini's signature rides in the id
    assert gw.upstream[0][1]["tools"][0]["functionDeclarations"][0]["parametersJsonSchema"]

    follow_up = [
        *question,
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "-3C and snowing"},
    ]
    second = await client.chat.completions.create(
        model="gemini-flash", messages=follow_up, tools=[WEATHER_TOOL]
    )
    assert second.choices[0].finish_reason == "stop"
    assert second.choices[0].message.content
    sent = gw.upstream[1][1]["contents"]
    assert "thoughtSignature" in sent[1]["parts"][0]
    assert sent[2]["parts"][0]["functionResponse"]["name"] == "get_weather"

    # The same turn without the signature (an app that rebuilt the call itself) is what
    # Gemini 3 refuses: the mock does too, and the SDK raises its 400.
    rebuilt = [dict(m) for m in follow_up]
    rebuilt[1]["tool_calls"] = [{**rebuilt[1]["tool_calls"][0], "id": "call_1"}]
    rebuilt[2]["tool_call_id"] = "call_1"
    with pytest.raises(openai.BadRequestError) as refused:
        await client.chat.completions.create(
            model="gemini-flash", messages=rebuilt, tools=[WEATHER_TOOL]
        )
    assert "thought_signature" in refused.value.message
    assert refused.value.code == "invalid_argument"


async def test_round_trip_streamed_tool_call(gateway: tuple[openai.AsyncOpenAI, Gateway]) -> None:
    client, gw = gateway
    async with client.chat.completions.stream(
        model="gemini-flash",
        messages=[{"role": "user", "content": "Weather in Oslo?"}],
        tools=[WEATHER_TOOL],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    ) as stream:
        final = await stream.get_final_completion()
    [call] = final.choices[0].message.tool_calls or []
    assert call.function.name == "get_weather" and final.choices[0].finish_reason == "tool_calls"
    assert gw.upstream[0][1]["toolConfig"] == {
        "functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["get_weather"]}
    }
    [summary] = gw.summaries
    assert summary.complete and summary.delivered_text[0] == "get_weather"


async def test_round_trip_embeddings(gateway: tuple[openai.AsyncOpenAI, Gateway]) -> None:
    client, gw = gateway
    as_base64 = await client.embeddings.create(model="gemini-embed", input=["red", "blue"])
    as_float = await client.embeddings.create(
        model="gemini-embed", input=["red", "blue"], encoding_format="float", dimensions=16
    )
    assert [len(e.embedding) for e in as_base64.data] == [8, 8]  # the mock's default size
    assert [len(e.embedding) for e in as_float.data] == [16, 16]
    small = await client.embeddings.create(
        model="gemini-embed", input="red", encoding_format="float"
    )
    assert small.data[0].embedding == pytest.approx(as_base64.data[0].embedding)
    assert gw.upstream[0][0] == "/v1beta/models/gemini-embedding-001:batchEmbedContents"
    assert gw.upstream[1][1]["requests"][0]["outputDimensionality"] == 16
    # Gemini reports no usage: the row is estimated from the input (see the e2e test).
    assert all(s.usage is None and s.complete for s in gw.summaries)


async def test_round_trip_provider_errors(gateway: tuple[openai.AsyncOpenAI, Gateway]) -> None:
    client, gw = gateway
    with pytest.raises(openai.RateLimitError) as limited:
        await client.chat.completions.create(
            model="gemini-flash", messages=HELLO, extra_headers={"x-mock-status": "429"}
        )
    assert limited.value.code == "rate_limit_exceeded" and limited.value.type == "rate_limit_error"
    with pytest.raises(openai.InternalServerError):
        await client.embeddings.create(
            model="gemini-embed", input="x", extra_headers={"x-mock-status": "503"}
        )
    with pytest.raises(openai.BadRequestError) as refused:
        await client.chat.completions.create(model="gemini-flash", messages=HELLO, n=9)
    assert "candidate_count" in refused.value.message  # the provider's own 400
    assert all(s.usage is None for s in gw.summaries)  # errors bill nothing


async def test_round_trip_refusal_never_reaches_the_provider(
    gateway: tuple[openai.AsyncOpenAI, Gateway],
) -> None:
    client, gw = gateway
    with pytest.raises(openai.BadRequestError) as refused:
        await client.embeddings.create(model="gemini-embed", input=[[1, 2, 3]])
    assert refused.value.param == "input[0]"
    assert gw.upstream == []


async def test_mock_refuses_unknown_fields_like_gemini(mock: MockUpstream) -> None:
    body = orjson.dumps(
        {
            "contents": [{"role": "user", "parts": [{"text": "x"}]}],
            "generation_config": {"max_tokens": 3},
        }
    )
    answer = await mock.handle(
        Request(
            "POST",
            f"/v1beta/models/{DEPLOYMENT}:generateContent",
            "",
            {"x-goog-api-key": KEY},
            body,
        )
    )
    assert answer.status == 400
    assert isinstance(answer.body, bytes)
    error = orjson.loads(answer.body)["error"]
    assert error["status"] == "INVALID_ARGUMENT" and 'Unknown name "max_tokens"' in error["message"]
    unkeyed = await mock.handle(
        Request("POST", f"/v1beta/models/{DEPLOYMENT}:generateContent", "", {}, body)
    )
    assert unkeyed.status == 403

"""The Anthropic provider adapter: native /v1/messages calls and translated chat calls.

The round-trip tests put the stock OpenAI SDK on both ends of the translation, with no
network: an httpx transport plays the gateway (translate the SDK's request, check what
would go upstream, answer with Anthropic's bytes pushed through the response
translator), so what the SDK hands the app is what an app would get.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from types import MappingProxyType
from typing import Any

import httpx
import openai
import orjson
import pytest

from ext_proc.config.model import Provider
from ext_proc.routing.endpoints import Endpoint, Operation, classify
from ext_proc.routing.providers import RESPONSE_TRANSLATORS, UpstreamCall
from ext_proc.routing.providers.anthropic import DEFAULT_ANTHROPIC_VERSION, AnthropicAdapter
from ext_proc.routing.translate import TranslationError
from ext_proc.routing.translate.openai_anthropic import (
    DEFAULT_MAX_TOKENS,
    MessagesToChatCompletion,
)

DEPLOYMENT = "claude-sonnet-4-5-20250929"
MESSAGES = classify("/v1/messages")
CHAT = classify("/v1/chat/completions")
EMBEDDINGS = classify("/v1/embeddings")
assert MESSAGES is not None and CHAT is not None and EMBEDDINGS is not None


def provider(
    base_url: str = "https://api.anthropic.com", anthropic_version: str | None = None, **fields: Any
) -> Provider:
    options = {"anthropic_version": anthropic_version} if anthropic_version else {}
    return Provider(
        name="anthropic",
        type="anthropic",
        base_url=base_url,
        api_key_env="ANTHROPIC_API_KEY",
        options=MappingProxyType(options),
        **fields,
    )


def adapter(**fields: Any) -> AnthropicAdapter:
    return AnthropicAdapter(provider(**fields), "sk-ant-api03-test")


# ------------------------------------------------------------------------ native


def test_native_messages_call() -> None:
    body = {
        "model": "claude-sonnet",
        "max_tokens": 1024,
        "messages": [{"role": "user", "content": "Hello, Claude"}],
        "stream": True,
    }
    call = adapter(anthropic_version="2023-06-01").call(MESSAGES, DEPLOYMENT, body)
    assert call.path == "/v1/messages"
    assert call.headers == (
        ("x-api-key", "sk-ant-api03-test"),
        ("anthropic-version", "2023-06-01"),
    )
    assert call.body is not None
    assert orjson.loads(call.body) == {**body, "model": DEPLOYMENT}


def test_native_body_untouched_when_the_model_is_the_deployment() -> None:
    body = {"model": DEPLOYMENT, "max_tokens": 10, "messages": [{"role": "user", "content": "x"}]}
    call = adapter().call(MESSAGES, DEPLOYMENT, body)
    assert call.body is None  # no re-serialisation: the app's bytes go upstream


@pytest.mark.parametrize(
    ("base_url", "path"),
    [
        ("https://api.anthropic.com", "/v1/messages"),
        ("https://api.anthropic.com/v1", "/v1/messages"),
        ("http://127.0.0.1:8089/", "/v1/messages"),
        ("https://gateway.example.com/anthropic", "/anthropic/v1/messages"),
        ("https://gateway.example.com/anthropic/v1", "/anthropic/v1/messages"),
    ],
)
def test_path_prefix(base_url: str, path: str) -> None:
    call = AnthropicAdapter(provider(base_url), "k").call(
        MESSAGES, DEPLOYMENT, {"model": DEPLOYMENT}
    )
    assert call.path == path


def test_headers_default_version_static_headers_and_no_key() -> None:
    with_static = AnthropicAdapter(
        provider(headers=MappingProxyType({"anthropic-beta": "prompt-caching-2024-07-31"})), "k"
    )
    assert with_static.call(MESSAGES, DEPLOYMENT, {"model": DEPLOYMENT}).headers == (
        ("x-api-key", "k"),
        ("anthropic-version", DEFAULT_ANTHROPIC_VERSION),
        ("anthropic-beta", "prompt-caching-2024-07-31"),
    )
    # A key is declared but not loaded: no credential header, and the processor answers 503.
    missing = AnthropicAdapter(provider(), None)
    assert missing.has_credential is False
    assert missing.call(MESSAGES, DEPLOYMENT, {"model": DEPLOYMENT}).headers == (
        ("anthropic-version", DEFAULT_ANTHROPIC_VERSION),
    )
    # A local server that needs no key.
    keyless = AnthropicAdapter(Provider("local", "anthropic", "http://127.0.0.1:8089"), None)
    assert keyless.has_credential is True
    assert adapter().has_credential is True


def test_supports_and_translates() -> None:
    a = adapter()
    assert a.response_format == "anthropic"
    assert a.supports(Operation.MESSAGES)
    assert a.supports(Operation.CHAT)
    assert not a.supports(Operation.EMBEDDINGS)
    assert not a.supports(Operation.TEXT_COMPLETION)
    assert not a.supports(Operation.LIST_MODELS)
    chat = a.call(CHAT, DEPLOYMENT, {"model": "x", "messages": [{"role": "user", "content": "x"}]})
    assert chat.translation == "openai_anthropic"  # the answer is translated back
    assert a.call(MESSAGES, DEPLOYMENT, {"model": DEPLOYMENT}).translation == ""


def test_an_unsupported_operation_is_a_programming_error() -> None:
    with pytest.raises(ValueError):
        adapter().call(EMBEDDINGS, DEPLOYMENT, {"model": "x", "input": "hi"})


# -------------------------------------------------------------------- translated


def test_translate_chat() -> None:
    body = {
        "model": "claude-sonnet",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
        ],
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": 50,
    }
    original = orjson.dumps(body)
    request = adapter().call(CHAT, DEPLOYMENT, body)
    assert isinstance(request, UpstreamCall) and request.include_usage
    assert orjson.dumps(body) == original  # the processor still estimates from it
    assert request.path == "/v1/messages"
    assert request.headers == (
        ("x-api-key", "sk-ant-api03-test"),
        ("anthropic-version", DEFAULT_ANTHROPIC_VERSION),
    )
    assert request.body is not None
    assert orjson.loads(request.body) == {
        "model": DEPLOYMENT,
        "system": "Be brief.",
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 50,
        "stream": True,
    }
    translator = RESPONSE_TRANSLATORS[request.translation](request.include_usage)
    assert isinstance(translator, MessagesToChatCompletion)


def test_translate_refuses_what_anthropic_cannot_do() -> None:
    body = {"model": "claude-sonnet", "messages": [{"role": "user", "content": "Hi"}], "n": 3}
    with pytest.raises(TranslationError) as caught:
        adapter().call(CHAT, DEPLOYMENT, body)
    assert caught.value.param == "n"


# -------------------------------------------- round trip through the OpenAI SDK

ANTHROPIC_MESSAGE = {
    "id": "msg_01RoundTrip",
    "type": "message",
    "role": "assistant",
    "model": DEPLOYMENT,
    "content": [
        {"type": "text", "text": "Checking."},
        {
            "type": "tool_use",
            "id": "toolu_01RT",
            "name": "get_weather",
            "input": {"location": "Oslo"},
        },
    ],
    "stop_reason": "tool_use",
    "stop_sequence": None,
    "usage": {"input_tokens": 40, "cache_read_input_tokens": 8, "output_tokens": 20},
}


def _event(obj: dict[str, Any]) -> bytes:
    return b"event: " + obj["type"].encode() + b"\ndata: " + orjson.dumps(obj) + b"\n\n"


ANTHROPIC_STREAM = b"".join(
    _event(e)
    for e in (
        {
            "type": "message_start",
            "message": {
                "id": "msg_01RoundTripStream",
                "type": "message",
                "role": "assistant",
                "model": DEPLOYMENT,
                "content": [],
                "stop_reason": None,
                "stop_sequence": None,
                "usage": {"input_tokens": 40, "output_tokens": 1},
            },
        },
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hei"}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "!"}},
        {"type": "content_block_stop", "index": 0},
        {
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn", "stop_sequence": None},
            "usage": {"output_tokens": 3},
        },
        {"type": "message_stop"},
    )
)

Upstream = Callable[[dict[str, Any]], tuple[int, str, bytes]]


def sdk_through_gateway(upstream: Upstream, seen: list[dict[str, Any]]) -> openai.OpenAI:
    """An OpenAI client whose transport translates like the gateway does."""
    a = adapter()
    rng = random.Random(3)

    def handle(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/chat/completions"
        endpoint = classify(request.url.path)
        assert isinstance(endpoint, Endpoint)
        translated = a.call(endpoint, DEPLOYMENT, orjson.loads(request.content))
        assert translated.body is not None
        anthropic_body = orjson.loads(translated.body)
        seen.append(anthropic_body)
        status, content_type, raw = upstream(anthropic_body)
        translator = RESPONSE_TRANSLATORS[translated.translation](translated.include_usage)
        if content_type == "text/event-stream":
            pieces = []
            pos = 0
            while pos < len(raw):  # Envoy cuts the body anywhere
                step = rng.randint(1, 40)
                pieces.append(translator.feed(raw[pos : pos + step]))
                pos += step
            pieces.append(translator.finish())
            body = b"".join(pieces)
        else:
            body = translator.translate_json(raw, status)
            content_type = "application/json"
        return httpx.Response(status, headers={"content-type": content_type}, content=body)

    return openai.OpenAI(
        api_key="gw-key",
        base_url="http://gateway.test/v1",
        max_retries=0,
        http_client=httpx.Client(transport=httpx.MockTransport(handle)),
    )


def test_sdk_round_trip_json_with_tool_call() -> None:
    seen: list[dict[str, Any]] = []
    client = sdk_through_gateway(
        lambda _: (200, "application/json", orjson.dumps(ANTHROPIC_MESSAGE)), seen
    )
    completion = client.chat.completions.create(
        model="claude-sonnet",
        messages=[{"role": "user", "content": "Weather in Oslo?"}],
        tools=[
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "parameters": {
                        "type": "object",
                        "properties": {"location": {"type": "string"}},
                    },
                },
            }
        ],
    )
    assert seen[0]["max_tokens"] == DEFAULT_MAX_TOKENS
    assert seen[0]["tools"][0]["name"] == "get_weather"
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Checking."
    assert choice.message.tool_calls is not None
    call = choice.message.tool_calls[0]
    assert call.id == "toolu_01RT"
    assert call.function.name == "get_weather"
    assert orjson.loads(call.function.arguments) == {"location": "Oslo"}
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == 48
    assert completion.usage.completion_tokens == 20


def test_sdk_round_trip_stream_with_usage() -> None:
    seen: list[dict[str, Any]] = []
    client = sdk_through_gateway(lambda _: (200, "text/event-stream", ANTHROPIC_STREAM), seen)
    chunks = list(
        client.chat.completions.create(
            model="claude-sonnet",
            messages=[{"role": "user", "content": "Say hi in Norwegian"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert seen[0]["stream"] is True
    assert "stream_options" not in seen[0]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hei!"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (40, 3)


def test_sdk_sees_provider_errors_as_openai_errors() -> None:
    error = {
        "type": "error",
        "error": {"type": "rate_limit_error", "message": "Number of requests exceeded"},
    }
    client = sdk_through_gateway(lambda _: (429, "application/json", orjson.dumps(error)), [])
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(
            model="claude-sonnet", messages=[{"role": "user", "content": "Hi"}]
        )
    assert caught.value.code == "rate_limit_exceeded"
    assert caught.value.type == "rate_limit_error"
    assert "Number of requests exceeded" in caught.value.message


def test_sdk_raises_on_a_mid_stream_error() -> None:
    head = ANTHROPIC_STREAM[: ANTHROPIC_STREAM.index(b"event: content_block_stop")]
    failed = head + _event(
        {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    )
    client = sdk_through_gateway(lambda _: (200, "text/event-stream", failed), [])
    stream = client.chat.completions.create(
        model="claude-sonnet", messages=[{"role": "user", "content": "Hi"}], stream=True
    )
    received: list[str] = []
    with pytest.raises(openai.APIError, match="Overloaded"):
        # (extend keeps what arrived before the error)
        received.extend(chunk.choices[0].delta.content or "" for chunk in stream)
    assert "".join(received) == "Hei!"

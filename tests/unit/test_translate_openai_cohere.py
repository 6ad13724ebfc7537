"""OpenAI Chat Completions / Embeddings <-> Cohere v2 Chat / Embed translation, and the
Cohere usage format it shares its counts with.

Requests are written as the OpenAI SDK sends them; translated requests are checked
against the expected Cohere body, against the Cohere SDK's own types (every message,
tool and response format, with no field the SDK does not know), and by the Cohere SDK's
own client, which must send exactly that body when given its fields. Cohere answers are
written in the shapes of Cohere's API reference and validated with its SDK's types;
every translated object is validated with the OpenAI SDK's types, and streams are fed at
every byte split (the output must not depend on where Envoy cut the body).
"""

from __future__ import annotations

import base64
import copy
import random
import struct
from typing import Any

import cohere
import httpx
import orjson
import pydantic
import pytest
from cohere import (
    ChatMessageV2,
    EmbedByTypeResponse,
    ResponseFormatV2,
    ToolV2,
    V2ChatResponse,
    V2ChatStreamResponse,
)
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types import CreateEmbeddingResponse
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from ext_proc.routing.translate import TranslationError
from ext_proc.routing.translate.openai_cohere import (
    DEFAULT_INPUT_TYPE,
    CohereChatToChatCompletion,
    CohereEmbedToEmbeddings,
    to_cohere_chat_request,
    to_cohere_embed_request,
    wants_usage_chunk,
)
from ext_proc.tokens.parsers import new_stream_parser, parse_json
from ext_proc.tokens.types import Usage

DEPLOYMENT = "command-r-08-2024"
EMBED_DEPLOYMENT = "embed-v4.0"
CREATED = 1_760_000_000

_MESSAGE = pydantic.TypeAdapter(ChatMessageV2)
_TOOL = pydantic.TypeAdapter(ToolV2)
_RESPONSE_FORMAT = pydantic.TypeAdapter(ResponseFormatV2)
_STREAM_EVENT = pydantic.TypeAdapter(V2ChatStreamResponse)

# A 1x1 PNG.
PNG_DATA_URL = (
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk"
    "+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)


def assert_known_fields(model: Any, where: str = "") -> None:
    """No field anywhere in ``model`` that the Cohere SDK does not declare (its models
    accept and keep unknown fields, so validation alone would not catch a typo)."""
    if isinstance(model, pydantic.BaseModel):
        extra = model.model_extra or {}
        assert not extra, f"{where or type(model).__name__}: fields unknown to the SDK: {extra}"
        for name in type(model).model_fields:
            assert_known_fields(getattr(model, name), f"{where}.{name}")
    elif isinstance(model, list | tuple):
        for i, item in enumerate(model):
            assert_known_fields(item, f"{where}[{i}]")
    elif isinstance(model, dict):
        for key, item in model.items():
            assert_known_fields(item, f"{where}.{key}")


def sent_by_cohere_sdk(request: dict[str, Any], *, embed: bool = False) -> dict[str, Any]:
    """The body the Cohere SDK's own client sends when given ``request``'s fields: its
    method signatures refuse a parameter name Cohere does not have."""
    sent: list[dict[str, Any]] = []

    def handle(http: httpx.Request) -> httpx.Response:
        sent.append(orjson.loads(http.content))
        if embed:
            return httpx.Response(200, json=EMBED_JSON)
        if orjson.loads(http.content).get("stream"):
            return httpx.Response(
                200, headers={"content-type": "text/event-stream"}, content=TEXT_STREAM
            )
        return httpx.Response(200, json=CHAT_JSON)

    client = cohere.ClientV2(
        api_key="co-test",
        base_url="http://cohere.test",
        httpx_client=httpx.Client(transport=httpx.MockTransport(handle)),
    )
    fields = {key: value for key, value in request.items() if key != "stream"}
    if embed:
        client.embed(**fields)
    elif request.get("stream"):
        list(client.chat_stream(**fields))
    else:
        client.chat(**fields)
    (body,) = sent
    return body


def assert_valid_cohere_chat_request(request: dict[str, Any]) -> None:
    for i, message in enumerate(request["messages"]):
        assert_known_fields(_MESSAGE.validate_python(message), f"messages[{i}]")
    for i, tool in enumerate(request.get("tools", ())):
        assert_known_fields(_TOOL.validate_python(tool), f"tools[{i}]")
    if "response_format" in request:
        assert_known_fields(_RESPONSE_FORMAT.validate_python(request["response_format"]))
    assert sent_by_cohere_sdk(request) == {**request, "stream": request.get("stream", False)}


def translate(body: dict[str, Any]) -> dict[str, Any]:
    original = copy.deepcopy(body)
    out = to_cohere_chat_request(body, DEPLOYMENT)
    assert body == original, "the app's body must not be modified"
    assert_valid_cohere_chat_request(out)
    return out


# ------------------------------------------------------------------- chat requests

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a given location",
        "parameters": {
            "type": "object",
            "properties": {
                "location": {"type": "string", "description": "City and state"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["location"],
        },
    },
}
TIME_TOOL = {"type": "function", "function": {"name": "now"}}
TIME_TOOL_COHERE = {
    "type": "function",
    "function": {"name": "now", "parameters": {"type": "object", "properties": {}}},
}

REQUEST_CASES: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    (
        "minimal: the deployment, string content, nothing else",
        {"model": "command-r", "messages": [{"role": "user", "content": "Hello!"}]},
        {"model": DEPLOYMENT, "messages": [{"role": "user", "content": "Hello!"}]},
    ),
    (
        "system and developer messages stay in place as system messages",
        {
            "model": "command-r",
            "messages": [
                {"role": "system", "content": "You are a pirate."},
                {
                    "role": "developer",
                    "content": [
                        {"type": "text", "text": "Answer in English."},
                        {"type": "text", "text": "Be brief."},
                    ],
                },
                {"role": "user", "content": "Hi", "name": "alice"},
                {"role": "assistant", "content": "Arr."},
                {"role": "system", "content": "Never mention treasure."},
                {"role": "user", "content": "Where is the gold?"},
            ],
        },
        {
            "model": DEPLOYMENT,
            "messages": [
                {"role": "system", "content": "You are a pirate."},
                {
                    "role": "system",
                    "content": [
                        {"type": "text", "text": "Answer in English."},
                        {"type": "text", "text": "Be brief."},
                    ],
                },
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Arr."},
                {"role": "system", "content": "Never mention treasure."},
                {"role": "user", "content": "Where is the gold?"},
            ],
        },
    ),
    (
        "images: OpenAI's image_url part is Cohere's, detail kept",
        {
            "model": "command-a-vision",
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "What is in these images?"},
                        {"type": "image_url", "image_url": {"url": PNG_DATA_URL, "detail": "low"}},
                        {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
                    ],
                }
            ],
            "max_tokens": 300,
        },
        {
            "model": DEPLOYMENT,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "What is in these images?"},
                        {"type": "image_url", "image_url": {"url": PNG_DATA_URL, "detail": "low"}},
                        {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
                    ],
                }
            ],
            "max_tokens": 300,
        },
    ),
    (
        "tool calls and results; assistant text beside calls is the tool plan",
        {
            "model": "command-r",
            "messages": [
                {"role": "user", "content": "Weather in Paris and Tokyo?"},
                {
                    "role": "assistant",
                    "content": "I will look both up.",
                    "tool_calls": [
                        {
                            "id": "get_weather_1byjy32y4hvq",
                            "type": "function",
                            "function": {
                                "name": "get_weather",
                                "arguments": '{"location": "Paris, FR"}',
                            },
                        },
                        {
                            "id": "get_weather_2",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": ""},
                        },
                    ],
                },
                {"role": "tool", "tool_call_id": "get_weather_1byjy32y4hvq", "content": "18C"},
                {
                    "role": "tool",
                    "tool_call_id": "get_weather_2",
                    "content": [{"type": "text", "text": "24C, sunny"}],
                },
                {"role": "user", "content": "Which is warmer?"},
            ],
            "tools": [WEATHER_TOOL],
        },
        {
            "model": DEPLOYMENT,
            "messages": [
                {"role": "user", "content": "Weather in Paris and Tokyo?"},
                {
                    "role": "assistant",
                    "tool_plan": "I will look both up.",
                    "tool_calls": [
                        {
                            "id": "get_weather_1byjy32y4hvq",
                            "type": "function",
                            "function": {
                                "name": "get_weather",
                                "arguments": '{"location": "Paris, FR"}',
                            },
                        },
                        {
                            "id": "get_weather_2",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": "{}"},
                        },
                    ],
                },
                {"role": "tool", "tool_call_id": "get_weather_1byjy32y4hvq", "content": "18C"},
                {
                    "role": "tool",
                    "tool_call_id": "get_weather_2",
                    "content": [{"type": "text", "text": "24C, sunny"}],
                },
                {"role": "user", "content": "Which is warmer?"},
            ],
            "tools": [WEATHER_TOOL],
        },
    ),
    (
        "assistant calls without text have no plan; refusal parts kept as text",
        {
            "model": "command-r",
            "messages": [
                {"role": "user", "content": "Time?"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {"id": "now_1", "type": "function", "function": {"name": "now"}}
                    ],
                },
                {"role": "tool", "tool_call_id": "now_1", "content": "12:00"},
                {"role": "assistant", "content": [{"type": "refusal", "refusal": "I can't."}]},
                {"role": "user", "content": "Why?"},
            ],
            "tools": [TIME_TOOL],
        },
        {
            "model": DEPLOYMENT,
            "messages": [
                {"role": "user", "content": "Time?"},
                {
                    "role": "assistant",
                    "tool_calls": [
                        {
                            "id": "now_1",
                            "type": "function",
                            "function": {"name": "now", "arguments": "{}"},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "now_1", "content": "12:00"},
                {"role": "assistant", "content": "I can't."},
                {"role": "user", "content": "Why?"},
            ],
            "tools": [TIME_TOOL_COHERE],
        },
    ),
    (
        "sampling, stop string, stream; harmless OpenAI-only parameters dropped",
        {
            "model": "command-r",
            "messages": [{"role": "user", "content": "Count to five."}],
            "max_completion_tokens": 64,
            "max_tokens": 9999,
            "temperature": 0.2,
            "top_p": 0.9,
            "top_k": 40,
            "frequency_penalty": 0.5,
            "presence_penalty": 0.1,
            "seed": 42,
            "stop": "5",
            "stream": True,
            "stream_options": {"include_usage": True},
            "user": "user-1234",
            "n": 1,
            "logprobs": False,
            "top_logprobs": 0,
            "logit_bias": {},
            "modalities": ["text"],
            "response_format": {"type": "text"},
            "store": False,
            "metadata": {"team": "search"},
            "service_tier": "auto",
            "prediction": None,
            "prompt_cache_key": "k",
            "safety_identifier": "s",
            "parallel_tool_calls": True,
        },
        {
            "model": DEPLOYMENT,
            "messages": [{"role": "user", "content": "Count to five."}],
            "max_tokens": 64,
            "temperature": 0.2,
            "p": 0.9,
            "frequency_penalty": 0.5,
            "presence_penalty": 0.1,
            "k": 40,
            "seed": 42,
            "stop_sequences": ["5"],
            "stream": True,
        },
    ),
    (
        "stop list; stream false is not sent",
        {
            "model": "command-r",
            "messages": [{"role": "user", "content": "Go"}],
            "max_tokens": 10,
            "stop": ["\n\n", "", "END"],
            "stream": False,
        },
        {
            "model": DEPLOYMENT,
            "messages": [{"role": "user", "content": "Go"}],
            "max_tokens": 10,
            "stop_sequences": ["\n\n", "END"],
        },
    ),
    (
        "tool_choice required -> REQUIRED; a strict tool makes strict_tools",
        {
            "model": "command-r",
            "messages": [{"role": "user", "content": "Weather in Oslo?"}],
            "tools": [
                {**WEATHER_TOOL, "function": {**WEATHER_TOOL["function"], "strict": True}},
                TIME_TOOL,
            ],
            "tool_choice": "required",
        },
        {
            "model": DEPLOYMENT,
            "messages": [{"role": "user", "content": "Weather in Oslo?"}],
            "tools": [WEATHER_TOOL, TIME_TOOL_COHERE],
            "strict_tools": True,
            "tool_choice": "REQUIRED",
        },
    ),
    (
        "a named tool_choice narrows the tools to that one, REQUIRED",
        {
            "model": "command-r",
            "messages": [{"role": "user", "content": "Time?"}],
            "tools": [WEATHER_TOOL, TIME_TOOL],
            "tool_choice": {"type": "function", "function": {"name": "now"}},
        },
        {
            "model": DEPLOYMENT,
            "messages": [{"role": "user", "content": "Time?"}],
            "tools": [TIME_TOOL_COHERE],
            "tool_choice": "REQUIRED",
        },
    ),
    (
        "tool_choice none -> NONE; auto is Cohere's default",
        {
            "model": "command-r",
            "messages": [{"role": "user", "content": "Hi"}],
            "tools": [WEATHER_TOOL],
            "tool_choice": "none",
        },
        {
            "model": DEPLOYMENT,
            "messages": [{"role": "user", "content": "Hi"}],
            "tools": [WEATHER_TOOL],
            "tool_choice": "NONE",
        },
    ),
    (
        "tool_choice auto and none without tools are not sent",
        {
            "model": "command-r",
            "messages": [{"role": "user", "content": "Hi"}],
            "tools": [],
            "tool_choice": "none",
        },
        {"model": DEPLOYMENT, "messages": [{"role": "user", "content": "Hi"}]},
    ),
    (
        "response_format json_object",
        {
            "model": "command-r",
            "messages": [{"role": "user", "content": "A JSON object, please."}],
            "response_format": {"type": "json_object"},
        },
        {
            "model": DEPLOYMENT,
            "messages": [{"role": "user", "content": "A JSON object, please."}],
            "response_format": {"type": "json_object"},
        },
    ),
    (
        "response_format json_schema -> json_object with the schema",
        {
            "model": "command-r",
            "messages": [{"role": "user", "content": "Name and age of a person."}],
            "response_format": {
                "type": "json_schema",
                "json_schema": {
                    "name": "person",
                    "strict": True,
                    "schema": {
                        "type": "object",
                        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
                        "required": ["name", "age"],
                    },
                },
            },
        },
        {
            "model": DEPLOYMENT,
            "messages": [{"role": "user", "content": "Name and age of a person."}],
            "response_format": {
                "type": "json_object",
                "json_schema": {
                    "type": "object",
                    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
                    "required": ["name", "age"],
                },
            },
        },
    ),
]


@pytest.mark.parametrize(
    ("body", "expected"),
    [pytest.param(body, expected, id=name) for name, body, expected in REQUEST_CASES],
)
def test_chat_request(body: dict[str, Any], expected: dict[str, Any]) -> None:
    assert translate(body) == expected


def test_usage_chunk_wanted() -> None:
    assert wants_usage_chunk({"stream_options": {"include_usage": True}})
    assert not wants_usage_chunk({"stream_options": {"include_usage": False}})
    assert not wants_usage_chunk({"stream": True})


REFUSED: list[tuple[str, Any, str]] = [
    ("n", 2, "unsupported_value"),
    ("n", "2", "invalid_type"),
    ("logprobs", True, "unsupported_parameter"),
    ("top_logprobs", 3, "unsupported_parameter"),
    ("logit_bias", {"50256": -100}, "unsupported_parameter"),
    ("functions", [{"name": "f"}], "unsupported_parameter"),
    ("function_call", "auto", "unsupported_parameter"),
    ("audio", {"voice": "alloy", "format": "wav"}, "unsupported_parameter"),
    ("modalities", ["text", "audio"], "unsupported_value"),
    ("reasoning_effort", "low", "unsupported_parameter"),
    ("verbosity", "low", "unsupported_parameter"),
    ("web_search_options", {}, "unsupported_parameter"),
    ("documents", ["a document"], "unsupported_parameter"),  # Cohere's own, not translated
    ("frobnicate", 1, "unsupported_parameter"),
    ("response_format", {"type": "xml"}, "unsupported_value"),
    ("max_tokens", 0, "invalid_value"),
    ("max_completion_tokens", 1.5, "invalid_value"),
    ("temperature", "hot", "invalid_type"),
    ("top_k", 2.5, "invalid_type"),
    ("seed", "42", "invalid_type"),
    ("stop", 5, "invalid_type"),
    ("stream", "yes", "invalid_type"),
    ("tools", {"a": 1}, "invalid_type"),
    ("tool_choice", "any", "unsupported_value"),
]


@pytest.mark.parametrize(("param", "value", "code"), REFUSED)
def test_chat_request_refusals_name_the_parameter(param: str, value: Any, code: str) -> None:
    body = {"model": "command-r", "messages": [{"role": "user", "content": "Hi"}], param: value}
    with pytest.raises(TranslationError) as caught:
        to_cohere_chat_request(body, DEPLOYMENT)
    assert (caught.value.param, caught.value.code) == (param, code)


def test_parallel_tool_calls_false_is_refused_with_tools_only() -> None:
    body: dict[str, Any] = {
        "model": "command-r",
        "messages": [{"role": "user", "content": "Hi"}],
        "parallel_tool_calls": False,
    }
    assert "tools" not in translate(body)  # nothing to limit without tools
    with pytest.raises(TranslationError) as caught:
        to_cohere_chat_request({**body, "tools": [WEATHER_TOOL]}, DEPLOYMENT)
    assert caught.value.param == "parallel_tool_calls"


@pytest.mark.parametrize(
    ("messages", "param", "code"),
    [
        ([], "messages", "invalid_type"),
        (["hi"], "messages[0]", "invalid_type"),
        ([{"role": "robot", "content": "x"}], "messages[0].role", "invalid_type"),
        (
            [{"role": "function", "name": "f", "content": "x"}],
            "messages[0].role",
            "unsupported_value",
        ),
        (
            [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}],
            "messages[0].content[0].type",
            "unsupported_value",
        ),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "ftp://x"}}]}],
            "messages[0].content[0].image_url.url",
            "unsupported_value",
        ),
        (
            [{"role": "system", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
            "messages[0].content[0].type",
            "unsupported_value",
        ),
        (
            [{"role": "tool", "content": "x"}],
            "messages[0].tool_call_id",
            "missing_required_parameter",
        ),
        (
            [{"role": "assistant", "content": "x", "tool_calls": [{"id": "c", "function": {}}]}],
            "messages[0].tool_calls[0].function.name",
            "invalid_type",
        ),
        (
            [
                {
                    "role": "assistant",
                    "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": {"a": 1}}}],
                }
            ],
            "messages[0].tool_calls[0].function.arguments",
            "invalid_type",
        ),
        (
            [{"role": "assistant", "content": "x", "function_call": {"name": "f"}}],
            "messages[0].function_call",
            "unsupported_parameter",
        ),
    ],
)
def test_bad_messages_name_the_field(messages: list[Any], param: str, code: str) -> None:
    with pytest.raises(TranslationError) as caught:
        to_cohere_chat_request({"model": "command-r", "messages": messages}, DEPLOYMENT)
    assert (caught.value.param, caught.value.code) == (param, code)


def test_named_tool_choice_must_name_a_tool() -> None:
    body = {
        "model": "command-r",
        "messages": [{"role": "user", "content": "Hi"}],
        "tools": [WEATHER_TOOL],
        "tool_choice": {"type": "function", "function": {"name": "nope"}},
    }
    with pytest.raises(TranslationError) as caught:
        to_cohere_chat_request(body, DEPLOYMENT)
    assert caught.value.param == "tool_choice"


def test_tool_must_be_a_function() -> None:
    body = {
        "model": "command-r",
        "messages": [{"role": "user", "content": "Hi"}],
        "tools": [{"type": "web_search"}],
    }
    with pytest.raises(TranslationError) as caught:
        to_cohere_chat_request(body, DEPLOYMENT)
    assert (caught.value.param, caught.value.code) == ("tools[0].type", "unsupported_value")


# ----------------------------------------------------------------- embed requests


def translate_embed(body: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    original = copy.deepcopy(body)
    out, as_base64 = to_cohere_embed_request(body, EMBED_DEPLOYMENT)
    assert body == original
    assert sent_by_cohere_sdk(out, embed=True) == out
    return out, as_base64


def test_embed_request_string_input_defaults() -> None:
    out, as_base64 = translate_embed({"model": "embed", "input": "hello"})
    assert out == {
        "model": EMBED_DEPLOYMENT,
        "texts": ["hello"],
        "input_type": DEFAULT_INPUT_TYPE,
        "embedding_types": ["float"],
    }
    assert as_base64 is False


def test_embed_request_as_the_openai_sdk_sends_it() -> None:
    # The SDK asks for base64 unless the app chose; extra_body carries Cohere's own fields.
    out, as_base64 = translate_embed(
        {
            "model": "embed",
            "input": ["first", "second"],
            "encoding_format": "base64",
            "dimensions": 256,
            "user": "u-1",
            "input_type": "search_query",
            "truncate": "END",
        }
    )
    assert out == {
        "model": EMBED_DEPLOYMENT,
        "texts": ["first", "second"],
        "input_type": "search_query",
        "embedding_types": ["float"],
        "truncate": "END",
        "output_dimension": 256,
    }
    assert as_base64 is True


@pytest.mark.parametrize(
    ("field", "value", "param", "code"),
    [
        ("input", [[1, 2, 3]], "input", "unsupported_value"),
        ("input", [1, 2, 3], "input", "unsupported_value"),
        ("input", [], "input", "invalid_type"),
        ("input", None, "input", "invalid_type"),
        ("encoding_format", "int8", "encoding_format", "unsupported_value"),
        ("dimensions", 0, "dimensions", "invalid_value"),
        ("input_type", 3, "input_type", "invalid_type"),
        ("truncate", "MIDDLE", "truncate", "unsupported_value"),
        ("images", ["data:image/png;base64,AA=="], "images", "unsupported_parameter"),
    ],
)
def test_embed_request_refusals(field: str, value: Any, param: str, code: str) -> None:
    body: dict[str, Any] = {"model": "embed", "input": "x", field: value}
    with pytest.raises(TranslationError) as caught:
        to_cohere_embed_request(body, EMBED_DEPLOYMENT)
    assert (caught.value.param, caught.value.code) == (param, code)


# ------------------------------------------------------------------- chat answers

# Cohere's API reference example (v2 chat, non-streamed).
CHAT_JSON: dict[str, Any] = {
    "id": "c14c80c3-18eb-4519-9460-6c92edd8cfb4",
    "finish_reason": "COMPLETE",
    "message": {
        "role": "assistant",
        "content": [{"type": "text", "text": "LLMs stand for Large Language Models."}],
    },
    "usage": {
        "billed_units": {"input_tokens": 5, "output_tokens": 418},
        "tokens": {"input_tokens": 71, "output_tokens": 418},
    },
}

# Cohere's tool-use guide: a plan and a call (and its processed count far above the billed).
TOOL_JSON: dict[str, Any] = {
    "id": "6d9ccd54-1f4e-4d3e-a1b6-4c8b7a0c2f55",
    "finish_reason": "TOOL_CALL",
    "message": {
        "role": "assistant",
        "tool_plan": "I will search for the weather in Toronto.",
        "tool_calls": [
            {
                "id": "get_weather_1byjy32y4hvq",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"location":"Toronto"}'},
            },
            {
                "id": "now_2",
                "type": "function",
                "function": {"name": "now", "arguments": "{}"},
            },
        ],
    },
    "usage": {
        "billed_units": {"input_tokens": 37, "output_tokens": 28},
        "tokens": {"input_tokens": 1301, "output_tokens": 69},
        "cached_tokens": 16,
    },
}

THINKING_JSON: dict[str, Any] = {
    "id": "b1",
    "finish_reason": "COMPLETE",
    "message": {
        "role": "assistant",
        "content": [
            {"type": "thinking", "thinking": "The user greets me."},
            {"type": "text", "text": "Hello!"},
        ],
    },
    "usage": {"billed_units": {"input_tokens": 3, "output_tokens": 9}},
}


def json_translation(answer: dict[str, Any]) -> ChatCompletion:
    V2ChatResponse.model_validate(answer)  # the fixture is Cohere's shape
    raw = orjson.dumps(answer)
    out = CohereChatToChatCompletion(created=CREATED).translate_json(raw, 200)
    completion = ChatCompletion.model_validate(orjson.loads(out))
    # The app sees the usage the row records: both read Cohere's billed units.
    usage = parse_json("cohere", raw).usage
    assert usage is not None and completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (
        usage.prompt_tokens,
        usage.completion_tokens,
    )
    return completion


def test_json_text_answer() -> None:
    completion = json_translation(CHAT_JSON)
    assert completion.id == CHAT_JSON["id"]
    assert completion.object == "chat.completion" and completion.created == CREATED
    assert completion.model == ""  # Cohere's answers do not name the model
    (choice,) = completion.choices
    assert choice.message.role == "assistant"
    assert choice.message.content == "LLMs stand for Large Language Models."
    assert choice.message.tool_calls is None
    assert choice.finish_reason == "stop"
    assert completion.usage is not None
    # Billed, not the processed count with Cohere's own template (71).
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (5, 418)
    assert completion.usage.total_tokens == 423


def test_json_tool_calls() -> None:
    completion = json_translation(TOOL_JSON)
    (choice,) = completion.choices
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "I will search for the weather in Toronto."
    calls = choice.message.tool_calls
    assert calls is not None
    assert [(c.id, c.type, c.function.name, c.function.arguments) for c in calls] == [
        ("get_weather_1byjy32y4hvq", "function", "get_weather", '{"location":"Toronto"}'),
        ("now_2", "function", "now", "{}"),
    ]
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (37, 28)
    assert completion.usage.prompt_tokens_details is not None
    assert completion.usage.prompt_tokens_details.cached_tokens == 16


def test_json_thinking_is_reasoning_content() -> None:
    completion = json_translation(THINKING_JSON)
    message = completion.choices[0].message
    assert message.content == "Hello!"
    assert (message.model_extra or {})["reasoning_content"] == "The user greets me."


@pytest.mark.parametrize(
    ("cohere_reason", "openai_reason"),
    [
        ("COMPLETE", "stop"),
        ("STOP_SEQUENCE", "stop"),
        ("MAX_TOKENS", "length"),
        ("TIMEOUT", "length"),
        ("TOOL_CALL", "tool_calls"),
        ("SOMETHING_NEW", "stop"),
    ],
)
def test_finish_reasons(cohere_reason: str, openai_reason: str) -> None:
    answer = {**CHAT_JSON, "finish_reason": cohere_reason}
    out = CohereChatToChatCompletion(created=CREATED).translate_json(orjson.dumps(answer), 200)
    completion = ChatCompletion.model_validate(orjson.loads(out))
    assert completion.choices[0].finish_reason == openai_reason


def test_json_generation_error_is_an_error() -> None:
    answer = {**CHAT_JSON, "finish_reason": "ERROR"}
    out = orjson.loads(CohereChatToChatCompletion().translate_json(orjson.dumps(answer), 200))
    assert out["error"]["code"] == "generation_error"
    assert parse_json("cohere", orjson.dumps(answer)).complete is False


def test_json_without_usage_has_no_usage() -> None:
    answer = {key: value for key, value in CHAT_JSON.items() if key != "usage"}
    out = orjson.loads(CohereChatToChatCompletion().translate_json(orjson.dumps(answer), 200))
    assert "usage" not in out
    assert ChatCompletion.model_validate(out).usage is None


# ------------------------------------------------------------------------- errors

ERRORS = [
    (400, "invalid request: message must be at least 1 token long", "invalid_request_error",
     "invalid_request_error"),
    (401, "invalid api token", "authentication_error", "invalid_api_key"),
    (402, "Please add a payment method", "insufficient_quota", "insufficient_quota"),
    (403, "Forbidden", "permission_error", "permission_denied"),
    (404, "model 'command-x' not found", "not_found_error", "not_found"),
    (422, "unprocessable", "invalid_request_error", "unprocessable_entity"),
    (429, "You are using a Trial key, which is limited to 10 API calls / minute.",
     "rate_limit_error", "rate_limit_exceeded"),
    (498, "invalid api token", "authentication_error", "invalid_api_key"),
    (499, "client closed request", "invalid_request_error", "client_closed_request"),
    (500, "internal server error", "server_error", "api_error"),
    (503, "service unavailable", "server_error", "service_unavailable"),
    (504, "gateway timeout", "timeout_error", "timeout"),
    (418, "teapot", "invalid_request_error", None),
    (507, "insufficient storage", "server_error", None),
]  # fmt: skip


@pytest.mark.parametrize(("status", "message", "openai_type", "code"), ERRORS)
@pytest.mark.parametrize("translator", ["chat", "embed"])
def test_errors(
    status: int, message: str, openai_type: str, code: str | None, translator: str
) -> None:
    body = orjson.dumps({"id": "0b5d5b2f-7cd0-4b36-8a5a-6b0b3a6a0c11", "message": message})
    t = CohereChatToChatCompletion() if translator == "chat" else CohereEmbedToEmbeddings()
    out = orjson.loads(t.translate_json(body, status))
    assert out == {"error": {"message": message, "type": openai_type, "code": code, "param": None}}
    summary = parse_json("cohere", body)
    assert summary.complete is False and summary.usage is None


def test_non_json_and_openai_shaped_errors() -> None:
    text = b"upstream connect error or disconnect/reset before headers. reset reason: overflow"
    out = orjson.loads(CohereChatToChatCompletion().translate_json(text, 503))
    assert out == {
        "error": {
            "message": text.decode(),
            "type": "server_error",
            "code": "service_unavailable",
            "param": None,
        }
    }
    empty = orjson.loads(CohereChatToChatCompletion().translate_json(b"", 502))
    assert empty["error"]["message"] == "The provider answered HTTP 502."
    # Envoy's own replies are already OpenAI-shaped: kept as they are.
    envoy = {
        "error": {
            "message": "upstream request timeout",
            "type": "server_error",
            "code": "upstream_response_timeout",
            "param": None,
        }
    }
    out = orjson.loads(CohereChatToChatCompletion().translate_json(orjson.dumps(envoy), 504))
    assert out == envoy


def test_success_status_with_unexpected_body() -> None:
    out = orjson.loads(CohereChatToChatCompletion().translate_json(b'{"hello": 1}', 200))
    assert out["error"]["code"] == "untranslatable_response"
    out = orjson.loads(CohereChatToChatCompletion().translate_json(b'{"message": "busy"}', 200))
    assert out["error"]["message"] == "busy"
    out = orjson.loads(CohereEmbedToEmbeddings().translate_json(b"[1, 2]", 200))
    assert out["error"]["code"] == "untranslatable_response"


# ------------------------------------------------------------------------- streams


def sse(*events: dict[str, Any], done: bool = False) -> bytes:
    """A Cohere SSE body: each event named by its type."""
    body = b"".join(
        b"event: " + e["type"].encode() + b"\ndata: " + orjson.dumps(e) + b"\n\n" for e in events
    )
    return body + (b"data: [DONE]\n\n" if done else b"")


def _start(ident: str) -> dict[str, Any]:
    return {
        "id": ident,
        "type": "message-start",
        "delta": {
            "message": {
                "role": "assistant",
                "content": [],
                "tool_plan": "",
                "tool_calls": [],
                "citations": [],
            }
        },
    }


def _text(text: str) -> dict[str, Any]:
    return {"type": "content-delta", "index": 0, "delta": {"message": {"content": {"text": text}}}}


def _plan(text: str) -> dict[str, Any]:
    return {"type": "tool-plan-delta", "delta": {"message": {"tool_plan": text}}}


def _args(index: int, fragment: str) -> dict[str, Any]:
    return {
        "type": "tool-call-delta",
        "index": index,
        "delta": {"message": {"tool_calls": {"function": {"arguments": fragment}}}},
    }


def _call_start(index: int, call_id: str, name: str) -> dict[str, Any]:
    return {
        "type": "tool-call-start",
        "index": index,
        "delta": {
            "message": {
                "tool_calls": {
                    "id": call_id,
                    "type": "function",
                    "function": {"name": name, "arguments": ""},
                }
            }
        },
    }


def _end(reason: str, usage: dict[str, Any] | None = None) -> dict[str, Any]:
    delta: dict[str, Any] = {"finish_reason": reason}
    if usage is not None:
        delta["usage"] = usage
    return {"type": "message-end", "delta": delta}


# A recorded text stream (multi-byte characters, cut mid-character below).
TEXT_STREAM = sse(
    _start("a8fc192e-4bb8-4e15-ae1f-a174e8b02ae8"),
    {
        "type": "content-start",
        "index": 0,
        "delta": {"message": {"content": {"type": "text", "text": ""}}},
    },
    _text("Bonjour"),
    _text(" ! Ça va ? "),
    _text("☕ 🚀"),
    {"type": "content-end", "index": 0},
    _end(
        "COMPLETE",
        {
            "billed_units": {"input_tokens": 21, "output_tokens": 105},
            "tokens": {"input_tokens": 186, "output_tokens": 105},
        },
    ),
)

TOOL_STREAM = sse(
    _start("29f14a5a-11de-4cae-9800-25e4747408ea"),
    _plan("I will check"),
    _plan(" the weather."),
    _call_start(0, "get_weather_nsz5zm3w56q3", "get_weather"),
    _args(0, '{\n    "'),
    _args(0, 'location": "Tor'),
    _args(0, 'onto"\n}'),
    {"type": "tool-call-end", "index": 0},
    _call_start(1, "now_2", "now"),
    _args(1, "{}"),
    {"type": "tool-call-end", "index": 1},
    _end(
        "TOOL_CALL",
        {
            "billed_units": {"input_tokens": 37, "output_tokens": 28},
            "tokens": {"input_tokens": 1301, "output_tokens": 69},
        },
    ),
    done=True,  # a closing [DONE] (the Cohere SDK stops at one): carries nothing
)

THINKING_STREAM = sse(
    _start("t1"),
    {
        "type": "content-start",
        "index": 0,
        "delta": {"message": {"content": {"type": "thinking", "thinking": ""}}},
    },
    {
        "type": "content-delta",
        "index": 0,
        "delta": {"message": {"content": {"thinking": "Greeting."}}},
    },
    {"type": "content-end", "index": 0},
    {
        "type": "content-start",
        "index": 1,
        "delta": {"message": {"content": {"type": "text", "text": ""}}},
    },
    {"type": "content-delta", "index": 1, "delta": {"message": {"content": {"text": "Hi!"}}}},
    {"type": "content-end", "index": 1},
    _end("COMPLETE", {"billed_units": {"input_tokens": 2, "output_tokens": 7}}),
)


def events_of(body: bytes) -> list[dict[str, Any]]:
    return [
        orjson.loads(block.split(b"data: ", 1)[1])
        for block in body.split(b"\n\n")
        if b"data: {" in block
    ]


@pytest.mark.parametrize("body", [TEXT_STREAM, TOOL_STREAM, THINKING_STREAM])
def test_stream_fixtures_are_cohere_events(body: bytes) -> None:
    # Validated, not checked for unknown fields: Cohere sends more than its SDK declares
    # (message-start's empty content, tool_plan, tool_calls and citations).
    for event in events_of(body):
        _STREAM_EVENT.validate_python(event)


def translate_stream(body: bytes, cuts: list[int], *, include_usage: bool = True) -> bytes:
    translator = CohereChatToChatCompletion(include_usage=include_usage, created=CREATED)
    out = []
    last = 0
    for cut in [*cuts, len(body)]:
        out.append(translator.feed(body[last:cut]))
        last = cut
    out.append(translator.finish())
    return b"".join(out)


def data_lines(output: bytes) -> list[bytes]:
    """The ``data:`` payloads of an OpenAI-style SSE body (every event is one data line)."""
    assert output.endswith(b"\n\n")
    events = output[:-2].split(b"\n\n")
    assert all(e.startswith(b"data: ") and b"\n" not in e for e in events), events
    return [e[len(b"data: ") :] for e in events]


def chunks_of(output: bytes) -> list[ChatCompletionChunk]:
    lines = data_lines(output)
    assert lines[-1] == b"[DONE]"
    return [ChatCompletionChunk.model_validate(orjson.loads(line)) for line in lines[:-1]]


def assert_split_invariant(body: bytes, include_usage: bool = True) -> bytes:
    """Every two-piece split, a byte at a time, and random splits give the same bytes."""
    whole = translate_stream(body, [], include_usage=include_usage)
    for cut in range(len(body) + 1):
        assert translate_stream(body, [cut], include_usage=include_usage) == whole, cut
    assert translate_stream(body, list(range(1, len(body))), include_usage=include_usage) == whole
    rng = random.Random(7)
    for _ in range(20):
        cuts = sorted(rng.sample(range(1, len(body)), 12))
        assert translate_stream(body, cuts, include_usage=include_usage) == whole, cuts
    return whole


def parse_stream(body: bytes, cuts: list[int]) -> Any:
    parser = new_stream_parser("cohere")
    last = 0
    for cut in [*cuts, len(body)]:
        parser.feed(body[last:cut])
        last = cut
    return parser.finish()


def test_text_stream() -> None:
    chunks = chunks_of(assert_split_invariant(TEXT_STREAM))
    assert all(c.id == "a8fc192e-4bb8-4e15-ae1f-a174e8b02ae8" and c.model == "" for c in chunks)
    assert all(c.created == CREATED and c.object == "chat.completion.chunk" for c in chunks)
    first, *middle, finish, usage_chunk = chunks
    assert first.choices[0].delta.role == "assistant"
    assert first.choices[0].delta.content == ""
    assert [c.choices[0].delta.content for c in middle] == ["Bonjour", " ! Ça va ? ", "☕ 🚀"]
    assert all(c.choices[0].finish_reason is None and c.usage is None for c in [first, *middle])
    assert finish.choices[0].finish_reason == "stop"
    assert finish.choices[0].delta.content is None
    assert usage_chunk.choices == []
    assert usage_chunk.usage is not None
    assert (usage_chunk.usage.prompt_tokens, usage_chunk.usage.completion_tokens) == (21, 105)
    assert usage_chunk.usage.total_tokens == 126


def test_stream_without_include_usage_has_no_usage_chunk() -> None:
    output = assert_split_invariant(TEXT_STREAM, include_usage=False)
    chunks = chunks_of(output)
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.choices for c in chunks)
    assert b'"usage"' not in output  # OpenAI sends no usage field unless asked


def test_tool_stream_accumulates_like_openai() -> None:
    chunks = chunks_of(assert_split_invariant(TOOL_STREAM))
    # The OpenAI SDK's own accumulator rebuilds the whole message from the chunks.
    state = ChatCompletionStreamState()
    for chunk in chunks:
        state.handle_chunk(chunk)
    completion = state.get_final_completion()
    (choice,) = completion.choices
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "I will check the weather."
    calls = choice.message.tool_calls
    assert calls is not None
    assert [(c.id, c.function.name) for c in calls] == [
        ("get_weather_nsz5zm3w56q3", "get_weather"),
        ("now_2", "now"),
    ]
    assert orjson.loads(calls[0].function.arguments) == {"location": "Toronto"}
    assert calls[1].function.arguments == "{}"
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (37, 28)


def test_thinking_stream_is_reasoning_content() -> None:
    chunks = chunks_of(assert_split_invariant(THINKING_STREAM))
    reasoning = "".join(
        (c.choices[0].delta.model_extra or {}).get("reasoning_content", "")
        for c in chunks
        if c.choices
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert (reasoning, text) == ("Greeting.", "Hi!")


def test_stream_never_holds_back_a_complete_event() -> None:
    """Each Cohere event's translation is returned by the feed that completes it."""
    translator = CohereChatToChatCompletion(include_usage=True, created=CREATED)
    blocks = [e + b"\n\n" for e in TEXT_STREAM.split(b"\n\n") if e]
    outputs = [translator.feed(block) for block in blocks]
    kinds = [orjson.loads(b.split(b"data: ", 1)[1])["type"] for b in blocks]
    produced = {kind: len(data_lines(out)) for kind, out in zip(kinds, outputs, strict=True) if out}
    assert produced == {
        "message-start": 1,
        "content-delta": 1,
        "message-end": 3,  # the finish chunk, the usage chunk and [DONE]
    }
    assert translator.finish() == b""


def test_stream_generation_error() -> None:
    head = TEXT_STREAM[: TEXT_STREAM.index(b"event: content-end")]
    body = head + sse(
        {"type": "message-end", "delta": {"finish_reason": "ERROR", "error": "model overloaded"}}
    )
    lines = data_lines(assert_split_invariant(body))
    assert b"[DONE]" not in lines  # the app must see the stream failed
    for line in lines[:-1]:
        ChatCompletionChunk.model_validate(orjson.loads(line))
    assert orjson.loads(lines[-1]) == {
        "error": {
            "message": "model overloaded",
            "type": "server_error",
            "code": "generation_error",
            "param": None,
        }
    }
    summary = parse_stream(body, [])
    assert summary.complete is False
    assert summary.delivered_text == ["Bonjour", " ! Ça va ? ", "☕ 🚀"]


def test_cut_stream_gets_no_done() -> None:
    cut = TOOL_STREAM[: TOOL_STREAM.index(b"event: tool-call-end")]
    lines = data_lines(translate_stream(cut, []))
    assert b"[DONE]" not in lines
    chunks = [ChatCompletionChunk.model_validate(orjson.loads(line)) for line in lines]
    assert all(c.choices[0].finish_reason is None for c in chunks)


def test_final_event_without_blank_line_is_translated_at_finish() -> None:
    body = TEXT_STREAM[: -len(b"\n")]  # the server closed right after message-end's data line
    translator = CohereChatToChatCompletion(created=CREATED)
    head = translator.feed(body)
    assert b"[DONE]" not in head
    assert translator.finish().endswith(b"data: [DONE]\n\n")


def test_stream_skips_malformed_events() -> None:
    body = b"event: content-delta\ndata: {not json\n\n" + TOOL_STREAM
    translator = CohereChatToChatCompletion(created=CREATED)
    output = translator.feed(body) + translator.finish()
    assert translator.skipped == 1  # Cohere's own [DONE] is not counted
    assert len(chunks_of(output)) == 10


# -------------------------------------------------- the usage format (parsers/cohere)


@pytest.mark.parametrize(
    ("body", "usage", "text", "reason"),
    [
        (
            TEXT_STREAM,
            Usage(prompt_tokens=21, completion_tokens=105, total_tokens=126),
            ["Bonjour", " ! Ça va ? ", "☕ 🚀"],
            "COMPLETE",
        ),
        (
            TOOL_STREAM,
            Usage(prompt_tokens=37, completion_tokens=28, total_tokens=65),
            [
                "I will check",
                " the weather.",
                "get_weather",
                '{\n    "',
                'location": "Tor',
                'onto"\n}',
                "now",
                "{}",
            ],
            "TOOL_CALL",
        ),
        (
            THINKING_STREAM,
            Usage(prompt_tokens=2, completion_tokens=7, total_tokens=9),
            ["Greeting.", "Hi!"],
            "COMPLETE",
        ),
    ],
)
def test_usage_format_reads_streams_at_any_split(
    body: bytes, usage: Usage, text: list[str], reason: str
) -> None:
    whole = parse_stream(body, [])
    assert whole.usage == usage  # billed units, not the processed count
    assert whole.delivered_text == text
    assert whole.finish_reason == reason
    assert whole.complete is True
    assert whole.response_model is None  # Cohere does not name the model
    for cut in range(len(body) + 1):
        summary = parse_stream(body, [cut])
        assert (summary.usage, summary.delivered_text, summary.complete) == (
            usage,
            text,
            True,
        ), cut


def test_usage_format_counts_a_cancelled_stream_from_its_text() -> None:
    cut = TEXT_STREAM.index(b"event: content-end")
    summary = parse_stream(TEXT_STREAM[:cut], [])
    assert (summary.usage, summary.complete) == (None, False)
    assert summary.delivered_text == ["Bonjour", " ! Ça va ? ", "☕ 🚀"]


def test_usage_format_prefers_billed_units_and_falls_back_field_by_field() -> None:
    def usage_of(usage: dict[str, Any]) -> Usage | None:
        answer = {"id": "x", "finish_reason": "COMPLETE", "message": {"role": "assistant"}}
        return parse_json("cohere", orjson.dumps({**answer, "usage": usage})).usage

    processed = {"input_tokens": 71, "output_tokens": 9}
    assert usage_of({"tokens": processed}) == Usage(71, 9, 80)
    assert usage_of({"billed_units": {"input_tokens": 5}, "tokens": processed}) == Usage(5, 9, 14)
    # Cohere does not say whether the billed count includes cache hits: capped at it.
    billed = {"input_tokens": 5, "output_tokens": 2}
    assert usage_of({"billed_units": billed, "cached_tokens": 40}) == Usage(
        5, 2, 7, cached_tokens=5
    )
    assert usage_of({"billed_units": {}}) is None


def test_usage_format_reads_embed_answers() -> None:
    summary = parse_json("cohere", orjson.dumps(EMBED_JSON))
    assert summary.usage == Usage(prompt_tokens=3, completion_tokens=0, total_tokens=3)
    assert summary.complete is True


# ---------------------------------------------------------------- embed answers

EMBED_JSON: dict[str, Any] = {
    "id": "da6e531f-4f4f-4d3c-8b3b-7a9d6b6b0a1e",
    "embeddings": {"float": [[0.25, -0.5, 0.125], [1.0, 0.0, -1.0]]},
    "texts": ["hello", "goodbye"],
    "meta": {"api_version": {"version": "2"}, "billed_units": {"input_tokens": 3}},
    "response_type": "embeddings_by_type",
}


def test_embed_fixture_is_cohere_shaped() -> None:
    EmbedByTypeResponse.model_validate(EMBED_JSON)


def test_embed_answer_floats() -> None:
    out = CohereEmbedToEmbeddings().translate_json(orjson.dumps(EMBED_JSON), 200)
    result = CreateEmbeddingResponse.model_validate(orjson.loads(out))
    assert result.object == "list" and result.model == ""
    assert [(d.index, d.object, d.embedding) for d in result.data] == [
        (0, "embedding", [0.25, -0.5, 0.125]),
        (1, "embedding", [1.0, 0.0, -1.0]),
    ]
    assert (result.usage.prompt_tokens, result.usage.total_tokens) == (3, 3)


def test_embed_answer_base64_is_openai_packing() -> None:
    out = orjson.loads(
        CohereEmbedToEmbeddings(base64=True).translate_json(orjson.dumps(EMBED_JSON), 200)
    )
    packed = [base64.b64decode(d["embedding"]) for d in out["data"]]
    assert [list(struct.unpack(f"<{len(p) // 4}f", p)) for p in packed] == [
        [0.25, -0.5, 0.125],
        [1.0, 0.0, -1.0],
    ]


def test_embed_answer_read_whole_if_streamed() -> None:
    translator = CohereEmbedToEmbeddings()
    raw = orjson.dumps(EMBED_JSON)
    assert translator.feed(raw[:10]) == b"" and translator.feed(raw[10:]) == b""
    assert orjson.loads(translator.finish())["usage"]["prompt_tokens"] == 3

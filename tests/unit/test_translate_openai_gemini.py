"""OpenAI Chat Completions / Embeddings <-> Google Gemini API translation.

Requests are written as the OpenAI SDK sends them; translated requests are checked
against the expected Gemini body and against the google-genai SDK's own types (which
forbid unknown fields). Responses are written in the shape Gemini's API reference and
recorded streams show, and checked with the google-genai types too; every translated
object is validated with the OpenAI SDK's types, and streams are fed at every byte split
(the output must not depend on where Envoy cut the body).
"""

from __future__ import annotations

import base64
import copy
import random
import struct
from typing import Any

import orjson
import pydantic
import pytest
from google.genai import types as gemini
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types import CreateEmbeddingResponse
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from ext_proc.routing.translate import TranslationError
from ext_proc.routing.translate.openai_gemini import (
    SIGNATURE_SEPARATOR,
    THINKING_BUDGETS,
    EmbeddingsToOpenAI,
    GenerateContentToChatCompletion,
    model_resource,
    split_tool_call_id,
    to_gemini_embeddings_request,
    to_gemini_request,
    wants_usage_chunk,
)

DEPLOYMENT = "gemini-2.5-flash"
CREATED = 1_760_000_000
NONCE = "n0nce"
# A 1x1 PNG.
PNG_B64 = (
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk"
    "+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)
SIGNATURE = base64.b64encode(b"an opaque thought signature").decode()

# The request's top-level fields and the google-genai type each must validate as.
_REQUEST_TYPES: dict[str, Any] = {
    "systemInstruction": gemini.Content,
    "generationConfig": gemini.GenerationConfig,
    "toolConfig": gemini.ToolConfig,
}


def assert_valid_gemini_request(request: dict[str, Any]) -> None:
    """Every part of a generateContent body parses as the google-genai type it is (they
    forbid unknown fields, and decode base64 the way the API does)."""
    assert set(request) <= {"contents", "tools", *_REQUEST_TYPES}, request.keys()
    assert request["contents"], "Gemini needs at least one content"
    for content in request["contents"]:
        assert content["role"] in ("user", "model")
        assert content["parts"], "Gemini refuses a content without parts"
        gemini.Content.model_validate_json(orjson.dumps(content))
    for tool in request.get("tools", []):
        gemini.Tool.model_validate_json(orjson.dumps(tool))
    for name, model in _REQUEST_TYPES.items():
        if name in request:
            model.model_validate_json(orjson.dumps(request[name]))


def translate(body: dict[str, Any]) -> dict[str, Any]:
    original = copy.deepcopy(body)
    out = to_gemini_request(body, DEPLOYMENT)
    assert body == original, "the app's body must not be modified"
    assert_valid_gemini_request(out)
    return out


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "parts": [{"text": text}]}


# ------------------------------------------------------------------------- requests

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
            "additionalProperties": False,
        },
        "strict": True,
    },
}
WEATHER_DECLARATION = {
    "name": "get_weather",
    "description": "Get the current weather in a given location",
    "parametersJsonSchema": WEATHER_TOOL["function"]["parameters"],
}

REQUEST_CASES: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    (
        "minimal: one user turn, nothing else",
        {"model": "gemini", "messages": [{"role": "user", "content": "Hello!"}]},
        {"contents": [user("Hello!")]},
    ),
    (
        "system and developer messages, anywhere, become systemInstruction parts in order",
        {
            "model": "gemini",
            "messages": [
                {"role": "system", "content": "You are a pirate."},
                {
                    "role": "developer",
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
        {
            "contents": [
                user("Hi"),
                {"role": "model", "parts": [{"text": "Arr."}]},
                user("Where is the gold?"),
            ],
            "systemInstruction": {
                "parts": [
                    {"text": "You are a pirate."},
                    {"text": "Answer in English."},
                    {"text": "Be brief."},
                    {"text": "Never mention treasure."},
                ]
            },
        },
    ),
    (
        "generation parameters; max_completion_tokens wins; n, logprobs, seed, penalties",
        {
            "model": "gemini",
            "messages": [{"role": "user", "content": "Hi"}],
            "max_completion_tokens": 300,
            "max_tokens": 999,
            "temperature": 0.2,
            "top_p": 0.9,
            "top_k": 40,
            "seed": 7,
            "frequency_penalty": 0.5,
            "presence_penalty": -0.5,
            "stop": ["END", "", "STOP"],
            "n": 2,
            "logprobs": True,
            "top_logprobs": 3,
            "stream": True,
            "stream_options": {"include_usage": True},
            "user": "user-1234",
            "store": False,
            "metadata": {"team": "a"},
            "service_tier": "auto",
            "prompt_cache_key": "k",
            "safety_identifier": "s",
        },
        {
            "contents": [user("Hi")],
            "generationConfig": {
                "maxOutputTokens": 300,
                "temperature": 0.2,
                "topP": 0.9,
                "frequencyPenalty": 0.5,
                "presencePenalty": -0.5,
                "topK": 40,
                "seed": 7,
                "stopSequences": ["END", "STOP"],
                "candidateCount": 2,
                "responseLogprobs": True,
                "logprobs": 3,
            },
        },
    ),
    (
        "stop as a string, n=1 is the default, json_object, reasoning_effort",
        {
            "model": "gemini",
            "messages": [{"role": "user", "content": "Hi"}],
            "stop": "\n\n",
            "n": 1,
            "response_format": {"type": "json_object"},
            "reasoning_effort": "low",
            "parallel_tool_calls": True,
            "logit_bias": {},
            "modalities": ["text"],
        },
        {
            "contents": [user("Hi")],
            "generationConfig": {
                "stopSequences": ["\n\n"],
                "responseMimeType": "application/json",
                "thinkingConfig": {"thinkingBudget": 1024},
            },
        },
    ),
    (
        "json_schema: the schema as responseJsonSchema",
        {
            "model": "gemini",
            "messages": [{"role": "user", "content": "Hi"}],
            "response_format": {
                "type": "json_schema",
                "json_schema": {
                    "name": "answer",
                    "strict": True,
                    "schema": {
                        "type": "object",
                        "properties": {"answer": {"type": "string"}},
                        "required": ["answer"],
                        "additionalProperties": False,
                    },
                },
            },
        },
        {
            "contents": [user("Hi")],
            "generationConfig": {
                "responseMimeType": "application/json",
                "responseJsonSchema": {
                    "type": "object",
                    "properties": {"answer": {"type": "string"}},
                    "required": ["answer"],
                    "additionalProperties": False,
                },
            },
        },
    ),
    (
        "media: data URL -> inlineData, https URL -> fileData, audio, a PDF file",
        {
            "model": "gemini",
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "What is in these?"},
                        {
                            "type": "image_url",
                            "image_url": {
                                "url": f"data:image/png;base64,{PNG_B64}",
                                "detail": "low",
                            },
                        },
                        {
                            "type": "image_url",
                            "image_url": {"url": "https://example.com/cat.JPG?size=2"},
                        },
                        {"type": "image_url", "image_url": {"url": "https://example.com/img"}},
                        {
                            "type": "input_audio",
                            "input_audio": {"data": "UklGRg==", "format": "wav"},
                        },
                        {
                            "type": "file",
                            "file": {
                                "filename": "a.pdf",
                                "file_data": "data:application/pdf;base64,JVBERi0=",
                            },
                        },
                    ],
                }
            ],
        },
        {
            "contents": [
                {
                    "role": "user",
                    "parts": [
                        {"text": "What is in these?"},
                        {"inlineData": {"mimeType": "image/png", "data": PNG_B64}},
                        {
                            "fileData": {
                                "mimeType": "image/jpeg",
                                "fileUri": "https://example.com/cat.JPG?size=2",
                            }
                        },
                        {"fileData": {"fileUri": "https://example.com/img"}},
                        {"inlineData": {"mimeType": "audio/wav", "data": "UklGRg=="}},
                        {"inlineData": {"mimeType": "application/pdf", "data": "JVBERi0="}},
                    ],
                }
            ],
        },
    ),
    (
        "tool calls and results: signature out of the id, results and next text share a turn",
        {
            "model": "gemini",
            "messages": [
                {"role": "user", "content": "Weather in Paris and Tokyo?"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": f"call_a{SIGNATURE_SEPARATOR}{SIGNATURE}",
                            "type": "function",
                            "function": {
                                "name": "get_weather",
                                "arguments": '{"location": "Paris, FR"}',
                            },
                        },
                        {
                            "id": "call_b",
                            "type": "function",
                            "function": {"name": "get_time", "arguments": ""},
                        },
                    ],
                },
                {
                    "role": "tool",
                    "tool_call_id": f"call_a{SIGNATURE_SEPARATOR}{SIGNATURE}",
                    "content": '{"temperature": 18, "sky": "cloudy"}',
                },
                {
                    "role": "tool",
                    "tool_call_id": "call_b",
                    "content": [{"type": "text", "text": "09:00"}],
                },
                {"role": "user", "content": "Which is warmer?"},
            ],
            "tools": [WEATHER_TOOL, {"type": "function", "function": {"name": "get_time"}}],
            "tool_choice": "auto",
        },
        {
            "contents": [
                user("Weather in Paris and Tokyo?"),
                {
                    "role": "model",
                    "parts": [
                        {
                            "functionCall": {
                                "id": "call_a",
                                "name": "get_weather",
                                "args": {"location": "Paris, FR"},
                            },
                            "thoughtSignature": SIGNATURE,
                        },
                        {"functionCall": {"id": "call_b", "name": "get_time", "args": {}}},
                    ],
                },
                {
                    "role": "user",
                    "parts": [
                        {
                            "functionResponse": {
                                "id": "call_a",
                                "name": "get_weather",
                                "response": {"temperature": 18, "sky": "cloudy"},
                            }
                        },
                        {
                            "functionResponse": {
                                "id": "call_b",
                                "name": "get_time",
                                "response": {"output": "09:00"},
                            }
                        },
                        {"text": "Which is warmer?"},
                    ],
                },
            ],
            "tools": [{"functionDeclarations": [WEATHER_DECLARATION, {"name": "get_time"}]}],
            "toolConfig": {"functionCallingConfig": {"mode": "AUTO"}},
        },
    ),
    (
        "assistant text with a refusal part and names: names dropped; empty turns dropped",
        {
            "model": "gemini",
            "messages": [
                {"role": "user", "name": "alice", "content": "Hi"},
                {"role": "assistant", "content": ""},
                {"role": "user", "content": [{"type": "text", "text": "Still there?"}]},
                {
                    "role": "assistant",
                    "name": "bot",
                    "content": [
                        {"type": "text", "text": "Yes. "},
                        {"type": "refusal", "refusal": "But I cannot help with that."},
                    ],
                },
            ],
        },
        {
            "contents": [
                {"role": "user", "parts": [{"text": "Hi"}, {"text": "Still there?"}]},
                {
                    "role": "model",
                    "parts": [{"text": "Yes. "}, {"text": "But I cannot help with that."}],
                },
            ],
        },
    ),
]


@pytest.mark.parametrize(
    ("body", "expected"),
    [pytest.param(body, expected, id=name) for name, body, expected in REQUEST_CASES],
)
def test_request_translation(body: dict[str, Any], expected: dict[str, Any]) -> None:
    assert translate(body) == expected


@pytest.mark.parametrize(
    ("tool_choice", "expected"),
    [
        ("auto", {"mode": "AUTO"}),
        ("none", {"mode": "NONE"}),
        ("required", {"mode": "ANY"}),
        (
            {"type": "function", "function": {"name": "get_weather"}},
            {"mode": "ANY", "allowedFunctionNames": ["get_weather"]},
        ),
    ],
)
def test_tool_choice(tool_choice: Any, expected: dict[str, Any]) -> None:
    body = {
        "model": "gemini",
        "messages": [{"role": "user", "content": "Weather?"}],
        "tools": [WEATHER_TOOL],
        "tool_choice": tool_choice,
    }
    out = translate(body)
    assert out["tools"] == [{"functionDeclarations": [WEATHER_DECLARATION]}]
    assert out["toolConfig"] == {"functionCallingConfig": expected}


def test_tool_choice_without_tools() -> None:
    base = {"model": "gemini", "messages": [{"role": "user", "content": "Hi"}]}
    # auto and none without tools mean "answer in text": nothing to send.
    assert "toolConfig" not in translate({**base, "tool_choice": "none"})
    assert "toolConfig" not in translate({**base, "tools": [], "tool_choice": "auto"})
    # A choice that demands a tool goes out, for the provider to refuse as OpenAI does.
    assert translate({**base, "tool_choice": "required"})["toolConfig"] == {
        "functionCallingConfig": {"mode": "ANY"}
    }


@pytest.mark.parametrize(("effort", "budget"), list(THINKING_BUDGETS.items()))
def test_reasoning_effort_budgets(effort: str, budget: int) -> None:
    body = {
        "model": "g",
        "messages": [{"role": "user", "content": "Hi"}],
        "reasoning_effort": effort,
    }
    assert translate(body)["generationConfig"] == {"thinkingConfig": {"thinkingBudget": budget}}


def test_helpers() -> None:
    assert wants_usage_chunk({"stream_options": {"include_usage": True}})
    assert not wants_usage_chunk({"stream_options": {"include_usage": False}})
    assert not wants_usage_chunk({})
    assert model_resource("gemini-2.5-flash") == "models/gemini-2.5-flash"
    assert model_resource("models/gemini-2.5-flash") == "models/gemini-2.5-flash"
    assert model_resource("tunedModels/mine-123") == "tunedModels/mine-123"
    assert split_tool_call_id(f"call_1{SIGNATURE_SEPARATOR}{SIGNATURE}") == ("call_1", SIGNATURE)
    assert split_tool_call_id("call_1") == ("call_1", None)
    assert split_tool_call_id(f"call_1{SIGNATURE_SEPARATOR}") == (
        f"call_1{SIGNATURE_SEPARATOR}",
        None,
    )


def _body(**fields: Any) -> dict[str, Any]:
    return {"model": "gemini", "messages": [{"role": "user", "content": "Hi"}], **fields}


def _messages(*messages: dict[str, Any]) -> dict[str, Any]:
    return {"model": "gemini", "messages": list(messages)}


USER = {"role": "user", "content": "Hi"}


def _assistant_call(arguments: Any, call_id: str = "call_1") -> dict[str, Any]:
    return {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": call_id, "type": "function", "function": {"name": "f", "arguments": arguments}}
        ],
    }


def _user_part(part: dict[str, Any]) -> dict[str, Any]:
    return _messages({"role": "user", "content": [part]})


ERROR_CASES: list[tuple[dict[str, Any], str, str]] = [
    (_body(frobnicate=1), "frobnicate", "unsupported_parameter"),
    (_body(functions=[{"name": "f"}]), "functions", "unsupported_parameter"),
    (_body(function_call="auto"), "function_call", "unsupported_parameter"),
    (_body(audio={"voice": "alloy"}), "audio", "unsupported_parameter"),
    (_body(verbosity="low"), "verbosity", "unsupported_parameter"),
    (_body(web_search_options={}), "web_search_options", "unsupported_parameter"),
    (_body(logit_bias={"50256": -100}), "logit_bias", "unsupported_parameter"),
    (_body(logit_bias=[1]), "logit_bias", "invalid_type"),
    (_body(modalities=["text", "audio"]), "modalities", "unsupported_value"),
    (_body(n=0), "n", "invalid_value"),
    (_body(n=True), "n", "invalid_value"),
    (_body(top_logprobs=2), "top_logprobs", "invalid_value"),
    (_body(logprobs=True, top_logprobs=21), "top_logprobs", "invalid_value"),
    (_body(logprobs="yes"), "logprobs", "invalid_type"),
    (_body(reasoning_effort="extreme"), "reasoning_effort", "unsupported_value"),
    (_body(response_format={"type": "xml"}), "response_format.type", "unsupported_value"),
    (
        _body(response_format={"type": "json_schema", "json_schema": {"name": "x"}}),
        "response_format.json_schema.schema",
        "invalid_type",
    ),
    (_body(max_tokens=0), "max_tokens", "invalid_value"),
    (_body(max_completion_tokens="10"), "max_completion_tokens", "invalid_value"),
    (_body(temperature="hot"), "temperature", "invalid_type"),
    (_body(top_k=1.5), "top_k", "invalid_type"),
    (_body(seed="7"), "seed", "invalid_type"),
    (_body(stop=[1]), "stop", "invalid_type"),
    (_body(stream="yes"), "stream", "invalid_type"),
    (
        _body(tools=[WEATHER_TOOL], parallel_tool_calls=False),
        "parallel_tool_calls",
        "unsupported_value",
    ),
    (_body(tools=[{"type": "code_interpreter"}]), "tools[0].type", "unsupported_value"),
    (_body(tools={"type": "function"}), "tools", "invalid_type"),
    (
        _body(tools=[{"type": "function", "function": {"name": ""}}]),
        "tools[0].function.name",
        "invalid_type",
    ),
    (
        _body(tools=[{"type": "function", "function": {"name": "f", "parameters": "{}"}}]),
        "tools[0].function.parameters",
        "invalid_type",
    ),
    (_body(tool_choice="any"), "tool_choice", "unsupported_value"),
    (_body(tool_choice={"type": "function"}), "tool_choice.function.name", "invalid_type"),
    ({"model": "gemini", "messages": []}, "messages", "invalid_type"),
    (_messages({"role": "system", "content": "Only rules."}), "messages", "invalid_value"),
    (_messages({"role": "robot", "content": "Hi"}), "messages[0].role", "invalid_value"),
    (_messages("hello"), "messages[0]", "invalid_type"),  # type: ignore[arg-type]
    (_messages({"role": "user", "content": 3}), "messages[0].content", "invalid_type"),
    (
        _user_part({"type": "image_url", "image_url": {"url": "ftp://x/y.png"}}),
        "messages[0].content[0].image_url.url",
        "unsupported_value",
    ),
    (
        _user_part({"type": "image_url", "image_url": {"url": "data:image/png,abc"}}),
        "messages[0].content[0].image_url.url",
        "unsupported_value",
    ),
    (
        _user_part({"type": "image_url", "image_url": {"url": "data:;base64,abc"}}),
        "messages[0].content[0].image_url.url",
        "unsupported_value",
    ),
    (
        _user_part({"type": "input_audio", "input_audio": {"data": "AAA=", "format": "flac"}}),
        "messages[0].content[0].input_audio.format",
        "unsupported_value",
    ),
    (
        _user_part({"type": "file", "file": {"file_id": "file-abc"}}),
        "messages[0].content[0].file.file_id",
        "unsupported_parameter",
    ),
    (
        _user_part({"type": "file", "file": {"file_data": "JVBERi0="}}),
        "messages[0].content[0].file.file_data",
        "invalid_type",
    ),
    (
        _user_part({"type": "video_url", "video_url": "x"}),
        "messages[0].content[0].type",
        "unsupported_value",
    ),
    (
        _messages({"role": "system", "content": [{"type": "image_url"}]}, USER),
        "messages[0].content[0].type",
        "unsupported_value",
    ),
    (
        _messages(USER, _assistant_call("{not json")),
        "messages[1].tool_calls[0].function.arguments",
        "invalid_value",
    ),
    (
        _messages(USER, _assistant_call("[1, 2]")),
        "messages[1].tool_calls[0].function.arguments",
        "invalid_value",
    ),
    (
        _messages(USER, _assistant_call({"a": 1})),
        "messages[1].tool_calls[0].function.arguments",
        "invalid_type",
    ),
    (
        _messages(USER, _assistant_call("{}", call_id="")),
        "messages[1].tool_calls[0].id",
        "invalid_type",
    ),
    (
        _messages(USER, {"role": "assistant", "content": None, "function_call": {"name": "f"}}),
        "messages[1].function_call",
        "unsupported_parameter",
    ),
    (
        _messages(USER, {"role": "assistant", "content": None, "audio": {"id": "a"}}),
        "messages[1].audio",
        "unsupported_parameter",
    ),
    (
        _messages(USER, _assistant_call("{}"), {"role": "tool", "content": "result"}),
        "messages[2].tool_call_id",
        "missing_required_parameter",
    ),
    (
        # Gemini needs the function's name with its result, and only the call knows it.
        _messages(USER, {"role": "tool", "tool_call_id": "call_9", "content": "result"}),
        "messages[1].tool_call_id",
        "invalid_value",
    ),
]


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [pytest.param(body, param, code, id=param + ":" + code) for body, param, code in ERROR_CASES],
)
def test_request_errors_name_the_field(body: dict[str, Any], param: str, code: str) -> None:
    with pytest.raises(TranslationError) as caught:
        to_gemini_request(body, DEPLOYMENT)
    assert caught.value.param == param
    assert caught.value.code == code
    assert caught.value.message and str(caught.value) == caught.value.message


def test_request_check_catches_a_malformed_gemini_body() -> None:
    """The SDK-type check used above does reject what Gemini would refuse."""
    for bad in (
        {"contents": [{"role": "user", "parts": [{"txt": "Hi"}]}]},
        {"contents": [user("Hi")], "generationConfig": {"max_output_token": 5}},
        {"contents": [user("Hi")], "tools": [{"functionDeclaration": []}]},
    ):
        with pytest.raises(pydantic.ValidationError):
            assert_valid_gemini_request(bad)


# ---------------------------------------------------------------- embeddings request


def test_embeddings_request() -> None:
    body = {
        "model": "embed",
        "input": ["first", "second"],
        "dimensions": 256,
        "encoding_format": "base64",
        "user": "u-1",
    }
    original = copy.deepcopy(body)
    request, as_base64 = to_gemini_embeddings_request(body, "gemini-embedding-001")
    assert body == original
    assert as_base64 is True
    assert request == {
        "requests": [
            {
                "model": "models/gemini-embedding-001",
                "content": {"parts": [{"text": "first"}]},
                "outputDimensionality": 256,
            },
            {
                "model": "models/gemini-embedding-001",
                "content": {"parts": [{"text": "second"}]},
                "outputDimensionality": 256,
            },
        ]
    }
    for item in request["requests"]:
        gemini.Content.model_validate_json(orjson.dumps(item["content"]))
    single, as_base64 = to_gemini_embeddings_request({"model": "e", "input": "one"}, "m")
    assert as_base64 is False
    assert single == {"requests": [{"model": "models/m", "content": {"parts": [{"text": "one"}]}}]}


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"model": "e", "input": [1, 2, 3]}, "input[0]", "unsupported_value"),
        ({"model": "e", "input": [[1, 2]]}, "input[0]", "unsupported_value"),
        ({"model": "e", "input": ["a", ""]}, "input", "invalid_value"),
        ({"model": "e", "input": []}, "input", "invalid_type"),
        ({"model": "e", "input": "a", "dimensions": 0}, "dimensions", "invalid_value"),
        (
            {"model": "e", "input": "a", "encoding_format": "int8"},
            "encoding_format",
            "unsupported_value",
        ),
        ({"model": "e", "input": "a", "task": "x"}, "task", "unsupported_parameter"),
    ],
)
def test_embeddings_request_errors(body: dict[str, Any], param: str, code: str) -> None:
    with pytest.raises(TranslationError) as caught:
        to_gemini_embeddings_request(body, "m")
    assert (caught.value.param, caught.value.code) == (param, code)


# ---------------------------------------------------------------- JSON responses

USAGE = {
    "promptTokenCount": 1040,
    "candidatesTokenCount": 9,
    "totalTokenCount": 1349,
    "cachedContentTokenCount": 1024,
    "thoughtsTokenCount": 280,
    "toolUsePromptTokenCount": 20,
    "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 1040}],
    "cacheTokensDetails": [{"modality": "TEXT", "tokenCount": 1024}],
}

TEXT_RESPONSE = {
    "candidates": [
        {
            "content": {
                "parts": [
                    {"text": "Thinking about greetings.", "thought": True},
                    {"text": "Hello! "},
                    {"text": "How can I help?"},
                    {"text": "", "thoughtSignature": SIGNATURE},
                ],
                "role": "model",
            },
            "finishReason": "STOP",
            "avgLogprobs": -0.21,
        }
    ],
    "usageMetadata": USAGE,
    "modelVersion": "gemini-2.5-flash",
    "responseId": "7PnEaNHnNrmZ7dcP",
}

TOOL_RESPONSE = {
    "candidates": [
        {
            "content": {
                "parts": [
                    {"text": "Checking both."},
                    {
                        "functionCall": {
                            "name": "get_weather",
                            "args": {"location": "Paris, FR", "unit": "celsius"},
                        },
                        "thoughtSignature": SIGNATURE,
                    },
                    {"functionCall": {"id": "fc-7", "name": "get_time"}},
                ],
                "role": "model",
            },
            "finishReason": "STOP",
        }
    ],
    "usageMetadata": {"promptTokenCount": 472, "candidatesTokenCount": 89, "totalTokenCount": 561},
    "modelVersion": "gemini-2.5-pro",
    "responseId": "abc",
}


def gemini_response(obj: Any) -> bytes:
    """The fixture's bytes, after checking it is a real GenerateContentResponse."""
    body = orjson.dumps(obj)
    gemini.GenerateContentResponse.model_validate_json(body)
    return body


def json_translation(response: dict[str, Any]) -> ChatCompletion:
    out = GenerateContentToChatCompletion(created=CREATED, nonce=NONCE).translate_json(
        gemini_response(response), 200
    )
    return ChatCompletion.model_validate(orjson.loads(out))


def test_json_text_response() -> None:
    completion = json_translation(TEXT_RESPONSE)
    assert completion.id == "7PnEaNHnNrmZ7dcP"
    assert completion.object == "chat.completion"
    assert completion.created == CREATED
    assert completion.model == "gemini-2.5-flash"
    (choice,) = completion.choices
    assert choice.index == 0
    assert choice.finish_reason == "stop"
    assert choice.message.role == "assistant"
    assert choice.message.content == "Hello! How can I help?"  # no thought, no empty part
    assert choice.message.tool_calls is None
    usage = completion.usage
    assert usage is not None
    assert usage.prompt_tokens == 1040 + 20
    assert usage.completion_tokens == 9 + 280
    assert usage.total_tokens == 1349
    assert usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens == 1024
    assert usage.completion_tokens_details is not None
    assert usage.completion_tokens_details.reasoning_tokens == 280


def test_json_tool_call_response() -> None:
    completion = json_translation(TOOL_RESPONSE)
    (choice,) = completion.choices
    assert choice.finish_reason == "tool_calls"  # Gemini says STOP
    assert choice.message.content == "Checking both."
    calls = choice.message.tool_calls
    assert calls is not None
    assert [(c.id, c.type, c.function.name) for c in calls] == [
        (f"call_{NONCE}00{SIGNATURE_SEPARATOR}{SIGNATURE}", "function", "get_weather"),
        ("fc-7", "function", "get_time"),  # Gemini's own id, kept
    ]
    assert orjson.loads(calls[0].function.arguments) == {"location": "Paris, FR", "unit": "celsius"}
    assert orjson.loads(calls[1].function.arguments) == {}
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (472, 89)
    assert completion.usage.total_tokens == 561


def test_tool_call_ids_round_trip_into_the_next_request() -> None:
    """What the app sends back after a tool call is what Gemini needs: name, id, and the
    signature on the call."""
    completion = json_translation(TOOL_RESPONSE)
    message = completion.choices[0].message.model_dump(exclude_none=True)
    calls = message["tool_calls"]
    follow_up = {
        "model": "gemini",
        "messages": [
            {"role": "user", "content": "Weather and time in Paris?"},
            message,
            {"role": "tool", "tool_call_id": calls[0]["id"], "content": "18C"},
            {"role": "tool", "tool_call_id": calls[1]["id"], "content": '{"time": "09:00"}'},
        ],
    }
    model_turn, results = translate(follow_up)["contents"][1:]
    assert model_turn["parts"][1] == {
        "functionCall": {
            "id": f"call_{NONCE}00",
            "name": "get_weather",
            "args": {"location": "Paris, FR", "unit": "celsius"},
        },
        "thoughtSignature": SIGNATURE,
    }
    assert results["parts"] == [
        {
            "functionResponse": {
                "id": f"call_{NONCE}00",
                "name": "get_weather",
                "response": {"output": "18C"},
            }
        },
        {
            "functionResponse": {
                "id": "fc-7",
                "name": "get_time",
                "response": {"time": "09:00"},
            }
        },
    ]


def test_json_generated_ids_are_unique_per_translator() -> None:
    a = GenerateContentToChatCompletion(created=CREATED)
    b = GenerateContentToChatCompletion(created=CREATED)
    body = orjson.dumps(TOOL_RESPONSE)
    ids_a = orjson.loads(a.translate_json(body, 200))["choices"][0]["message"]["tool_calls"]
    ids_b = orjson.loads(b.translate_json(body, 200))["choices"][0]["message"]["tool_calls"]
    assert ids_a[0]["id"] != ids_b[0]["id"]


def test_json_candidates_become_choices_in_index_order() -> None:
    response = {
        "candidates": [
            {
                "content": {"parts": [{"text": "Second."}], "role": "model"},
                "finishReason": "MAX_TOKENS",
                "index": 1,
            },
            {"content": {"parts": [{"text": "First."}], "role": "model"}, "finishReason": "STOP"},
        ],
        "usageMetadata": {"promptTokenCount": 5, "candidatesTokenCount": 6, "totalTokenCount": 11},
        "modelVersion": "gemini-2.0-flash",
    }
    completion = json_translation(response)
    assert [(c.index, c.message.content, c.finish_reason) for c in completion.choices] == [
        (0, "First.", "stop"),
        (1, "Second.", "length"),
    ]
    assert completion.id == f"chatcmpl-{NONCE}"  # no responseId: one is made


def test_json_blocked_prompt() -> None:
    response = {
        "promptFeedback": {"blockReason": "SAFETY"},
        "usageMetadata": {"promptTokenCount": 12, "totalTokenCount": 12},
        "modelVersion": "gemini-2.5-flash",
    }
    completion = json_translation(response)
    (choice,) = completion.choices
    assert choice.finish_reason == "content_filter"
    assert choice.message.content is None
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (12, 0)


@pytest.mark.parametrize(
    ("reason", "finish_reason"),
    [
        ("STOP", "stop"),
        ("MAX_TOKENS", "length"),
        ("SAFETY", "content_filter"),
        ("RECITATION", "content_filter"),
        ("LANGUAGE", "content_filter"),
        ("BLOCKLIST", "content_filter"),
        ("PROHIBITED_CONTENT", "content_filter"),
        ("SPII", "content_filter"),
        ("IMAGE_SAFETY", "content_filter"),
        ("MALFORMED_FUNCTION_CALL", "stop"),
        ("OTHER", "stop"),
        ("FINISH_REASON_UNSPECIFIED", "stop"),
    ],
)
def test_finish_reasons(reason: str, finish_reason: str) -> None:
    candidate = {**TEXT_RESPONSE["candidates"][0], "finishReason": reason}  # type: ignore[dict-item]
    completion = json_translation({**TEXT_RESPONSE, "candidates": [candidate]})
    assert completion.choices[0].finish_reason == finish_reason


def test_json_logprobs() -> None:
    candidate = {
        "content": {"parts": [{"text": "Hi there"}], "role": "model"},
        "finishReason": "STOP",
        "avgLogprobs": -0.3,
        "logprobsResult": {
            "topCandidates": [
                {
                    "candidates": [
                        {"token": "Hi", "logProbability": -0.1},
                        {"token": "Hello", "logProbability": -2.5},
                    ]
                },
                {"candidates": [{"token": " there"}]},
            ],
            "chosenCandidates": [
                {"token": "Hi", "logProbability": -0.1},
                {"token": " there"},  # proto3 JSON omits a 0.0 log probability
            ],
        },
    }
    completion = json_translation({**TEXT_RESPONSE, "candidates": [candidate]})
    logprobs = completion.choices[0].logprobs
    assert logprobs is not None and logprobs.content is not None
    assert [(t.token, t.logprob, t.bytes) for t in logprobs.content] == [
        ("Hi", -0.1, list(b"Hi")),
        (" there", 0.0, list(b" there")),
    ]
    assert [(t.token, t.logprob) for t in logprobs.content[0].top_logprobs] == [
        ("Hi", -0.1),
        ("Hello", -2.5),
    ]


def test_success_status_with_unexpected_body() -> None:
    translator = GenerateContentToChatCompletion(created=CREATED)
    out = orjson.loads(translator.translate_json(b'{"foo": 1}', 200))
    assert out["error"]["code"] == "untranslatable_response"
    # A 200 that holds an error object (some proxies do that) is still an error.
    error = b'{"error": {"code": 500, "message": "Internal error", "status": "INTERNAL"}}'
    assert orjson.loads(translator.translate_json(error, 200)) == {
        "error": {
            "message": "Internal error",
            "type": "server_error",
            "code": "internal_error",
            "param": None,
        }
    }


# -------------------------------------------------------------------------- errors


def _gemini_error(code: int, status: str, message: str, **extra: Any) -> bytes:
    return orjson.dumps({"error": {"code": code, "message": message, "status": status, **extra}})


ERROR_RESPONSES = [
    (
        400,
        "INVALID_ARGUMENT",
        "Request contains an invalid argument.",
        "invalid_request_error",
        "invalid_argument",
    ),
    (
        400,
        "FAILED_PRECONDITION",
        "User location is not supported.",
        "invalid_request_error",
        "failed_precondition",
    ),
    (
        401,
        "UNAUTHENTICATED",
        "Request had invalid authentication credentials.",
        "authentication_error",
        "invalid_api_key",
    ),
    (
        403,
        "PERMISSION_DENIED",
        "Method doesn't allow unregistered callers.",
        "permission_error",
        "permission_denied",
    ),
    (
        404,
        "NOT_FOUND",
        "models/gemini-9 is not found for API version v1beta.",
        "not_found_error",
        "not_found",
    ),
    (
        429,
        "RESOURCE_EXHAUSTED",
        "You exceeded your current quota.",
        "rate_limit_error",
        "rate_limit_exceeded",
    ),
    (500, "INTERNAL", "An internal error has occurred.", "server_error", "internal_error"),
    (
        503,
        "UNAVAILABLE",
        "The model is overloaded. Please try again later.",
        "server_error",
        "service_unavailable",
    ),
    (504, "DEADLINE_EXCEEDED", "Deadline expired.", "timeout_error", "timeout"),
    (418, "TEAPOT", "odd", "invalid_request_error", "teapot"),
]


@pytest.mark.parametrize(("status", "kind", "message", "openai_type", "code"), ERROR_RESPONSES)
def test_json_errors(status: int, kind: str, message: str, openai_type: str, code: str) -> None:
    body = _gemini_error(status, kind, message)
    for translator in (
        GenerateContentToChatCompletion(created=CREATED),
        EmbeddingsToOpenAI(),
    ):
        assert orjson.loads(translator.translate_json(body, status)) == {
            "error": {"message": message, "type": openai_type, "code": code, "param": None}
        }


def test_invalid_api_key_is_named_even_on_a_400() -> None:
    body = _gemini_error(
        400,
        "INVALID_ARGUMENT",
        "API key not valid. Please pass a valid API key.",
        details=[
            {
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": "API_KEY_INVALID",
                "domain": "googleapis.com",
            }
        ],
    )
    out = orjson.loads(GenerateContentToChatCompletion().translate_json(body, 400))
    assert (out["error"]["type"], out["error"]["code"]) == (
        "authentication_error",
        "invalid_api_key",
    )


def test_non_json_and_wrapped_errors() -> None:
    translator = GenerateContentToChatCompletion()
    out = orjson.loads(translator.translate_json(b"upstream connect error", 503))
    assert out["error"] == {
        "message": "upstream connect error",
        "type": "server_error",
        "code": None,
        "param": None,
    }
    wrapped = b"[" + _gemini_error(429, "RESOURCE_EXHAUSTED", "Quota") + b"]"
    assert orjson.loads(translator.translate_json(wrapped, 429))["error"]["code"] == (
        "rate_limit_exceeded"
    )
    empty = orjson.loads(translator.translate_json(b"", 502))
    assert empty["error"]["message"] == "The provider answered HTTP 502."


# -------------------------------------------------------------------------- streams


def sse(*chunks: dict[str, Any]) -> bytes:
    """A Gemini SSE body: each chunk a whole GenerateContentResponse, CRLF line ends."""
    for chunk in chunks:
        gemini.GenerateContentResponse.model_validate_json(orjson.dumps(chunk))
    return b"".join(b"data: " + orjson.dumps(c) + b"\r\n\r\n" for c in chunks)


def chunk(
    parts: list[dict[str, Any]] | None,
    usage: dict[str, Any],
    finish: str | None = None,
    index: int = 0,
) -> dict[str, Any]:
    candidate: dict[str, Any] = {}
    if parts is not None:
        candidate["content"] = {"parts": parts, "role": "model"}
    if finish:
        candidate["finishReason"] = finish
    if index:
        candidate["index"] = index
    return {
        "candidates": [candidate],
        "usageMetadata": usage,
        "modelVersion": "gemini-2.5-flash",
        "responseId": "resp-1",
    }


RUNNING = {"promptTokenCount": 9, "totalTokenCount": 9}
FINAL = {"promptTokenCount": 9, "candidatesTokenCount": 15, "totalTokenCount": 24}

# Multi-byte characters (cut mid-character below), an empty signed part at the end.
TEXT_STREAM = sse(
    chunk([{"text": "Bonjour"}], RUNNING),
    chunk([{"text": " ! Ça va ? "}], RUNNING),
    chunk([{"text": "☕ 🚀"}, {"text": "", "thoughtSignature": SIGNATURE}], FINAL, "STOP"),
)

TOOL_STREAM = sse(
    chunk([{"text": "Let me check."}], RUNNING),
    chunk(
        [
            {
                "functionCall": {"name": "get_weather", "args": {"location": "San Francisco, CA"}},
                "thoughtSignature": SIGNATURE,
            },
            {"functionCall": {"name": "get_time", "args": {"tz": "America/Los_Angeles"}}},
        ],
        {"promptTokenCount": 9, "candidatesTokenCount": 30, "totalTokenCount": 39},
        "STOP",
    ),
)


def translate_stream(body: bytes, cuts: list[int], *, include_usage: bool = True) -> bytes:
    translator = GenerateContentToChatCompletion(
        include_usage=include_usage, created=CREATED, nonce=NONCE
    )
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


def accumulate(chunks: list[ChatCompletionChunk]) -> ChatCompletion:
    """The OpenAI SDK's own accumulator: the whole message from the chunks."""
    state = ChatCompletionStreamState()
    for c in chunks:
        state.handle_chunk(c)
    return state.get_final_completion()


def test_text_stream() -> None:
    chunks = chunks_of(assert_split_invariant(TEXT_STREAM))
    assert all(c.id == "resp-1" and c.model == "gemini-2.5-flash" for c in chunks)
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
    assert (usage_chunk.usage.prompt_tokens, usage_chunk.usage.completion_tokens) == (9, 15)
    assert usage_chunk.usage.total_tokens == 24


def test_stream_without_include_usage_has_no_usage_chunk() -> None:
    output = assert_split_invariant(TEXT_STREAM, include_usage=False)
    chunks = chunks_of(output)
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.choices for c in chunks)
    assert b'"usage"' not in output  # OpenAI sends no usage field unless asked


def test_tool_stream_accumulates_like_openai() -> None:
    chunks = chunks_of(assert_split_invariant(TOOL_STREAM))
    completion = accumulate(chunks)
    (choice,) = completion.choices
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me check."
    calls = choice.message.tool_calls
    assert calls is not None
    assert [(c.id, c.function.name) for c in calls] == [
        (f"call_{NONCE}00{SIGNATURE_SEPARATOR}{SIGNATURE}", "get_weather"),
        (f"call_{NONCE}01", "get_time"),
    ]
    assert orjson.loads(calls[0].function.arguments) == {"location": "San Francisco, CA"}
    assert orjson.loads(calls[1].function.arguments) == {"tz": "America/Los_Angeles"}
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (9, 30)


def test_stream_with_two_candidates() -> None:
    both = {"promptTokenCount": 4, "totalTokenCount": 4}
    body = sse(
        {
            "candidates": [
                {"content": {"parts": [{"text": "A1"}], "role": "model"}},
                {"content": {"parts": [{"text": "B1"}], "role": "model"}, "index": 1},
            ],
            "usageMetadata": both,
            "modelVersion": "gemini-2.0-flash",
        },
        chunk([{"text": " B2"}], both, "STOP", index=1),
        chunk(
            [{"text": " A2"}],
            {"promptTokenCount": 4, "candidatesTokenCount": 8, "totalTokenCount": 12},
            "STOP",
        ),
    )
    chunks = chunks_of(assert_split_invariant(body))
    completion = accumulate(chunks)
    assert [(c.index, c.message.content, c.finish_reason) for c in completion.choices] == [
        (0, "A1 A2", "stop"),
        (1, "B1 B2", "stop"),
    ]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8
    # [DONE] only once every candidate finished: after B's finish the stream went on.
    finishes = [i for i, c in enumerate(chunks) if c.choices and c.choices[0].finish_reason]
    assert len(finishes) == 2 and finishes[-1] == len(chunks) - 2


def test_blocked_prompt_stream() -> None:
    body = sse(
        {
            "promptFeedback": {"blockReason": "PROHIBITED_CONTENT"},
            "usageMetadata": {"promptTokenCount": 7, "totalTokenCount": 7},
            "modelVersion": "gemini-2.5-flash",
        }
    )
    chunks = chunks_of(assert_split_invariant(body))
    assert [c.choices[0].finish_reason for c in chunks if c.choices] == [None, "content_filter"]
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == 7


def test_stream_logprobs_go_with_the_chunk_text() -> None:
    logprobs = {"chosenCandidates": [{"token": "Hi", "logProbability": -0.5}]}
    body = sse(
        {
            "candidates": [
                {
                    "content": {"parts": [{"text": "Hi"}], "role": "model"},
                    "logprobsResult": logprobs,
                    "finishReason": "STOP",
                }
            ],
            "usageMetadata": FINAL,
        }
    )
    chunks = chunks_of(translate_stream(body, []))
    (text_chunk,) = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert text_chunk.choices[0].logprobs is not None
    assert text_chunk.choices[0].logprobs.content is not None
    assert text_chunk.choices[0].logprobs.content[0].logprob == -0.5


def test_stream_never_holds_back_a_complete_event() -> None:
    """Each Gemini chunk's translation is returned by the feed that completes it, the
    usage chunk and [DONE] with the last."""
    translator = GenerateContentToChatCompletion(include_usage=True, created=CREATED)
    events = [e + b"\r\n\r\n" for e in TEXT_STREAM.split(b"\r\n\r\n") if e]
    counts = [len(data_lines(translator.feed(event))) for event in events]
    assert counts == [2, 1, 4]  # role+text; text; text, finish, usage, [DONE]
    assert translator.finish() == b""


def test_stream_error_event() -> None:
    body = sse(chunk([{"text": "Partial"}], RUNNING)) + (
        b'data: {"error": {"code": 503, "message": "The model is overloaded.", '
        b'"status": "UNAVAILABLE"}}\r\n\r\n'
    )
    lines = data_lines(assert_split_invariant(body))
    assert b"[DONE]" not in lines  # the app must see the stream failed
    ChatCompletionChunk.model_validate(orjson.loads(lines[0]))
    ChatCompletionChunk.model_validate(orjson.loads(lines[1]))
    assert orjson.loads(lines[2]) == {
        "error": {
            "message": "The model is overloaded.",
            "type": "server_error",
            "code": "service_unavailable",
            "param": None,
        }
    }
    assert len(lines) == 3


def test_cut_stream_gets_no_done() -> None:
    cut = TOOL_STREAM[: TOOL_STREAM.index(b'"functionCall"') - 20]
    lines = data_lines(translate_stream(cut, []))
    assert b"[DONE]" not in lines
    chunks = [ChatCompletionChunk.model_validate(orjson.loads(line)) for line in lines]
    assert all(c.choices[0].finish_reason is None for c in chunks)


def test_final_event_without_blank_line_is_translated_at_finish() -> None:
    body = TEXT_STREAM[: -len(b"\r\n")]  # the server closed right after the last data line
    translator = GenerateContentToChatCompletion(created=CREATED)
    head = translator.feed(body)
    assert b"[DONE]" not in head
    tail = translator.finish()
    assert tail.endswith(b"data: [DONE]\n\n") and b'"finish_reason":"stop"' in tail


def test_stream_skips_malformed_events_and_ignores_what_follows_the_end() -> None:
    body = b"data: {not json\r\n\r\n" + TEXT_STREAM + sse(chunk([{"text": "late"}], FINAL))
    translator = GenerateContentToChatCompletion(created=CREATED)
    output = translator.feed(body) + translator.finish()
    assert translator.skipped == 1
    assert b"late" not in output
    assert len(chunks_of(output)) == 5


# ---------------------------------------------------------------------- embeddings

EMBEDDINGS = {"embeddings": [{"values": [0.25, -0.5, 0.125]}, {"values": [1.0, 0.0, -1.0]}]}


def embeddings_translation(base64_vectors: bool) -> dict[str, Any]:
    body = orjson.dumps(EMBEDDINGS)
    gemini.EmbedContentResponse.model_validate_json(body)
    translator = EmbeddingsToOpenAI(base64=base64_vectors)
    out = translator.translate_json(body, 200)
    streamed = EmbeddingsToOpenAI(base64=base64_vectors)
    assert streamed.feed(body[:7]) == b"" and streamed.feed(body[7:]) == b""
    assert streamed.finish() == out
    return dict(orjson.loads(out))


def test_embeddings_float() -> None:
    response = CreateEmbeddingResponse.model_validate(embeddings_translation(False))
    assert response.object == "list"
    assert [(e.index, e.object, e.embedding) for e in response.data] == [
        (0, "embedding", [0.25, -0.5, 0.125]),
        (1, "embedding", [1.0, 0.0, -1.0]),
    ]
    # Gemini reports no usage for embeddings: the gateway's row is estimated instead.
    assert (response.usage.prompt_tokens, response.usage.total_tokens) == (0, 0)


def test_embeddings_base64_is_little_endian_float32() -> None:
    # On the wire a string (the OpenAI SDK decodes it: see test_gemini_adapter's round trip).
    response = embeddings_translation(True)
    vectors = [item["embedding"] for item in response["data"]]
    assert all(isinstance(v, str) for v in vectors)
    assert [list(struct.unpack("<3f", base64.b64decode(v))) for v in vectors] == [
        [0.25, -0.5, 0.125],
        [1.0, 0.0, -1.0],
    ]


def test_embeddings_usage_when_gemini_reports_it() -> None:
    body = orjson.dumps({**EMBEDDINGS, "usageMetadata": {"promptTokenCount": 6}})
    out = orjson.loads(EmbeddingsToOpenAI().translate_json(body, 200))
    assert out["usage"] == {"prompt_tokens": 6, "total_tokens": 6}


def test_embeddings_unexpected_body() -> None:
    out = orjson.loads(EmbeddingsToOpenAI().translate_json(b'{"embedding": {}}', 200))
    assert out["error"]["code"] == "untranslatable_response"

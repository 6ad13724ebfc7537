"""OpenAI Chat Completions <-> Anthropic Messages translation.

Requests are written as the OpenAI SDK sends them; translated requests are checked
against the expected Messages body and against the Anthropic SDK's own request types.
Responses are written in the shape Anthropic's API reference and recorded streams show;
every translated object is validated with the OpenAI SDK's types, and streams are fed at
every byte split (the output must not depend on where Envoy cut the body).
"""

from __future__ import annotations

import copy
import random
from collections.abc import Iterator
from typing import Any

import orjson
import pydantic
import pytest
from anthropic.types import Message
from anthropic.types.message_create_params import (
    MessageCreateParamsNonStreaming,
    MessageCreateParamsStreaming,
)
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from ext_proc.routing.translate import TranslationError
from ext_proc.routing.translate.openai_anthropic import (
    DEFAULT_MAX_TOKENS,
    MessagesToChatCompletion,
    to_anthropic_request,
    wants_usage_chunk,
)

DEPLOYMENT = "claude-sonnet-4-5-20250929"
CREATED = 1_760_000_000
_ANTHROPIC_REQUEST = pydantic.TypeAdapter(MessageCreateParamsNonStreaming)
_ANTHROPIC_STREAM_REQUEST = pydantic.TypeAdapter(MessageCreateParamsStreaming)

# A 1x1 PNG.
PNG_B64 = (
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk"
    "+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)


def _materialise(value: Any) -> Any:
    """Pydantic validates TypedDict iterables lazily: walk them so every item is checked."""
    if isinstance(value, dict):
        return {key: _materialise(item) for key, item in value.items()}
    if isinstance(value, list | tuple | Iterator) or type(value).__name__ == "ValidatorIterator":
        return [_materialise(item) for item in value]
    return value


def assert_valid_anthropic_request(request: dict[str, Any]) -> None:
    adapter = _ANTHROPIC_STREAM_REQUEST if request.get("stream") else _ANTHROPIC_REQUEST
    _materialise(adapter.validate_python(request))


def translate(body: dict[str, Any]) -> dict[str, Any]:
    original = copy.deepcopy(body)
    out = to_anthropic_request(body, DEPLOYMENT)
    assert body == original, "the app's body must not be modified"
    assert_valid_anthropic_request(out)
    return out


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
        },
        "strict": True,
    },
}
WEATHER_TOOL_ANTHROPIC = {
    "name": "get_weather",
    "description": "Get the current weather in a given location",
    "input_schema": WEATHER_TOOL["function"]["parameters"],
}

REQUEST_CASES: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    (
        "minimal: deployment, default max_tokens, string content",
        {"model": "claude-sonnet", "messages": [{"role": "user", "content": "Hello!"}]},
        {
            "model": DEPLOYMENT,
            "messages": [{"role": "user", "content": "Hello!"}],
            "max_tokens": DEFAULT_MAX_TOKENS,
        },
    ),
    (
        "one system message becomes a string",
        {
            "model": "claude-sonnet",
            "messages": [
                {"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Hi"},
            ],
        },
        {
            "model": DEPLOYMENT,
            "system": "You are terse.",
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": DEFAULT_MAX_TOKENS,
        },
    ),
    (
        "system and developer messages, anywhere, become text blocks in order",
        {
            "model": "claude-sonnet",
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
            "model": DEPLOYMENT,
            "system": [
                {"type": "text", "text": "You are a pirate."},
                {"type": "text", "text": "Answer in English."},
                {"type": "text", "text": "Be brief."},
                {"type": "text", "text": "Never mention treasure."},
            ],
            "messages": [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Arr."},
                {"role": "user", "content": "Where is the gold?"},
            ],
            "max_tokens": DEFAULT_MAX_TOKENS,
        },
    ),
    (
        "images: data URL -> base64 source, https URL -> url source, detail dropped",
        {
            "model": "claude-sonnet",
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "What is in these images?"},
                        {
                            "type": "image_url",
                            "image_url": {
                                "url": f"data:image/png;base64,{PNG_B64}",
                                "detail": "low",
                            },
                        },
                        {
                            "type": "image_url",
                            "image_url": {"url": "https://upload.wikimedia.org/cat.jpg"},
                        },
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
                        {
                            "type": "image",
                            "source": {
                                "type": "base64",
                                "media_type": "image/png",
                                "data": PNG_B64,
                            },
                        },
                        {
                            "type": "image",
                            "source": {
                                "type": "url",
                                "url": "https://upload.wikimedia.org/cat.jpg",
                            },
                        },
                    ],
                }
            ],
            "max_tokens": 300,
        },
    ),
    (
        "tool calls and results: consecutive results and the next user text share one turn",
        {
            "model": "claude-sonnet",
            "messages": [
                {"role": "user", "content": "Weather in Paris and Tokyo?"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "toolu_01A",
                            "type": "function",
                            "function": {
                                "name": "get_weather",
                                "arguments": '{"location": "Paris, FR"}',
                            },
                        },
                        {
                            "id": "toolu_01B",
                            "type": "function",
                            "function": {
                                "name": "get_weather",
                                "arguments": '{"location": "Tokyo, JP", "unit": "celsius"}',
                            },
                        },
                    ],
                },
                {"role": "tool", "tool_call_id": "toolu_01A", "content": "18C, cloudy"},
                {
                    "role": "tool",
                    "tool_call_id": "toolu_01B",
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
                    "content": [
                        {
                            "type": "tool_use",
                            "id": "toolu_01A",
                            "name": "get_weather",
                            "input": {"location": "Paris, FR"},
                        },
                        {
                            "type": "tool_use",
                            "id": "toolu_01B",
                            "name": "get_weather",
                            "input": {"location": "Tokyo, JP", "unit": "celsius"},
                        },
                    ],
                },
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "tool_result",
                            "tool_use_id": "toolu_01A",
                            "content": "18C, cloudy",
                        },
                        {
                            "type": "tool_result",
                            "tool_use_id": "toolu_01B",
                            "content": [{"type": "text", "text": "24C, sunny"}],
                        },
                        {"type": "text", "text": "Which is warmer?"},
                    ],
                },
            ],
            "max_tokens": DEFAULT_MAX_TOKENS,
            "tools": [WEATHER_TOOL_ANTHROPIC],
        },
    ),
    (
        "assistant text beside tool calls; empty arguments are an empty input",
        {
            "model": "claude-sonnet",
            "messages": [
                {"role": "user", "content": "What time is it?"},
                {
                    "role": "assistant",
                    "content": "Let me check.",
                    "tool_calls": [
                        {
                            "id": "toolu_01C",
                            "type": "function",
                            "function": {"name": "now", "arguments": ""},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "toolu_01C", "content": "12:00"},
            ],
        },
        {
            "model": DEPLOYMENT,
            "messages": [
                {"role": "user", "content": "What time is it?"},
                {
                    "role": "assistant",
                    "content": [
                        {"type": "text", "text": "Let me check."},
                        {"type": "tool_use", "id": "toolu_01C", "name": "now", "input": {}},
                    ],
                },
                {
                    "role": "user",
                    "content": [
                        {"type": "tool_result", "tool_use_id": "toolu_01C", "content": "12:00"}
                    ],
                },
            ],
            "max_tokens": DEFAULT_MAX_TOKENS,
        },
    ),
    (
        "consecutive same-role messages merge; names dropped; refusal parts kept as text",
        {
            "model": "claude-sonnet",
            "messages": [
                {"role": "user", "content": "First.", "name": "alice"},
                {"role": "user", "content": [{"type": "text", "text": "Second."}]},
                {"role": "assistant", "content": ""},
                {"role": "assistant", "content": [{"type": "refusal", "refusal": "I can't."}]},
                {"role": "user", "content": "Why?"},
            ],
        },
        {
            "model": DEPLOYMENT,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "First."},
                        {"type": "text", "text": "Second."},
                    ],
                },
                {"role": "assistant", "content": "I can't."},
                {"role": "user", "content": "Why?"},
            ],
            "max_tokens": DEFAULT_MAX_TOKENS,
        },
    ),
    (
        "sampling, stop string, stream, user; harmless OpenAI-only parameters dropped",
        {
            "model": "claude-sonnet",
            "messages": [{"role": "user", "content": "Count to five."}],
            "max_completion_tokens": 64,
            "max_tokens": 9999,
            "temperature": 0.2,
            "top_p": 0.9,
            "stop": "5",
            "stream": True,
            "stream_options": {"include_usage": True},
            "user": "user-1234",
            "n": 1,
            "logprobs": False,
            "response_format": {"type": "text"},
            "frequency_penalty": 0.5,
            "presence_penalty": 0.1,
            "seed": 42,
            "store": False,
            "metadata": {"team": "search"},
            "service_tier": "auto",
            "parallel_tool_calls": None,
            "top_k": 40,
        },
        {
            "model": DEPLOYMENT,
            "messages": [{"role": "user", "content": "Count to five."}],
            "max_tokens": 64,
            "temperature": 0.2,
            "top_p": 0.9,
            "top_k": 40,
            "stop_sequences": ["5"],
            "stream": True,
            "metadata": {"user_id": "user-1234"},
        },
    ),
    (
        "stop list; stream false is not sent",
        {
            "model": "claude-sonnet",
            "messages": [{"role": "user", "content": "Go"}],
            "max_tokens": 10,
            "stop": ["\n\n", "END"],
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
        "tool_choice required -> any, parallel_tool_calls false -> disable_parallel_tool_use",
        {
            "model": "claude-sonnet",
            "messages": [{"role": "user", "content": "Weather in Oslo?"}],
            "tools": [WEATHER_TOOL, {"type": "function", "function": {"name": "now"}}],
            "tool_choice": "required",
            "parallel_tool_calls": False,
        },
        {
            "model": DEPLOYMENT,
            "messages": [{"role": "user", "content": "Weather in Oslo?"}],
            "max_tokens": DEFAULT_MAX_TOKENS,
            "tools": [
                WEATHER_TOOL_ANTHROPIC,
                {"name": "now", "input_schema": {"type": "object", "properties": {}}},
            ],
            "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
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
    ("tool_choice", "parallel", "expected"),
    [
        ("auto", None, {"type": "auto"}),
        ("none", None, {"type": "none"}),
        ("required", None, {"type": "any"}),
        (
            {"type": "function", "function": {"name": "get_weather"}},
            None,
            {"type": "tool", "name": "get_weather"},
        ),
        (None, False, {"type": "auto", "disable_parallel_tool_use": True}),
        ("none", False, {"type": "none"}),
        (None, True, None),
    ],
)
def test_tool_choice(tool_choice: Any, parallel: bool | None, expected: Any) -> None:
    body = {
        "model": "claude-sonnet",
        "messages": [{"role": "user", "content": "Weather?"}],
        "tools": [WEATHER_TOOL],
        "tool_choice": tool_choice,
        "parallel_tool_calls": parallel,
    }
    assert translate(body).get("tool_choice") == expected


def test_tool_choice_without_tools() -> None:
    base = {"model": "claude-sonnet", "messages": [{"role": "user", "content": "Hi"}]}
    # "auto" / "none" without tools ask for nothing: Anthropic would refuse them.
    assert "tool_choice" not in translate({**base, "tool_choice": "auto", "tools": []})
    assert "tool_choice" not in translate({**base, "tool_choice": "none"})
    # A choice that demands a tool is the provider's to refuse, as OpenAI refuses it.
    assert translate({**base, "tool_choice": "required"})["tool_choice"] == {"type": "any"}


def test_wants_usage_chunk() -> None:
    assert wants_usage_chunk({"stream": True, "stream_options": {"include_usage": True}})
    assert not wants_usage_chunk({"stream": True})
    assert not wants_usage_chunk({"stream": True, "stream_options": {"include_usage": False}})


def _body(**fields: Any) -> dict[str, Any]:
    return {"model": "claude-sonnet", "messages": [{"role": "user", "content": "Hi"}], **fields}


def _messages(*messages: dict[str, Any]) -> dict[str, Any]:
    return {"model": "claude-sonnet", "messages": list(messages)}


def _assistant_call(arguments: Any) -> dict[str, Any]:
    return {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "toolu_01",
                "type": "function",
                "function": {"name": "get_weather", "arguments": arguments},
            }
        ],
    }


def _image(url: str) -> dict[str, Any]:
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}


USER = {"role": "user", "content": "Hi"}

ERROR_CASES: list[tuple[dict[str, Any], str, str]] = [
    (_body(n=2), "n", "unsupported_value"),
    (_body(logprobs=True), "logprobs", "unsupported_parameter"),
    (_body(top_logprobs=3), "top_logprobs", "unsupported_parameter"),
    (_body(logit_bias={"50256": -100}), "logit_bias", "unsupported_parameter"),
    (
        _body(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}),
        "response_format",
        "unsupported_value",
    ),
    (_body(response_format={"type": "json_object"}), "response_format", "unsupported_value"),
    (_body(modalities=["text", "audio"]), "modalities", "unsupported_value"),
    (_body(functions=[{"name": "f"}]), "functions", "unsupported_parameter"),
    (_body(function_call="auto"), "function_call", "unsupported_parameter"),
    (_body(reasoning_effort="high"), "reasoning_effort", "unsupported_parameter"),
    (_body(audio={"voice": "alloy", "format": "wav"}), "audio", "unsupported_parameter"),
    (_body(best_of=3), "best_of", "unsupported_parameter"),
    (_body(max_tokens=0), "max_tokens", "invalid_value"),
    (_body(max_completion_tokens="100"), "max_completion_tokens", "invalid_value"),
    (_body(temperature="hot"), "temperature", "invalid_type"),
    (_body(stop=5), "stop", "invalid_type"),
    (_body(user=42), "user", "invalid_type"),
    (_body(stream="yes"), "stream", "invalid_type"),
    (_body(parallel_tool_calls="no"), "parallel_tool_calls", "invalid_type"),
    (_body(tools={"type": "function"}), "tools", "invalid_type"),
    (
        _body(tools=[{"type": "custom", "custom": {"name": "grammar"}}]),
        "tools[0].type",
        "unsupported_value",
    ),
    (
        _body(tools=[{"type": "function", "function": {"description": "no name"}}]),
        "tools[0].function.name",
        "invalid_type",
    ),
    (
        _body(tools=[{"type": "function", "function": {"name": "f", "parameters": "{}"}}]),
        "tools[0].function.parameters",
        "invalid_type",
    ),
    (_body(tool_choice="sometimes"), "tool_choice", "unsupported_value"),
    (
        _body(tool_choice={"type": "function", "function": {}}),
        "tool_choice.function.name",
        "invalid_type",
    ),
    ({"model": "claude-sonnet", "messages": []}, "messages", "invalid_type"),
    (_messages("hello"), "messages[0]", "invalid_type"),
    (
        _messages({"role": "function", "name": "f", "content": "x"}),
        "messages[0].role",
        "unsupported_value",
    ),
    (_messages({"role": "robot", "content": "x"}), "messages[0].role", "invalid_value"),
    (
        _messages(
            {"role": "system", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
        ),
        "messages[0].content[0].type",
        "unsupported_value",
    ),
    (_messages({"role": "user", "content": 7}), "messages[0].content", "invalid_type"),
    (
        _messages(
            {
                "role": "user",
                "content": [{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}],
            }
        ),
        "messages[0].content[0].type",
        "unsupported_value",
    ),
    (
        _messages({"role": "user", "content": [{"type": "text", "text": None}]}),
        "messages[0].content[0].text",
        "invalid_type",
    ),
    (
        _messages(_image("data:image/png,rawbytes")),
        "messages[0].content[0].image_url.url",
        "unsupported_value",
    ),
    (
        _messages(_image(f"data:image/svg+xml;base64,{PNG_B64}")),
        "messages[0].content[0].image_url.url",
        "unsupported_value",
    ),
    (
        _messages(_image("ftp://example.com/a.png")),
        "messages[0].content[0].image_url.url",
        "unsupported_value",
    ),
    (
        _messages({"role": "user", "content": [{"type": "image_url", "image_url": None}]}),
        "messages[0].content[0].image_url.url",
        "invalid_type",
    ),
    (
        _messages(USER, _assistant_call('{"location": "Paris"')),
        "messages[1].tool_calls[0].function.arguments",
        "invalid_value",
    ),
    (
        _messages(USER, _assistant_call('["Paris"]')),
        "messages[1].tool_calls[0].function.arguments",
        "invalid_value",
    ),
    (
        _messages(USER, _assistant_call({"location": "Paris"})),
        "messages[1].tool_calls[0].function.arguments",
        "invalid_type",
    ),
    (
        _messages(
            USER,
            {
                "role": "assistant",
                "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{}"}}],
            },
        ),
        "messages[1].tool_calls[0].id",
        "invalid_type",
    ),
    (
        _messages(
            USER,
            {"role": "assistant", "tool_calls": [{"id": "t", "type": "function", "function": {}}]},
        ),
        "messages[1].tool_calls[0].function.name",
        "invalid_type",
    ),
    (
        _messages(USER, {"role": "assistant", "content": None, "function_call": {"name": "f"}}),
        "messages[1].function_call",
        "unsupported_parameter",
    ),
    (
        _messages(USER, {"role": "assistant", "content": 3}),
        "messages[1].content",
        "invalid_type",
    ),
    (
        _messages(USER, _assistant_call("{}"), {"role": "tool", "content": "result"}),
        "messages[2].tool_call_id",
        "missing_required_parameter",
    ),
]


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [pytest.param(body, param, code, id=param + ":" + code) for body, param, code in ERROR_CASES],
)
def test_request_errors_name_the_field(body: dict[str, Any], param: str, code: str) -> None:
    with pytest.raises(TranslationError) as caught:
        to_anthropic_request(body, DEPLOYMENT)
    assert caught.value.param == param
    assert caught.value.code == code
    assert caught.value.message and str(caught.value) == caught.value.message


def test_request_check_catches_a_malformed_anthropic_body() -> None:
    """The SDK-type check used above does reject what Anthropic would refuse."""
    bad = {
        "model": DEPLOYMENT,
        "max_tokens": 10,
        "messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "file"}}]}],
    }
    with pytest.raises(pydantic.ValidationError):
        assert_valid_anthropic_request(bad)


# ---------------------------------------------------------------- JSON responses

TEXT_MESSAGE = {
    "id": "msg_01XFDUDYJgAACzvnptvVoYEL",
    "type": "message",
    "role": "assistant",
    "model": DEPLOYMENT,
    "content": [
        {"type": "text", "text": "Hello! "},
        {"type": "text", "text": "How can I help?"},
    ],
    "stop_reason": "end_turn",
    "stop_sequence": None,
    "usage": {
        "input_tokens": 12,
        "cache_creation_input_tokens": 100,
        "cache_read_input_tokens": 2048,
        "output_tokens": 9,
        "service_tier": "standard",
    },
}

TOOL_MESSAGE = {
    "id": "msg_01Aq9w938a90dw8q",
    "type": "message",
    "role": "assistant",
    "model": DEPLOYMENT,
    "content": [
        {"type": "text", "text": "I'll check the weather in both cities."},
        {
            "type": "tool_use",
            "id": "toolu_01A09q90qw90lq917835lq9",
            "name": "get_weather",
            "input": {"location": "San Francisco, CA", "unit": "celsius"},
        },
        {
            "type": "tool_use",
            "id": "toolu_01B",
            "name": "get_time",
            "input": {},
        },
    ],
    "stop_reason": "tool_use",
    "stop_sequence": None,
    "usage": {"input_tokens": 472, "output_tokens": 89},
}


def json_translation(message: dict[str, Any]) -> ChatCompletion:
    Message.model_validate(message)  # the fixture is a real Anthropic message
    out = MessagesToChatCompletion(created=CREATED).translate_json(orjson.dumps(message), 200)
    return ChatCompletion.model_validate(orjson.loads(out))


def test_json_text_response() -> None:
    completion = json_translation(TEXT_MESSAGE)
    assert completion.id == "msg_01XFDUDYJgAACzvnptvVoYEL"
    assert completion.object == "chat.completion"
    assert completion.created == CREATED
    assert completion.model == DEPLOYMENT
    (choice,) = completion.choices
    assert choice.index == 0
    assert choice.finish_reason == "stop"
    assert choice.message.role == "assistant"
    assert choice.message.content == "Hello! How can I help?"
    assert choice.message.tool_calls is None
    usage = completion.usage
    assert usage is not None
    assert usage.prompt_tokens == 12 + 100 + 2048
    assert usage.completion_tokens == 9
    assert usage.total_tokens == 12 + 100 + 2048 + 9
    assert usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens == 2048


def test_json_tool_use_response() -> None:
    completion = json_translation(TOOL_MESSAGE)
    (choice,) = completion.choices
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "I'll check the weather in both cities."
    calls = choice.message.tool_calls
    assert calls is not None
    assert [(c.id, c.type, c.function.name) for c in calls] == [
        ("toolu_01A09q90qw90lq917835lq9", "function", "get_weather"),
        ("toolu_01B", "function", "get_time"),
    ]
    assert orjson.loads(calls[0].function.arguments) == {
        "location": "San Francisco, CA",
        "unit": "celsius",
    }
    assert orjson.loads(calls[1].function.arguments) == {}
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (472, 89)
    assert completion.usage.prompt_tokens_details is not None
    assert completion.usage.prompt_tokens_details.cached_tokens == 0


def test_json_only_tool_use_has_null_content() -> None:
    message = {**TOOL_MESSAGE, "content": TOOL_MESSAGE["content"][1:]}
    assert json_translation(message).choices[0].message.content is None


@pytest.mark.parametrize(
    ("stop_reason", "finish_reason"),
    [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("pause_turn", "stop"),
        ("max_tokens", "length"),
        ("model_context_window_exceeded", "length"),
        ("tool_use", "tool_calls"),
        ("refusal", "content_filter"),
    ],
)
def test_finish_reasons(stop_reason: str, finish_reason: str) -> None:
    message = {**TEXT_MESSAGE, "stop_reason": stop_reason}
    out = MessagesToChatCompletion(created=CREATED).translate_json(orjson.dumps(message), 200)
    assert (
        ChatCompletion.model_validate(orjson.loads(out)).choices[0].finish_reason == finish_reason
    )


# -------------------------------------------------------------------------- errors

ERROR_RESPONSES = [
    (
        400,
        "invalid_request_error",
        "max_tokens: Field required",
        "invalid_request_error",
        "invalid_request_error",
    ),
    (401, "authentication_error", "invalid x-api-key", "authentication_error", "invalid_api_key"),
    (
        403,
        "permission_error",
        "Your API key does not have permission",
        "permission_error",
        "permission_denied",
    ),
    (404, "not_found_error", "model: claude-9", "not_found_error", "not_found"),
    (
        413,
        "request_too_large",
        "Request exceeds the maximum size",
        "invalid_request_error",
        "request_too_large",
    ),
    (
        429,
        "rate_limit_error",
        "Number of request tokens has exceeded your rate limit",
        "rate_limit_error",
        "rate_limit_exceeded",
    ),
    (500, "api_error", "Internal server error", "server_error", "api_error"),
    (529, "overloaded_error", "Overloaded", "server_error", "overloaded"),
    (418, "teapot_error", "I'm a teapot", "invalid_request_error", "teapot_error"),
]


@pytest.mark.parametrize(("status", "kind", "message", "openai_type", "code"), ERROR_RESPONSES)
def test_json_errors(status: int, kind: str, message: str, openai_type: str, code: str) -> None:
    body = orjson.dumps(
        {
            "type": "error",
            "error": {"type": kind, "message": message},
            "request_id": "req_011CSHoEeqs5C35K2UUqR7Fy",
        }
    )
    out = orjson.loads(MessagesToChatCompletion().translate_json(body, status))
    assert out == {"error": {"message": message, "type": openai_type, "code": code, "param": None}}


def test_non_json_error_keeps_the_text() -> None:
    body = b"upstream connect error or disconnect/reset before headers. reset reason: overflow"
    out = orjson.loads(MessagesToChatCompletion().translate_json(body, 503))
    assert out == {
        "error": {"message": body.decode(), "type": "server_error", "code": None, "param": None}
    }
    empty = orjson.loads(MessagesToChatCompletion().translate_json(b"", 502))
    assert empty["error"]["message"] == "The provider answered HTTP 502."


def test_success_status_with_unexpected_body() -> None:
    out = orjson.loads(MessagesToChatCompletion().translate_json(b'{"hello": 1}', 200))
    assert out["error"]["code"] == "untranslatable_response"
    error_body = b'{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}'
    out = orjson.loads(MessagesToChatCompletion().translate_json(error_body, 200))
    assert out["error"] == {
        "message": "Overloaded",
        "type": "server_error",
        "code": "overloaded",
        "param": None,
    }


# -------------------------------------------------------------------------- streams


def sse(*events: dict[str, Any]) -> bytes:
    """An Anthropic SSE body: each event named by its type, as Anthropic sends them."""
    return b"".join(
        b"event: " + e["type"].encode() + b"\ndata: " + orjson.dumps(e) + b"\n\n" for e in events
    )


def _text_delta(text: str, index: int = 0) -> dict[str, Any]:
    return {
        "type": "content_block_delta",
        "index": index,
        "delta": {"type": "text_delta", "text": text},
    }


def _json_delta(partial: str, index: int) -> dict[str, Any]:
    return {
        "type": "content_block_delta",
        "index": index,
        "delta": {"type": "input_json_delta", "partial_json": partial},
    }


# A text answer with prompt caching and multi-byte characters (cut mid-character below).
TEXT_STREAM = sse(
    {
        "type": "message_start",
        "message": {
            "id": "msg_01TextStream",
            "type": "message",
            "role": "assistant",
            "model": DEPLOYMENT,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {
                "input_tokens": 25,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 1024,
                "output_tokens": 1,
            },
        },
    },
    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    {"type": "ping"},
    _text_delta("Bonjour"),
    _text_delta(" ! Ça va ? "),
    _text_delta("☕ 🚀"),
    {"type": "content_block_stop", "index": 0},
    {
        "type": "message_delta",
        "delta": {"stop_reason": "end_turn", "stop_sequence": None},
        "usage": {"output_tokens": 15},
    },
    {"type": "message_stop"},
)

# Anthropic's documented tool-use stream (text, then two tool_use blocks).
TOOL_STREAM = sse(
    {
        "type": "message_start",
        "message": {
            "id": "msg_014p7gG3wDgGV9EUtLvnow3U",
            "type": "message",
            "role": "assistant",
            "model": DEPLOYMENT,
            "stop_sequence": None,
            "usage": {"input_tokens": 472, "output_tokens": 2},
            "content": [],
            "stop_reason": None,
        },
    },
    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    {"type": "ping"},
    _text_delta("Okay"),
    _text_delta(", let me check the weather for San Francisco, CA:"),
    {"type": "content_block_stop", "index": 0},
    {
        "type": "content_block_start",
        "index": 1,
        "content_block": {
            "type": "tool_use",
            "id": "toolu_01T1x1fJ34qAmk2tNTrN7Up6",
            "name": "get_weather",
            "input": {},
        },
    },
    _json_delta("", 1),
    _json_delta('{"location":', 1),
    _json_delta(' "San', 1),
    _json_delta(" Francisc", 1),
    _json_delta('o, CA"', 1),
    _json_delta(", ", 1),
    _json_delta('"unit": "fah', 1),
    _json_delta('renheit"}', 1),
    {"type": "content_block_stop", "index": 1},
    {
        "type": "content_block_start",
        "index": 2,
        "content_block": {"type": "tool_use", "id": "toolu_02", "name": "get_time", "input": {}},
    },
    _json_delta('{"tz": "America/Los_Angeles"}', 2),
    {"type": "content_block_stop", "index": 2},
    {
        "type": "message_delta",
        "delta": {"stop_reason": "tool_use", "stop_sequence": None},
        "usage": {"output_tokens": 89},
    },
    {"type": "message_stop"},
)


def translate_stream(body: bytes, cuts: list[int], *, include_usage: bool = True) -> bytes:
    translator = MessagesToChatCompletion(include_usage=include_usage, created=CREATED)
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


def test_text_stream() -> None:
    chunks = chunks_of(assert_split_invariant(TEXT_STREAM))
    assert all(c.id == "msg_01TextStream" and c.model == DEPLOYMENT for c in chunks)
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
    assert usage_chunk.usage.prompt_tokens == 25 + 1024
    assert usage_chunk.usage.completion_tokens == 15
    assert usage_chunk.usage.total_tokens == 25 + 1024 + 15
    assert usage_chunk.usage.prompt_tokens_details is not None
    assert usage_chunk.usage.prompt_tokens_details.cached_tokens == 1024


def test_stream_without_include_usage_has_no_usage_chunk() -> None:
    output = assert_split_invariant(TEXT_STREAM, include_usage=False)
    chunks = chunks_of(output)
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.choices for c in chunks)
    assert b'"usage"' not in output  # OpenAI sends no usage field unless asked


def test_tool_stream_accumulates_like_openai() -> None:
    chunks = chunks_of(assert_split_invariant(TOOL_STREAM))
    tool_chunks = [c for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    starts = [
        c.choices[0].delta.tool_calls[0] for c in tool_chunks if c.choices[0].delta.tool_calls[0].id
    ]
    assert [(s.index, s.id, s.type, s.function.name) for s in starts] == [
        (0, "toolu_01T1x1fJ34qAmk2tNTrN7Up6", "function", "get_weather"),
        (1, "toolu_02", "function", "get_time"),
    ]
    # The OpenAI SDK's own accumulator rebuilds the whole message from the chunks.
    state = ChatCompletionStreamState()
    for chunk in chunks:
        state.handle_chunk(chunk)
    completion = state.get_final_completion()
    (choice,) = completion.choices
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Okay, let me check the weather for San Francisco, CA:"
    calls = choice.message.tool_calls
    assert calls is not None
    assert [(c.id, c.function.name) for c in calls] == [
        ("toolu_01T1x1fJ34qAmk2tNTrN7Up6", "get_weather"),
        ("toolu_02", "get_time"),
    ]
    assert orjson.loads(calls[0].function.arguments) == {
        "location": "San Francisco, CA",
        "unit": "fahrenheit",
    }
    assert orjson.loads(calls[1].function.arguments) == {"tz": "America/Los_Angeles"}
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (472, 89)


def test_stream_never_holds_back_a_complete_event() -> None:
    """Each Anthropic event's translation is returned by the feed that completes it."""
    translator = MessagesToChatCompletion(include_usage=True, created=CREATED)
    events = [e + b"\n\n" for e in TEXT_STREAM.split(b"\n\n") if e]
    outputs = [translator.feed(event) for event in events]
    kinds = [orjson.loads(e.split(b"data: ", 1)[1])["type"] for e in events]
    produced = {kind: len(data_lines(out)) for kind, out in zip(kinds, outputs, strict=True) if out}
    assert produced == {
        "message_start": 1,
        "content_block_delta": 1,
        "message_delta": 1,
        "message_stop": 2,  # the usage chunk and [DONE]
    }
    assert all(out == b"" for kind, out in zip(kinds, outputs, strict=True) if kind not in produced)
    assert translator.finish() == b""


def test_stream_error_event() -> None:
    body = sse(
        {
            "type": "message_start",
            "message": {
                "id": "msg_01Err",
                "type": "message",
                "role": "assistant",
                "model": DEPLOYMENT,
                "content": [],
                "stop_reason": None,
                "stop_sequence": None,
                "usage": {"input_tokens": 10, "output_tokens": 1},
            },
        },
        _text_delta("Partial"),
        {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
    )
    lines = data_lines(assert_split_invariant(body))
    assert b"[DONE]" not in lines  # the app must see the stream failed
    ChatCompletionChunk.model_validate(orjson.loads(lines[0]))
    ChatCompletionChunk.model_validate(orjson.loads(lines[1]))
    assert orjson.loads(lines[2]) == {
        "error": {
            "message": "Overloaded",
            "type": "server_error",
            "code": "overloaded",
            "param": None,
        }
    }
    assert len(lines) == 3


def test_cut_stream_gets_no_done() -> None:
    cut = TOOL_STREAM[: TOOL_STREAM.index(b"event: message_delta")]
    lines = data_lines(translate_stream(cut, []))
    assert b"[DONE]" not in lines
    chunks = [ChatCompletionChunk.model_validate(orjson.loads(line)) for line in lines]
    assert all(c.choices[0].finish_reason is None for c in chunks)


def test_final_event_without_blank_line_is_translated_at_finish() -> None:
    body = TEXT_STREAM[: -len(b"\n")]  # the server closed right after message_stop's data line
    translator = MessagesToChatCompletion(created=CREATED)
    head = translator.feed(body)
    assert b"[DONE]" not in head
    assert translator.finish() == b"data: [DONE]\n\n"


def test_stream_skips_malformed_events() -> None:
    body = b"event: content_block_delta\ndata: {not json\n\n" + TEXT_STREAM
    translator = MessagesToChatCompletion(created=CREATED)
    output = translator.feed(body) + translator.finish()
    assert translator.skipped == 1
    assert len(chunks_of(output)) == 5

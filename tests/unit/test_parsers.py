"""Provider response parsers: exact usage, delivered text, completeness, never raising.

Payloads are written in the shape the providers' API references and recorded traffic
show (ids shortened). Every stream is also fed in random chunk splits (fixed seeds):
the summary must not depend on where Envoy cut the body.
"""

from __future__ import annotations

import random

import orjson
import pytest

from ext_proc.tokens.parsers import FORMATS, new_stream_parser, parse_json
from ext_proc.tokens.types import ResponseSummary, Usage

SEEDS = range(25)


def sse(*events: dict[str, object] | str, named: bool = False, crlf: bool = False) -> bytes:
    """An SSE body: dicts as JSON data (named by their "type" when ``named``), str as is."""
    out = []
    for event in events:
        data = event if isinstance(event, str) else orjson.dumps(event).decode()
        head = ""
        if named and isinstance(event, dict):
            head = f"event: {event['type']}\n"
        out.append(f"{head}data: {data}\n\n")
    body = "".join(out)
    if crlf:
        body = body.replace("\n", "\r\n")
    return body.encode()


def stream(fmt: str, body: bytes, seed: int | None = None) -> ResponseSummary:
    parser = new_stream_parser(fmt)
    if seed is None:
        parser.feed(body)
    else:
        rng = random.Random(seed)
        pos = 0
        while pos < len(body):
            step = rng.randint(1, 64)
            parser.feed(body[pos : pos + step])
            pos += step
    return parser.finish()


def stream_all_splits(fmt: str, body: bytes) -> ResponseSummary:
    """The whole-body summary, after checking every random split gives the same one."""
    whole = stream(fmt, body)
    for seed in SEEDS:
        assert stream(fmt, body, seed) == whole, seed
    return whole


# ---------------------------------------------------------------- OpenAI / Azure OpenAI

OPENAI_CHAT_JSON = b"""{
  "id": "chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT",
  "object": "chat.completion",
  "created": 1741569952,
  "model": "gpt-4.1-2025-04-14",
  "choices": [{"index": 0, "message": {"role": "assistant",
    "content": "Hello! How can I assist you today?", "refusal": null, "annotations": []},
    "logprobs": null, "finish_reason": "stop"}],
  "usage": {"prompt_tokens": 1117, "completion_tokens": 46, "total_tokens": 1163,
    "prompt_tokens_details": {"cached_tokens": 1024, "audio_tokens": 0},
    "completion_tokens_details": {"reasoning_tokens": 12, "audio_tokens": 0,
      "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}},
  "service_tier": "default",
  "system_fingerprint": "fp_a1102cf978"
}"""

OPENAI_EMBEDDINGS_JSON = b"""{"object": "list", "data": [{"object": "embedding", "index": 0,
  "embedding": [0.0023064255, -0.009327292, -0.0028842222]}],
  "model": "text-embedding-3-small", "usage": {"prompt_tokens": 8, "total_tokens": 8}}"""

OPENAI_TOOL_JSON_NO_USAGE = b"""{"id": "chatcmpl-x", "object": "chat.completion",
  "model": "llama-3.1-8b-instruct",
  "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {"role": "assistant",
    "content": null, "tool_calls": [{"id": "call_1", "type": "function",
    "function": {"name": "get_weather", "arguments": "{\\"city\\":\\"Paris\\"}"}}]}}]}"""


def _chunk(delta: dict[str, object], finish: str | None = None, **extra: object) -> dict:
    return {
        "id": "chatcmpl-Aa1",
        "object": "chat.completion.chunk",
        "created": 1741569952,
        "model": "gpt-4o-mini-2024-07-18",
        "system_fingerprint": "fp_06737a9306",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        **extra,
    }


OPENAI_USAGE = {
    "prompt_tokens": 19,
    "completion_tokens": 3,
    "total_tokens": 22,
    "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
    "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
}

OPENAI_STREAM_WITH_USAGE = sse(
    _chunk({"role": "assistant", "content": "", "refusal": None}, usage=None),
    _chunk({"content": "Hello"}, usage=None),
    _chunk({"content": " there"}, usage=None),
    _chunk({"content": "!"}, usage=None),
    _chunk({}, "stop", usage=None),
    {
        "id": "chatcmpl-Aa1",
        "object": "chat.completion.chunk",
        "created": 1741569952,
        "model": "gpt-4o-mini-2024-07-18",
        "choices": [],
        "usage": OPENAI_USAGE,
    },
    "[DONE]",
)

# Azure: a first chunk with no choices, model "" and prompt filter results.
AZURE_STREAM_NO_USAGE = sse(
    {
        "choices": [],
        "created": 0,
        "id": "",
        "model": "",
        "object": "",
        "prompt_filter_results": [
            {"prompt_index": 0, "content_filter_results": {"hate": {"filtered": False}}}
        ],
    },
    _chunk({"role": "assistant", "content": ""}),
    _chunk({"content": "Bonjour"}),
    _chunk({"content": " ☀️"}),
    _chunk({}, "stop"),
    "[DONE]",
)

OPENAI_TOOL_STREAM = sse(
    _chunk(
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "index": 0,
                    "id": "call_DdmO9pD3xa9XTPNJ32zg2hcA",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": ""},
                }
            ],
            "refusal": None,
        }
    ),
    _chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"'}}]}),
    _chunk({"tool_calls": [{"index": 0, "function": {"arguments": 'city":"'}}]}),
    _chunk({"tool_calls": [{"index": 0, "function": {"arguments": 'Paris"}'}}]}),
    _chunk({}, "tool_calls"),
    "[DONE]",
)

OPENAI_REASONING_REFUSAL_STREAM = sse(
    _chunk({"role": "assistant", "reasoning_content": "Thinking it over."}),
    _chunk({"refusal": "I can't help with that."}),
    _chunk({}, "stop"),
    "[DONE]",
)

LEGACY_COMPLETIONS_STREAM = sse(
    *(
        {
            "id": "cmpl-1",
            "object": "text_completion",
            "created": 1,
            "model": "gpt-3.5-turbo-instruct",
            "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": reason}],
        }
        for text, reason in ((" Once", None), (" upon", None), (" a time", "length"))
    ),
    "[DONE]",
)


def test_openai_chat_json_usage_exact() -> None:
    summary = parse_json("openai", OPENAI_CHAT_JSON)
    assert summary.usage == Usage(
        prompt_tokens=1117,
        completion_tokens=46,
        total_tokens=1163,
        cached_tokens=1024,
        reasoning_tokens=12,
    )
    assert summary.response_model == "gpt-4.1-2025-04-14"
    assert summary.finish_reason == "stop"
    assert summary.complete is True
    assert summary.delivered_text == []  # usage was reported: nothing to count


def test_openai_embeddings_json_has_zero_completion() -> None:
    summary = parse_json("openai", OPENAI_EMBEDDINGS_JSON)
    assert summary.usage == Usage(prompt_tokens=8, completion_tokens=0, total_tokens=8)
    assert summary.response_model == "text-embedding-3-small"
    assert summary.complete is True


def test_openai_json_without_usage_delivers_message_text() -> None:
    summary = parse_json("openai", OPENAI_TOOL_JSON_NO_USAGE)
    assert summary.usage is None
    assert summary.delivered_text == ["get_weather", '{"city":"Paris"}']
    assert summary.finish_reason == "tool_calls"
    assert summary.complete is True


def test_openai_legacy_completions_json_without_usage() -> None:
    body = b'{"object":"text_completion","model":"m","choices":[{"text":" hi","index":0}]}'
    assert parse_json("openai", body).delivered_text == [" hi"]


def test_openai_json_error_body_is_incomplete() -> None:
    body = b'{"error": {"message": "Rate limit", "type": "requests", "code": "429"}}'
    summary = parse_json("openai", body)
    assert summary.usage is None
    assert summary.complete is False


def test_openai_stream_usage_from_final_chunk() -> None:
    summary = stream_all_splits("openai", OPENAI_STREAM_WITH_USAGE)
    assert summary.usage == Usage(
        prompt_tokens=19,
        completion_tokens=3,
        total_tokens=22,
        cached_tokens=0,
        reasoning_tokens=0,
    )
    assert summary.delivered_text == ["Hello", " there", "!"]
    assert summary.response_model == "gpt-4o-mini-2024-07-18"
    assert summary.finish_reason == "stop"
    assert summary.complete is True
    assert summary.events == 7


def test_azure_stream_without_usage_counts_text() -> None:
    summary = stream_all_splits("openai", AZURE_STREAM_NO_USAGE)
    assert summary.usage is None
    assert summary.delivered_text == ["Bonjour", " ☀️"]
    assert summary.response_model == "gpt-4o-mini-2024-07-18"  # not Azure's first ""
    assert summary.complete is True


def test_openai_tool_call_stream_delivers_name_and_arguments() -> None:
    summary = stream_all_splits("openai", OPENAI_TOOL_STREAM)
    assert summary.usage is None
    assert "".join(summary.delivered_text) == 'get_weather{"city":"Paris"}'
    assert summary.delivered_text[0] == "get_weather"
    assert summary.finish_reason == "tool_calls"


def test_openai_reasoning_and_refusal_are_delivered_text() -> None:
    summary = stream_all_splits("openai", OPENAI_REASONING_REFUSAL_STREAM)
    assert summary.delivered_text == ["Thinking it over.", "I can't help with that."]


def test_openai_legacy_completions_stream() -> None:
    summary = stream_all_splits("openai", LEGACY_COMPLETIONS_STREAM)
    assert summary.delivered_text == [" Once", " upon", " a time"]
    assert summary.finish_reason == "length"
    assert summary.complete is True


def test_openai_truncated_stream_is_incomplete_with_what_was_delivered() -> None:
    cut = OPENAI_STREAM_WITH_USAGE.index(b'{"content":"!"}')
    body = OPENAI_STREAM_WITH_USAGE[:cut]  # cut inside the "!" chunk
    summary = stream_all_splits("openai", body)
    assert summary.usage is None
    assert summary.complete is False
    assert summary.delivered_text == ["Hello", " there"]


def test_openai_stream_error_event_is_incomplete() -> None:
    body = sse(
        _chunk({"content": "Hel"}),
        {"error": {"message": "The server had an error", "type": "server_error"}},
        "[DONE]",
    )
    summary = stream_all_splits("openai", body)
    assert summary.complete is False
    assert summary.delivered_text == ["Hel"]


def test_openai_stream_with_multiple_choices() -> None:
    body = sse(
        {"model": "gpt-4o", "choices": [{"index": 0, "delta": {"content": "a"}}]},
        {"model": "gpt-4o", "choices": [{"index": 1, "delta": {"content": "b"}}]},
        "[DONE]",
    )
    assert stream_all_splits("openai", body).delivered_text == ["a", "b"]


# ---------------------------------------------------------------------------- Anthropic

ANTHROPIC_JSON = b"""{"id": "msg_013Zva2CMHLNnXjNJJKqJ2EF", "type": "message", "role": "assistant",
  "model": "claude-sonnet-4-5-20250929",
  "content": [{"type": "text", "text": "Hi! My name is Claude."}],
  "stop_reason": "end_turn", "stop_sequence": null,
  "usage": {"input_tokens": 2095, "output_tokens": 503,
    "cache_creation_input_tokens": 300, "cache_read_input_tokens": 1800,
    "service_tier": "standard"}}"""


def _anthropic_stream(*middle: dict[str, object], stop: bool = True) -> bytes:
    start = {
        "type": "message_start",
        "message": {
            "id": "msg_1nZdL29xx5MUA1yADyHTEsnR8uuvGzszyY",
            "type": "message",
            "role": "assistant",
            "content": [],
            "model": "claude-sonnet-4-5-20250929",
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {
                "input_tokens": 25,
                "cache_creation_input_tokens": 100,
                "cache_read_input_tokens": 2000,
                "output_tokens": 1,
            },
        },
    }
    events: list[dict[str, object]] = [start, *middle]
    if stop:
        events.append({"type": "message_stop"})
    return sse(*events, named=True)


def _text_delta(text: str) -> dict[str, object]:
    return {
        "type": "content_block_delta",
        "index": 0,
        "delta": {"type": "text_delta", "text": text},
    }


ANTHROPIC_TEXT_EVENTS: tuple[dict[str, object], ...] = (
    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    {"type": "ping"},
    _text_delta("Hello"),
    _text_delta("!"),
    {"type": "content_block_stop", "index": 0},
)


def test_anthropic_json_usage_includes_cache_in_prompt() -> None:
    summary = parse_json("anthropic", ANTHROPIC_JSON)
    assert summary.usage == Usage(
        prompt_tokens=2095 + 1800 + 300,
        completion_tokens=503,
        total_tokens=2095 + 1800 + 300 + 503,
        cached_tokens=1800,
        cache_creation_tokens=300,
    )
    assert summary.response_model == "claude-sonnet-4-5-20250929"
    assert summary.finish_reason == "end_turn"
    assert summary.complete is True
    assert summary.delivered_text == []


def test_anthropic_json_without_usage_delivers_blocks() -> None:
    body = orjson.dumps(
        {
            "type": "message",
            "content": [
                {"type": "thinking", "thinking": "Let me check.", "signature": "EqQB"},
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"c": 1}},
            ],
        }
    )
    summary = parse_json("anthropic", body)
    assert summary.usage is None
    assert summary.delivered_text == ["Let me check.", "Checking.", "get_weather", '{"c":1}']


def test_anthropic_json_error_is_incomplete() -> None:
    body = b'{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}'
    summary = parse_json("anthropic", body)
    assert summary.usage is None
    assert summary.complete is False


def test_anthropic_stream_takes_last_values_never_sums() -> None:
    body = _anthropic_stream(
        *ANTHROPIC_TEXT_EVENTS,
        {
            "type": "message_delta",
            "delta": {"stop_reason": None},
            "usage": {"output_tokens": 10},
        },
        {
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn", "stop_sequence": None},
            # Newer API versions repeat the (cumulative) input counts here.
            "usage": {
                "input_tokens": 25,
                "cache_creation_input_tokens": 100,
                "cache_read_input_tokens": 2000,
                "output_tokens": 15,
            },
        },
    )
    summary = stream_all_splits("anthropic", body)
    assert summary.usage == Usage(
        prompt_tokens=2125,
        completion_tokens=15,  # not 1 + 10 + 15
        total_tokens=2140,
        cached_tokens=2000,
        cache_creation_tokens=100,
    )
    assert summary.delivered_text == ["Hello", "!"]
    assert summary.finish_reason == "end_turn"
    assert summary.response_model == "claude-sonnet-4-5-20250929"
    assert summary.complete is True
    assert summary.events == 9


def test_anthropic_stream_tool_use_and_thinking() -> None:
    body = _anthropic_stream(
        {
            "type": "content_block_start",
            "index": 0,
            "content_block": {"type": "thinking", "thinking": ""},
        },
        {
            "type": "content_block_delta",
            "index": 0,
            "delta": {"type": "thinking_delta", "thinking": "User wants weather."},
        },
        {
            "type": "content_block_delta",
            "index": 0,
            "delta": {"type": "signature_delta", "signature": "EqQBCgIYAhIM1gbcDa9GJwZA2b3h"},
        },
        {
            "type": "content_block_start",
            "index": 1,
            "content_block": {
                "type": "tool_use",
                "id": "toolu_01",
                "name": "get_weather",
                "input": {},
            },
        },
        {
            "type": "content_block_delta",
            "index": 1,
            "delta": {"type": "input_json_delta", "partial_json": ""},
        },
        {
            "type": "content_block_delta",
            "index": 1,
            "delta": {"type": "input_json_delta", "partial_json": '{"location": "San Fra'},
        },
        {
            "type": "content_block_delta",
            "index": 1,
            "delta": {"type": "input_json_delta", "partial_json": 'ncisco, CA"}'},
        },
        {
            "type": "message_delta",
            "delta": {"stop_reason": "tool_use"},
            "usage": {"output_tokens": 89},
        },
    )
    summary = stream_all_splits("anthropic", body)
    assert summary.delivered_text == [
        "User wants weather.",
        "get_weather",
        '{"location": "San Fra',
        'ncisco, CA"}',
    ]
    assert summary.usage is not None
    assert summary.usage.completion_tokens == 89
    assert summary.finish_reason == "tool_use"


def test_anthropic_truncated_stream_keeps_start_usage_and_text() -> None:
    body = _anthropic_stream(*ANTHROPIC_TEXT_EVENTS[:3], stop=False)
    summary = stream_all_splits("anthropic", body + b"event: content_block_delta\ndata: {")
    assert summary.complete is False
    assert summary.delivered_text == ["Hello"]
    assert summary.usage is not None
    assert summary.usage.prompt_tokens == 2125
    # message_start's output_tokens (1) is a placeholder, never final: the caller counts
    # the delivered text instead.
    assert summary.usage.completion_tokens is None
    assert summary.usage.total_tokens is None


def test_anthropic_error_event_is_incomplete() -> None:
    body = _anthropic_stream(
        _text_delta("Hi"),
        {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
    )
    summary = stream_all_splits("anthropic", body)
    assert summary.complete is False
    assert summary.delivered_text == ["Hi"]


# ------------------------------------------------------------------------------- Cohere

COHERE_V2_JSON = b"""{"id": "c14c80c3-18eb-4519-9460-6c92edd8cfb4", "finish_reason": "COMPLETE",
  "message": {"role": "assistant", "content": [{"type": "text",
    "text": "LLMs stand for Large Language Models."}]},
  "usage": {"billed_units": {"input_tokens": 5, "output_tokens": 418},
    "tokens": {"input_tokens": 71, "output_tokens": 418}}}"""

COHERE_V1_JSON = b"""{"response_id": "5b8a1b3c", "text": "Hello there!",
  "generation_id": "2c3d", "chat_history": [], "finish_reason": "COMPLETE",
  "meta": {"api_version": {"version": "1"},
    "billed_units": {"input_tokens": 3, "output_tokens": 9}}}"""

COHERE_V2_STREAM = sse(
    {
        "id": "29f14a5a-11de-4cae-9800-25e4747408ea",
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
    },
    {
        "type": "content-start",
        "index": 0,
        "delta": {"message": {"content": {"type": "text", "text": ""}}},
    },
    {"type": "content-delta", "index": 0, "delta": {"message": {"content": {"text": "Hello"}}}},
    {"type": "content-delta", "index": 0, "delta": {"message": {"content": {"text": " world"}}}},
    {"type": "content-end", "index": 0},
    {
        "type": "message-end",
        "delta": {
            "finish_reason": "COMPLETE",
            "usage": {
                "billed_units": {"input_tokens": 3, "output_tokens": 2},
                "tokens": {"input_tokens": 69, "output_tokens": 2},
            },
        },
    },
    named=True,
)


def test_cohere_v2_json_counts_billed_units_first() -> None:
    # billed_units is what Cohere charges (tokens adds its own template): the row's counts
    # feed cost, budgets and token limits.
    summary = parse_json("cohere", COHERE_V2_JSON)
    assert summary.usage == Usage(prompt_tokens=5, completion_tokens=418, total_tokens=423)
    assert summary.finish_reason == "COMPLETE"
    assert summary.complete is True
    assert summary.delivered_text == []


def test_cohere_v1_json_falls_back_to_billed_units() -> None:
    summary = parse_json("cohere", COHERE_V1_JSON)
    assert summary.usage == Usage(prompt_tokens=3, completion_tokens=9, total_tokens=12)


def test_cohere_json_without_usage_delivers_text() -> None:
    body = b'{"id":"x","message":{"role":"assistant","tool_plan":"I will look.",'
    body += b'"content":[{"type":"text","text":"Sunny."}],"tool_calls":[{"id":"t",'
    body += b'"type":"function","function":{"name":"w","arguments":"{}"}}]}}'
    summary = parse_json("cohere", body)
    assert summary.usage is None
    assert summary.delivered_text == ["I will look.", "Sunny.", "w", "{}"]


def test_cohere_error_body_is_incomplete() -> None:
    summary = parse_json("cohere", b'{"id":"e","message":"invalid request: model is required"}')
    assert summary.complete is False
    assert summary.usage is None


def test_cohere_v2_stream() -> None:
    summary = stream_all_splits("cohere", COHERE_V2_STREAM)
    assert summary.usage == Usage(prompt_tokens=3, completion_tokens=2, total_tokens=5)
    assert summary.delivered_text == ["Hello", " world"]
    assert summary.finish_reason == "COMPLETE"
    assert summary.complete is True


def test_cohere_v2_stream_tool_calls() -> None:
    body = sse(
        {"type": "tool-plan-delta", "delta": {"message": {"tool_plan": "I will check"}}},
        {
            "type": "tool-call-start",
            "index": 0,
            "delta": {
                "message": {
                    "tool_calls": {
                        "id": "get_weather_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": ""},
                    }
                }
            },
        },
        {
            "type": "tool-call-delta",
            "index": 0,
            "delta": {"message": {"tool_calls": {"function": {"arguments": '{"city":"Oslo"}'}}}},
        },
        {"type": "tool-call-end", "index": 0},
        {"type": "message-end", "delta": {"finish_reason": "TOOL_CALL"}},
        named=True,
    )
    summary = stream_all_splits("cohere", body)
    assert summary.usage is None
    assert summary.delivered_text == ["I will check", "get_weather", '{"city":"Oslo"}']
    assert summary.complete is True


def test_cohere_truncated_stream() -> None:
    cut = COHERE_V2_STREAM.index(b"event: content-end")
    summary = stream_all_splits("cohere", COHERE_V2_STREAM[:cut])
    assert summary.complete is False
    assert summary.usage is None
    assert summary.delivered_text == ["Hello", " world"]


# ------------------------------------------------------------------------- Google Gemini

GEMINI_JSON = b"""{"candidates": [{"content": {"parts": [{"text": "AI learns patterns."}],
    "role": "model"}, "finishReason": "STOP", "avgLogprobs": -0.12}],
  "usageMetadata": {"promptTokenCount": 8, "candidatesTokenCount": 120,
    "totalTokenCount": 428, "thoughtsTokenCount": 300, "cachedContentTokenCount": 4,
    "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 8}]},
  "modelVersion": "gemini-2.5-flash", "responseId": "7PnEaNHnNrmZ7dcP"}"""


def _gemini_chunk(text: str, usage: dict[str, int], finish: str | None = None) -> dict:
    candidate: dict[str, object] = {"content": {"parts": [{"text": text}], "role": "model"}}
    if finish:
        candidate["finishReason"] = finish
    candidate["index"] = 0
    return {"candidates": [candidate], "usageMetadata": usage, "modelVersion": "gemini-2.0-flash"}


GEMINI_STREAM = sse(
    _gemini_chunk("The", {"promptTokenCount": 9, "totalTokenCount": 9}),
    _gemini_chunk(" sky is", {"promptTokenCount": 9, "totalTokenCount": 9}),
    _gemini_chunk(
        " blue.",
        {"promptTokenCount": 9, "candidatesTokenCount": 5, "totalTokenCount": 14},
        "STOP",
    ),
    crlf=True,  # Gemini ends SSE lines with CRLF
)


def test_gemini_json_completion_includes_thoughts() -> None:
    summary = parse_json("google", GEMINI_JSON)
    assert summary.usage == Usage(
        prompt_tokens=8,
        completion_tokens=420,
        total_tokens=428,
        cached_tokens=4,
        reasoning_tokens=300,
    )
    assert summary.response_model == "gemini-2.5-flash"
    assert summary.finish_reason == "STOP"
    assert summary.complete is True
    assert summary.delivered_text == []


def test_gemini_json_without_usage_delivers_parts() -> None:
    body = orjson.dumps(
        {
            "candidates": [
                {
                    "content": {
                        "parts": [
                            {"text": "Let me look.", "thought": True},
                            {"functionCall": {"name": "find", "args": {"q": "x"}}},
                        ]
                    },
                    "finishReason": "STOP",
                }
            ]
        }
    )
    summary = parse_json("google", body)
    assert summary.usage is None
    assert summary.delivered_text == ["Let me look.", "find", '{"q":"x"}']


def test_gemini_stream_takes_last_cumulative_usage() -> None:
    summary = stream_all_splits("google", GEMINI_STREAM)
    assert summary.usage == Usage(prompt_tokens=9, completion_tokens=5, total_tokens=14)
    assert summary.delivered_text == ["The", " sky is", " blue."]
    assert summary.response_model == "gemini-2.0-flash"
    assert summary.finish_reason == "STOP"
    assert summary.complete is True
    assert summary.events == 3


def test_gemini_truncated_stream_has_partial_usage_and_is_incomplete() -> None:
    cut = GEMINI_STREAM.index(b" blue.")
    summary = stream_all_splits("google", GEMINI_STREAM[:cut])
    assert summary.complete is False
    assert summary.delivered_text == ["The", " sky is"]
    # Before its last chunk Gemini reports a running count (the prompt only): never a
    # final "0 completion tokens"; the caller counts the delivered text.
    assert summary.usage == Usage(prompt_tokens=9)


def test_gemini_json_array_stream_without_alt_sse() -> None:
    chunks = [
        _gemini_chunk("Hi", {"promptTokenCount": 4, "totalTokenCount": 4}),
        _gemini_chunk(
            " you", {"promptTokenCount": 4, "candidatesTokenCount": 2, "totalTokenCount": 6}, "STOP"
        ),
    ]
    body = b"[" + b",\r\n".join(orjson.dumps(c) for c in chunks) + b"]"
    for summary in (stream_all_splits("google", b"\n" + body), parse_json("google", body)):
        assert summary.usage == Usage(prompt_tokens=4, completion_tokens=2, total_tokens=6)
        assert summary.complete is True
    assert stream_all_splits("google", body).delivered_text == ["Hi", " you"]


def test_gemini_error_is_incomplete() -> None:
    body = b'{"error": {"code": 429, "message": "Resource exhausted", "status": "UNAVAILABLE"}}'
    assert parse_json("google", body).complete is False
    assert stream_all_splits("google", sse(orjson.loads(body))).complete is False


# ------------------------------------------------------------------------ every format

JUNK_BODIES = [
    b"",
    b"not json",
    b'{"usage": ',
    b"[1, 2",
    b"null",
    b"42",
    b'"text"',
    b"\xff\xfe\x00garbage",
    b'{"usage": "lots", "choices": "none", "content": 7, "candidates": {}, "message": 3}',
    b'{"usage": {"prompt_tokens": "12", "completion_tokens": true, "input_tokens": [1]},'
    b' "usageMetadata": {"promptTokenCount": "9"}, "meta": []}',
    b'{"choices": [null, 1, {"message": "x", "delta": 5}], "candidates": [null, {"content": 1}]}',
]


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("body", JUNK_BODIES)
def test_malformed_json_never_raises(fmt: str, body: bytes) -> None:
    summary = parse_json(fmt, body)
    assert summary.usage is None
    if not body.startswith(b"{"):
        assert summary.complete is False


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_junk_stream_never_raises(fmt: str) -> None:
    body = (
        b"data: {not json\n\n"
        b"data: [1,2]\n\n"
        b'data: {"choices": [null, {"delta": 3}], "usage": 5, "type": "message_delta",'
        b' "delta": [], "usageMetadata": "x", "candidates": [{"content": {"parts": [1]}}]}\n\n'
        b'event: message_start\ndata: {"type": "message_start", "message": 1}\n\n'
        b'data: {"type": "content-delta", "delta": {"message": {"content": 5}}}\n\n'
        b"\xff\xfe garbage\n\n"
        b"data: {"
    )
    summary = stream(fmt, body, seed=1)
    assert summary.usage is None
    assert summary.complete is False
    assert summary.delivered_text == []
    assert summary.events == 5


def test_unknown_format_names_the_known_ones() -> None:
    with pytest.raises(KeyError, match="anthropic, cohere, google, openai"):
        parse_json("bedrock", b"{}")
    with pytest.raises(KeyError, match="unknown response format 'bedrock'"):
        new_stream_parser("bedrock")


def test_finish_on_cancel_before_any_byte() -> None:
    for fmt in FORMATS:
        summary = new_stream_parser(fmt).finish()
        assert summary == ResponseSummary(usage=None, complete=False, events=0)

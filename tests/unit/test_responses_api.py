"""OpenAI's Responses API: the usage format (JSON and typed SSE events, split anywhere),
the prompt estimate, and the endpoint classification. Shapes are OpenAI's documented
ones (and the openai SDK's types: a round trip through them)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from openai.types.responses import Response

from ext_proc.routing.endpoints import Operation, classify
from ext_proc.tokens import estimator
from ext_proc.tokens.parsers import FORMATS, parse_json
from tests.unit.test_parsers import stream_all_splits

FMT = "openai_responses"

USAGE = {
    "input_tokens": 328,
    "input_tokens_details": {"cached_tokens": 256, "cache_write_tokens": 0},
    "output_tokens": 52,
    "output_tokens_details": {"reasoning_tokens": 20},
    "total_tokens": 380,
}


def response(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": "resp_67ccd2bed1ec8190b14f964abc0542670bb6a6b452d3795b",
        "object": "response",
        "created_at": 1741476542,
        "status": "completed",
        "error": None,
        "incomplete_details": None,
        "instructions": None,
        "max_output_tokens": None,
        "model": "gpt-4.1-2025-04-14",
        "output": [
            {
                "type": "reasoning",
                "id": "rs_1",
                "summary": [{"type": "summary_text", "text": "Thinking briefly."}],
            },
            {
                "type": "message",
                "id": "msg_1",
                "status": "completed",
                "role": "assistant",
                "content": [
                    {"type": "output_text", "text": "In a peaceful grove.", "annotations": []}
                ],
            },
            {
                "type": "function_call",
                "id": "fc_1",
                "call_id": "call_1",
                "name": "get_weather",
                "arguments": '{"city":"Paris"}',
                "status": "completed",
            },
        ],
        "parallel_tool_calls": True,
        "previous_response_id": None,
        "reasoning": {"effort": None, "summary": None},
        "store": True,
        "temperature": 1.0,
        "text": {"format": {"type": "text"}},
        "tool_choice": "auto",
        "tools": [],
        "top_p": 1.0,
        "truncation": "disabled",
        "usage": USAGE,
        "user": None,
        "metadata": {},
    }
    body.update(overrides)
    return body


def test_the_fixture_is_what_the_sdk_reads() -> None:
    Response.model_validate(response())  # the openai SDK's own type accepts it


def test_json_usage_is_exact_with_details() -> None:
    summary = parse_json(FMT, orjson.dumps(response()))
    assert summary.usage is not None
    usage = summary.usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (328, 52, 380)
    assert (usage.cached_tokens, usage.reasoning_tokens) == (256, 20)
    assert usage.cache_creation_tokens is None  # 0 written: none
    assert summary.complete and summary.response_model == "gpt-4.1-2025-04-14"
    assert summary.delivered_text == []  # usage reported: nothing to count


def test_json_without_usage_counts_every_output_item() -> None:
    summary = parse_json(FMT, orjson.dumps(response(usage=None)))
    assert summary.usage is None
    assert summary.delivered_text == [
        "Thinking briefly.",
        "In a peaceful grove.",
        "get_weather",
        '{"city":"Paris"}',
    ]


def test_background_and_failed_responses() -> None:
    queued = parse_json(FMT, orjson.dumps(response(status="queued", output=[], usage=None)))
    assert queued.usage is None and queued.delivered_text == []  # usage comes later
    failed = parse_json(
        FMT, orjson.dumps(response(status="failed", error={"code": "server_error"}))
    )
    assert failed.complete is False


def _sse(*events: dict[str, Any]) -> bytes:
    return b"".join(
        b"event: " + e["type"].encode() + b"\ndata: " + orjson.dumps(e) + b"\n\n" for e in events
    )


STREAM_EVENTS = [
    {"type": "response.created", "response": response(status="in_progress", usage=None, output=[])},
    {
        "type": "response.output_item.added",
        "output_index": 0,
        "item": {"type": "function_call", "id": "fc_1", "call_id": "c1", "name": "lookup"},
    },
    {"type": "response.function_call_arguments.delta", "item_id": "fc_1", "delta": '{"q":'},
    {"type": "response.function_call_arguments.delta", "item_id": "fc_1", "delta": '"Oslo"}'},
    {"type": "response.output_text.delta", "item_id": "msg_1", "delta": "Rain "},
    {"type": "response.output_text.delta", "item_id": "msg_1", "delta": "in Oslo ✓."},
]


def test_stream_usage_from_response_completed() -> None:
    body = _sse(*STREAM_EVENTS, {"type": "response.completed", "response": response()})
    summary = stream_all_splits(FMT, body)
    assert summary.complete and summary.usage is not None
    assert (summary.usage.prompt_tokens, summary.usage.completion_tokens) == (328, 52)
    assert summary.response_model == "gpt-4.1-2025-04-14"


def test_a_cut_stream_keeps_what_was_delivered() -> None:
    summary = stream_all_splits(FMT, _sse(*STREAM_EVENTS))
    assert summary.complete is False and summary.usage is None
    assert summary.delivered_text == ["lookup", '{"q":', '"Oslo"}', "Rain ", "in Oslo ✓."]


def test_incomplete_is_final_and_error_is_failed() -> None:
    incomplete = response(status="incomplete", incomplete_details={"reason": "max_output_tokens"})
    summary = stream_all_splits(FMT, _sse({"type": "response.incomplete", "response": incomplete}))
    assert summary.complete and summary.usage is not None
    error = {"type": "error", "code": "server_error", "message": "boom", "sequence_number": 3}
    assert stream_all_splits(FMT, _sse(*STREAM_EVENTS, error)).complete is False


def test_fields_envoy_reads_give_the_same_usage() -> None:
    fmt = FORMATS[FMT]
    values = {
        "usage.input_tokens": 328.0,
        "usage.output_tokens": 52.0,
        "usage.total_tokens": 380.0,
        "usage.input_tokens_details.cached_tokens": 256.0,
        "usage.output_tokens_details.reasoning_tokens": 20.0,
    }
    assert set(values) <= set(fmt.usage_fields)
    assert fmt.usage_from_fields(values) == parse_json(FMT, orjson.dumps(response())).usage


def test_estimate_counts_instructions_input_items_and_tools() -> None:
    plain = estimator.estimate_responses("gpt-4o", "Hello there", "Be brief.")
    as_chat = estimator.estimate_chat(
        "gpt-4o",
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}],
    )
    assert plain == as_chat
    items = [
        {"role": "user", "content": [{"type": "input_text", "text": "Weather in Paris?"}]},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "call_1", "output": "18C and sunny"},
    ]
    with_items = estimator.estimate_responses("gpt-4o", items)
    chat = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": "{}"},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "18C and sunny"},
    ]
    assert with_items == estimator.estimate_chat("gpt-4o", chat)
    tools = [{"type": "function", "name": "get_weather", "parameters": {"type": "object"}}]
    assert estimator.estimate_responses("gpt-4o", items, None, tools) > with_items


@pytest.mark.parametrize(
    ("path", "style"),
    [
        ("/v1/responses", "openai"),
        ("/openai/responses?api-version=2025-04-01-preview", "azure"),
        ("/openai/v1/responses", "azure"),
    ],
)
def test_responses_paths(path: str, style: str) -> None:
    endpoint = classify(path)
    assert endpoint is not None
    assert (endpoint.operation, endpoint.style) == (Operation.RESPONSES, style)

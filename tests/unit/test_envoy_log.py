"""The usage log handler: Envoy's JSON lines become usage records (no Envoy, no database:
a list sink stands in for the writer). The lines are built as Envoy writes them with the
format ``ext_proc.server.envoy_log.LOG_FIELDS`` renders."""

from __future__ import annotations

import base64
import gzip
import zlib
from dataclasses import replace
from typing import Any

import orjson
import pytest

from ext_proc.server.envoy_log import LOG_FIELDS, UsageLog
from ext_proc.server.facts import Facts
from ext_proc.tokens import estimator
from tests.unit.test_processor import make_gateway, settle

PLAIN = Facts(
    request_id="rid-7",
    started=1.0,
    endpoint="/v1/chat/completions",
    operation="chat",
    app_id="app",
    org_id="o",
    key_id="key_app",
    environment="default",
    model="gpt-4o-mini",
    catalog_model="gpt-4o-mini",
    provider="mock",
    deployment="gpt-4o-mini",
    estimated_tokens=12,
)

ANSWER = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "model": "gpt-4o-mini-2024-07-18",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "The sky is blue today."},
            "finish_reason": "stop",
        }
    ],
}


def line(
    status: int,
    *,
    details: str = "via_upstream",
    facts: Facts | None = PLAIN,
    usage: dict[str, Any] | None = None,
    model: dict[str, str] | None = None,
    body: bytes | None = None,
    flags: str = "-",
    encoding: str | None = None,
    content_type: str | None = "application/json",
    recorded: bool = False,
    upstream: str | None = "127.0.0.1:8001",
    denial: list[Any] | None = None,
) -> bytes:
    """One usage-log line, with only the fields Envoy would write for this request."""
    entry: dict[str, Any] = {
        "id": "rid-env",
        "t0": "1733550000.123456",
        "path": "/v1/chat/completions",
        "st": status,
        "det": details,
        "fl": flags,
        "dur": 42000,
        "ttfb": 30000,
        "ms": 42,
        "rqb": 120,
        "rsb": 300,
        "att": 1,
        "route": "to_mock",
    }
    if upstream:
        entry["uh"] = upstream
    if content_type:
        entry["ct"] = content_type
    if encoding:
        entry["ce"] = encoding
    if facts is not None:
        entry["gw"] = facts.to_json()
    if usage is not None:
        entry["u"] = usage  # {dotted JSON path: number}, as json_to_metadata wrote it
    if model is not None:
        entry["mdl"] = model
    if body is not None:
        entry["bd"] = {"b": base64.b64encode(body).decode()}
    if recorded:
        entry["rp"] = "1"
    if denial is not None:
        entry["dn"] = orjson.dumps(denial).decode()
    assert set(entry) <= set(LOG_FIELDS)  # only what the rendered format can produce
    return orjson.dumps(entry)


async def consume(*lines: bytes) -> list[Any]:
    gw, sink = make_gateway()
    await UsageLog(gw).consume(list(lines))
    await settle()
    return sink.records


async def test_plain_answer_from_envoy_usage() -> None:
    [record] = await consume(
        line(
            200,
            usage={
                "usage.prompt_tokens": 11.0,  # Envoy's Struct numbers are doubles
                "usage.completion_tokens": 7.0,
                "usage.total_tokens": 18.0,
                "usage.prompt_tokens_details.cached_tokens": 4.0,
                "usage.completion_tokens_details.reasoning_tokens": 2.0,
            },
            model={"model": "gpt-4o-mini-2024"},
        )
    )
    assert (record.request_id, record.status_code, record.latency_ms) == ("rid-7", 200, 42.0)
    assert record.ttft_ms == 30.0 and record.attempts == 1 and record.response_bytes == 300
    assert (record.prompt_tokens, record.completion_tokens, record.total_tokens) == (11, 7, 18)
    assert (record.cached_tokens, record.reasoning_tokens) == (4, 2)
    assert record.tokens_estimated is False and record.partial is False
    assert record.response_model == "gpt-4o-mini-2024" and record.recorded_by == "access_log"


async def test_anthropic_usage_names() -> None:
    usage = {
        "usage.input_tokens": 10,
        "usage.output_tokens": 5,
        "usage.cache_read_input_tokens": 3,
    }
    [record] = await consume(
        line(200, facts=replace(PLAIN, response_format="anthropic"), usage=usage)
    )
    assert (record.prompt_tokens, record.completion_tokens, record.cached_tokens) == (13, 5, 3)


async def test_skips_what_this_process_recorded_elsewhere() -> None:
    gw, sink = make_gateway()
    gw.recorded.add(PLAIN.request_id)  # its denial / response processor wrote the record
    await UsageLog(gw).consume(
        [line(429, details="gw_rate_limit_exceeded"), line(200, recorded=True)]
    )
    await settle()
    assert sink.records == []


async def test_what_another_process_owned_gets_a_fallback_record() -> None:
    denial, stream = await consume(
        line(404, details="gw_model_not_found"),
        line(200, recorded=True, flags="DR"),  # a stream its owner lost in a crash
    )
    assert denial.recorded_by == stream.recorded_by == "access_log_fallback"
    assert (denial.status_code, denial.decision, denial.error_code) == (
        404,
        "denied",
        "model_not_found",
    )
    assert (denial.app_id, denial.key_id, denial.prompt_tokens) == ("app", "key_app", 0)
    # What the log knows of the stream: sent, cut, no usage -> the prompt estimate.
    assert (stream.prompt_tokens, stream.tokens_estimated, stream.partial) == (12, True, True)


async def test_a_fallback_denial_keeps_its_decision_and_policy() -> None:
    [denial] = await consume(
        line(
            429,
            details="gw_rate_limit_exceeded",
            denial=["denied", "sixty-per-minute", "rate_limit_exceeded"],
        )
    )
    assert (denial.decision, denial.policy, denial.error_code, denial.recorded_by) == (
        "denied",
        "sixty-per-minute",
        "rate_limit_exceeded",
        "access_log_fallback",
    )


async def test_requests_envoy_answered_alone() -> None:
    too_large, gone = await consume(
        line(413, details="request_payload_too_large", facts=None, upstream=None),
        line(0, facts=PLAIN, flags="DC"),  # the app left after the request was sent
    )
    assert (too_large.request_id, too_large.decision, too_large.error_code) == (
        "rid-env",
        "denied",
        "request_payload_too_large",
    )
    assert too_large.endpoint == "/v1/chat/completions"
    assert (gone.status_code, gone.partial, gone.prompt_tokens, gone.tokens_estimated) == (
        499,
        True,
        12,
        True,
    )


def _delivered_tokens(text: str) -> int:
    return estimator.count_texts("gpt-4o-mini", [text])


@pytest.mark.parametrize(
    ("encoding", "encode"),
    [
        (None, lambda b: b),
        ("gzip", gzip.compress),
        ("deflate", zlib.compress),
        ("deflate", lambda b: zlib.compress(b)[2:-4]),  # raw deflate, as some servers send
    ],
)
async def test_body_without_usage_is_counted_from_what_was_delivered(
    encoding: str | None, encode: Any
) -> None:
    [record] = await consume(line(200, body=encode(orjson.dumps(ANSWER)), encoding=encoding))
    assert record.prompt_tokens == 12  # the gateway's estimate
    assert record.completion_tokens == _delivered_tokens("The sky is blue today.")
    assert record.tokens_estimated is True and record.partial is False
    assert record.response_model == "gpt-4o-mini-2024-07-18"


async def test_compressed_body_with_usage_is_exact() -> None:
    answer = {**ANSWER, "usage": {"prompt_tokens": 37, "completion_tokens": 23}}
    [record] = await consume(
        line(200, body=gzip.compress(orjson.dumps(answer)), encoding="gzip", content_type=None)
    )
    assert (record.prompt_tokens, record.completion_tokens, record.total_tokens) == (37, 23, 60)
    assert record.tokens_estimated is False


async def test_sse_body_to_a_plain_request_is_read_as_a_stream() -> None:
    chunk = {**ANSWER, "object": "chat.completion.chunk"}
    chunk["choices"] = [{"index": 0, "delta": {"content": "The sky is blue today."}}]
    usage = {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 6}}
    body = b"data: " + orjson.dumps(chunk) + b"\r\n\r\ndata: " + orjson.dumps(usage)
    [record] = await consume(line(200, body=body + b"\r\n\r\ndata: [DONE]\r\n\r\n"))
    assert (record.prompt_tokens, record.completion_tokens) == (9, 6)


async def test_timeout_after_sending_counts_the_prompt() -> None:
    [record] = await consume(line(504, details="upstream_response_timeout", flags="UT"))
    assert (record.status_code, record.decision) == (504, "error")
    assert (record.prompt_tokens, record.completion_tokens, record.tokens_estimated) == (
        12,
        0,
        True,
    )
    assert record.partial is True


async def test_body_cut_after_headers_counts_the_prompt() -> None:
    [record] = await consume(line(200, details="upstream_reset_after_response_started", flags="UR"))
    assert (record.prompt_tokens, record.tokens_estimated, record.partial) == (12, True, True)


@pytest.mark.parametrize(
    ("status", "details", "flags", "upstream"),
    [
        (503, "upstream_reset_before_response_started{connection_failure}", "UF", None),
        (500, "via_upstream", "-", "127.0.0.1:8001"),  # the provider's own error answer
        (429, "via_upstream", "-", "127.0.0.1:8001"),
    ],
)
async def test_nothing_generated_is_zero(
    status: int, details: str, flags: str, upstream: str | None
) -> None:
    [record] = await consume(line(status, details=details, flags=flags, upstream=upstream))
    assert (record.prompt_tokens, record.completion_tokens, record.tokens_estimated) == (
        0,
        0,
        False,
    )
    assert record.decision == "error"


async def test_bad_lines_are_counted_not_fatal() -> None:
    records = await consume(
        b"not json",
        b"[1, 2]",
        line(200, usage={"usage.prompt_tokens": 2, "usage.completion_tokens": 3}),
    )
    assert [r.total_tokens for r in records] == [5]

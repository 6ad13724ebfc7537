"""Traces and JSON logs through the real Envoy, into a local OTLP receiver.

One request from an app that sends its own W3C ``traceparent`` must come back as one
trace: the app's span -> Envoy's ingress span -> Envoy's ext_proc stream span -> the
ext_proc server's request span (with its policy check) -> the usage record span; and
Envoy's upstream span, whose ``traceparent`` the provider receives. A stream adds the
response side. The ext_proc server's log lines are JSON with the request and trace ids.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import DatabaseFactory
from tests.e2e.stack_helpers import OwnStack, unique_prefix
from tests.otlp_receiver import OtlpReceiver, Span

pytestmark = pytest.mark.e2e

CONFIG = """
providers:
  mock: {type: openai, base_url: "http://127.0.0.1:{mock}"}
models:
  gpt-4o-mini: {provider: mock}
policies:
  roomy: {type: rate_limit, requests: 100000, window: 1h}
applications:
  traced-app: {org: traced, policies: [roomy]}
"""
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
APP_SPAN = "00f067aa0ba902b7"


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    rx = OtlpReceiver().start()
    try:
        yield rx
    finally:
        rx.stop()


@pytest.fixture(scope="module")
async def own(
    databases: DatabaseFactory,
    redis_url: str,
    tmp_path_factory: pytest.TempPathFactory,
    receiver: OtlpReceiver,
) -> AsyncIterator[OwnStack]:
    stack = await OwnStack.start(
        databases,
        tmp_path_factory.mktemp("tracing"),
        CONFIG,
        redis_url=redis_url,
        redis_prefix=unique_prefix("tracing"),
        key_app="traced-app",
        label="tracing",
        extra_env={
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
            "OTEL_BSP_SCHEDULE_DELAY": "100",
            "EXT_PROC_LOG_FORMAT": "json",
        },
    )
    try:
        yield stack
    finally:
        await stack.stop()


def by_id(spans: list[Span]) -> dict[str, Span]:
    return {span.span_id: span for span in spans}


def chain_to_root(span: Span, spans: dict[str, Span]) -> list[str]:
    """Span names from ``span`` up to the app's span (``app``) or the first unknown."""
    names = [f"{span.service}:{span.name}"]
    while span.parent_span_id:
        if span.parent_span_id == APP_SPAN:
            names.append("app")
            break
        parent = spans.get(span.parent_span_id)
        if parent is None:
            names.append(f"? {span.parent_span_id}")
            break
        names.append(f"{parent.service}:{parent.name}")
        span = parent
    return names


async def test_one_request_is_one_trace_through_every_hop(
    own: OwnStack, receiver: OtlpReceiver
) -> None:
    traceparent = f"00-{TRACE_ID}-{APP_SPAN}-01"
    async with httpx.AsyncClient(timeout=30) as http:
        answer = await http.post(
            f"{own.base_url}/chat/completions",
            json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hi"}]},
            headers={"authorization": f"Bearer {own.api_key}", "traceparent": traceparent},
        )
        assert answer.status_code == 200
        request_id = answer.headers["x-request-id"]
        # The provider got the trace (Envoy's upstream span as its parent).
        seen = await http.get(
            f"http://127.0.0.1:{own.stack.mock_port}/_mock/requests",
            params={"limit": "1"},
        )
    upstream_traceparent = seen.json()[-1]["headers"]["traceparent"]
    assert upstream_traceparent.split("-")[1] == TRACE_ID

    def complete(spans: list[Span]) -> bool:
        mine = [s for s in spans if s.trace_id == TRACE_ID]
        names = {s.name for s in mine}
        known = {s.span_id for s in mine} | {APP_SPAN}
        return (
            {"ext_proc request", "gateway.usage_record", "ingress"} <= names
            and any(n.startswith("router") for n in names)
            and all(s.parent_span_id in known for s in mine)
        )

    await asyncio.to_thread(receiver.wait_for, complete, 20.0)
    spans = receiver.trace(TRACE_ID)
    index = by_id(spans)
    names = sorted(f"{s.service}:{s.name}" for s in spans)
    print("\n[tracing] spans of the trace:\n  " + "\n  ".join(names))
    [request_span] = [s for s in spans if s.name == "ext_proc request"]
    assert chain_to_root(request_span, index) == [
        "llm-gateway-ext-proc:ext_proc request",
        "llm-gateway-envoy:async envoy.service.ext_proc.v3.ExternalProcessor.Process egress",
        "llm-gateway-envoy:ingress",
        "app",
    ]
    assert request_span.attributes["gen_ai.request.model"] == "gpt-4o-mini"
    assert request_span.attributes["gen_ai.provider.name"] == "mock"
    assert request_span.attributes["gateway.request_id"] == request_id
    [policy] = [s for s in spans if s.name == "gateway.policy_check"]
    assert policy.parent_span_id == request_span.span_id
    # The plain answer is finished from Envoy's usage log, later: still in the trace.
    [record] = [s for s in spans if s.name == "gateway.usage_record"]
    assert record.parent_span_id == request_span.span_id
    assert record.attributes["gateway.recorded_by"] == "access_log"
    assert record.attributes["gen_ai.usage.output_tokens"] > 0

    # Its Postgres write: a batch's own root span, linked to the request's record span.
    def written(all_spans: list[Span]) -> bool:
        return any(s.name == "gateway.usage_write" and record.span_id in s.links for s in all_spans)

    every = await asyncio.to_thread(receiver.wait_for, written, 20.0)
    [write] = [s for s in every if s.name == "gateway.usage_write" and record.span_id in s.links]
    assert write.parent_span_id == ""  # one batch holds many requests' records
    assert write.attributes["db.system"] == "postgresql"
    assert write.attributes["gateway.batch_records"] >= 1
    assert write.attributes["gateway.rows_inserted"] >= 1
    assert write.attributes["gateway.spooled"] is False
    # Its latency sample carries the trace id as an exemplar, for an OpenMetrics scrape.
    async with httpx.AsyncClient(timeout=10) as http:
        scraped = await http.get(
            f"http://127.0.0.1:{own.metrics_ports[0]}/metrics",
            headers={"accept": "application/openmetrics-text; version=1.0.0"},
        )
    assert scraped.headers["content-type"].startswith("application/openmetrics-text")
    assert any(
        line.startswith("gen_ai_server_request_duration_seconds_bucket")
        and f'# {{trace_id="{TRACE_ID}"}}' in line
        for line in scraped.text.splitlines()
    ), "no exemplar with the request's trace id"
    [upstream] = [s for s in spans if s.name.startswith("router")]
    assert upstream_traceparent.split("-")[2] == upstream.span_id
    # Redis calls: the key cache's lookup under the request, the limit under its check.
    redis_spans = [s for s in spans if s.attributes.get("db.system") == "redis"]
    assert any(s.parent_span_id == policy.span_id for s in redis_spans)
    assert all(
        chain_to_root(s, index)[1]
        in ("llm-gateway-ext-proc:ext_proc request", "llm-gateway-ext-proc:gateway.policy_check")
        for s in redis_spans
    )

    # JSON logs: every line an object; a line about this request names it and its trace.
    lines = await asyncio.to_thread(json_lines, Path(own.stack.log_dir))
    assert lines and all("level" in line and "message" in line for line in lines)


def json_lines(log_dir: Path) -> list[dict[str, object]]:
    """The ext_proc server's log lines (JSON objects; Python's own warnings aside)."""
    return [
        json.loads(line)
        for path in sorted(log_dir.glob("ext-proc*.log"))
        for line in path.read_text().splitlines()
        if line.startswith("{")
    ]


async def test_a_stream_adds_the_response_side(own: OwnStack, receiver: OtlpReceiver) -> None:
    trace_id = "5bf92f3577b34da6a3ce929d0e0e4737"
    async with (
        httpx.AsyncClient(timeout=30) as http,
        http.stream(
            "POST",
            f"{own.base_url}/chat/completions",
            json={
                "model": "gpt-4o-mini",
                "messages": [{"role": "user", "content": "Hi"}],
                "stream": True,
            },
            headers={
                "authorization": f"Bearer {own.api_key}",
                "traceparent": f"00-{trace_id}-{APP_SPAN}-01",
            },
        ) as answer,
    ):
        assert answer.status_code == 200
        body = b"".join([chunk async for chunk in answer.aiter_bytes()])
    assert b"[DONE]" in body

    def complete(spans: list[Span]) -> bool:
        mine = [s for s in spans if s.trace_id == trace_id]
        names = {s.name for s in mine}
        known = {s.span_id for s in mine} | {APP_SPAN}
        return {"ext_proc request", "ext_proc response", "gateway.usage_record"} <= names and all(
            s.parent_span_id in known for s in mine
        )

    await asyncio.to_thread(receiver.wait_for, complete, 20.0)
    spans = receiver.trace(trace_id)
    index = by_id(spans)
    [response_span] = [s for s in spans if s.name == "ext_proc response"]
    assert chain_to_root(response_span, index)[-2:] == ["llm-gateway-envoy:ingress", "app"]
    [record] = [s for s in spans if s.name == "gateway.usage_record"]
    assert record.attributes["gateway.recorded_by"] == "response"
    assert index[record.parent_span_id].name in ("ext_proc response", "ext_proc request")

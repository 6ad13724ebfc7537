"""Traces and JSON logs, without Envoy: when tracing is on, what the spans and the log
lines carry; when it is off, that nothing is set up."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator
from typing import NamedTuple

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from ext_proc import logs, telemetry
from ext_proc.config.loader import parse_config
from ext_proc.envoy_config import EnvoyOptions, render
from ext_proc.envoy_tracing import OTLP_CLUSTER, otlp_parts
from ext_proc.server.facts import Facts

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.fixture
def tracing() -> Iterator[InMemorySpanExporter]:
    """Tracing on, spans kept in memory (as ``telemetry.setup`` would, minus OTLP)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    telemetry.TRACER = provider.get_tracer("test")
    try:
        yield exporter
    finally:
        telemetry.TRACER = None


@pytest.fixture
def json_logs() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    root = logging.getLogger()
    saved = list(root.handlers), root.level
    logs.configure("info", "json")
    root.handlers[0].stream = stream  # type: ignore[attr-defined]
    try:
        yield stream
    finally:
        logs.ENABLED = False
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


@pytest.mark.parametrize(
    ("env", "on"),
    [
        ({}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SDK_DISABLED": "true"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_TRACES_EXPORTER": "none"}, False),
    ],
)
def test_tracing_is_on_only_when_the_standard_variables_ask(env: dict[str, str], on: bool) -> None:
    assert telemetry.enabled_by(env) is on


def test_off_by_default_sets_nothing_up() -> None:
    assert telemetry.setup({}) is False
    assert telemetry.TRACER is None
    assert telemetry.current_traceparent() == ""
    assert telemetry.ids_of_current() is None


def test_a_bad_protocol_is_named() -> None:
    with pytest.raises(ValueError, match="OTEL_EXPORTER_OTLP_PROTOCOL='thrift'"):
        telemetry.setup(
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318",
                "OTEL_EXPORTER_OTLP_PROTOCOL": "thrift",
            }
        )


class Metadatum(NamedTuple):
    """grpc's own metadata item: a named (key, value) tuple (grpclib gives plain pairs)."""

    key: str
    value: str


def test_stream_span_continues_envoys_trace_and_names_the_request(
    tracing: InMemorySpanExporter,
) -> None:
    assert telemetry.TRACER is not None
    metadata = [Metadatum("x-forwarded-for", "1.2.3.4"), Metadatum("traceparent", TRACEPARENT)]
    span = telemetry.start_stream_span(telemetry.TRACER, "request", metadata)
    facts = Facts(request_id="rid", started=1.0, endpoint="/v1/chat/completions", operation="chat")
    facts.model, facts.provider, facts.app_id = "gpt-4o", "openai", "app"
    telemetry.end_stream_span(span, facts, 429)
    [done] = tracing.get_finished_spans()
    assert done.name == "ext_proc request"
    assert format(done.context.trace_id, "032x") == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert done.parent is not None and format(done.parent.span_id, "016x") == "00f067aa0ba902b7"
    assert done.attributes is not None
    assert done.attributes["gen_ai.request.model"] == "gpt-4o"
    assert done.attributes["gateway.answered_status"] == 429


def test_the_record_span_joins_the_request_even_in_another_process(
    tracing: InMemorySpanExporter,
) -> None:
    # The request side's traceparent rides in the facts (usage log, maybe another
    # replica): the record's span is its child.
    facts = Facts(request_id="rid", started=1.0, endpoint="", operation="chat")
    facts.trace_parent = TRACEPARENT
    back = Facts.from_json(facts.to_json())
    assert back is not None and back.trace_parent == TRACEPARENT
    span = telemetry.record_span(back)
    assert span is not None
    span.end()
    [done] = tracing.get_finished_spans()
    assert done.parent is not None and format(done.parent.span_id, "016x") == "00f067aa0ba902b7"
    assert "tp" not in Facts(request_id="r", started=1.0, endpoint="", operation="").to_json()


def test_json_log_lines_carry_the_request_and_trace(
    json_logs: io.StringIO, tracing: InMemorySpanExporter
) -> None:
    assert telemetry.TRACER is not None

    async def handle() -> None:
        logs.bind_request("rid-7", "support-bot")
        with telemetry.TRACER.start_as_current_span("ext_proc request"):  # type: ignore[union-attr]
            logging.getLogger("ext_proc.test").warning(
                "provider %s slow", "openai", extra={"decision": "allowed"}
            )

    asyncio.run(handle())
    logging.getLogger("ext_proc.test").error("outside any request")
    first, second = (json.loads(line) for line in json_logs.getvalue().splitlines())
    [span] = tracing.get_finished_spans()
    assert first["message"] == "provider openai slow"
    assert first["level"] == "warning" and first["logger"] == "ext_proc.test"
    assert (first["request_id"], first["app"], first["decision"]) == (
        "rid-7",
        "support-bot",
        "allowed",
    )
    assert first["trace_id"] == format(span.context.trace_id, "032x")
    assert first["span_id"] == format(span.context.span_id, "016x")
    # The request's ids belonged to its task: a line outside it has none.
    assert "request_id" not in second and "trace_id" not in second


def test_json_logs_keep_tracebacks(json_logs: io.StringIO) -> None:
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logging.getLogger("ext_proc.test").exception("failed")
    line = json.loads(json_logs.getvalue())
    assert "RuntimeError: boom" in line["exception"]


def test_an_unknown_log_format_is_refused() -> None:
    with pytest.raises(ValueError, match="EXT_PROC_LOG_FORMAT='xml'"):
        logs.configure("info", "xml")


def test_envoy_traces_only_with_an_endpoint() -> None:
    config = parse_config(
        "providers:\n  openai: {type: openai, base_url: 'https://api.openai.com'}\n"
        "models:\n  gpt-4o: {provider: openai}\n"
    )
    plain = render(config, EnvoyOptions())
    hcm = plain["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    assert "tracing" not in hcm["typed_config"]
    assert OTLP_CLUSTER not in {c["name"] for c in plain["static_resources"]["clusters"]}
    traced = render(config, EnvoyOptions(otlp_endpoint="https://otel.example:4318/otlp"))
    hcm = traced["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    tracing = hcm["typed_config"]["tracing"]
    service = tracing["provider"]["typed_config"]["http_service"]["http_uri"]
    assert service["uri"] == "https://otel.example:4318/otlp/v1/traces"
    [cluster] = [c for c in traced["static_resources"]["clusters"] if c["name"] == OTLP_CLUSTER]
    assert cluster["transport_socket"]["typed_config"]["sni"] == "otel.example"
    assert otlp_parts("http://collector") == ("http", "collector", 4318, False, "")
    with pytest.raises(ValueError, match="expected http"):
        otlp_parts("collector:4318")

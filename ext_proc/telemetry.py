"""Traces from the ext_proc server, joined to Envoy's: OpenTelemetry, exported over OTLP.

Off unless ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``..._TRACES_ENDPOINT``) is set, and then
configured by the standard ``OTEL_*`` variables (``OTEL_EXPORTER_OTLP_PROTOCOL``
``http/protobuf`` (default) or ``grpc``, headers, timeouts, ``OTEL_SERVICE_NAME``,
``OTEL_TRACES_SAMPLER``...). While off, ``TRACER`` is None and every hook in the request
path is one ``is None`` check: nothing is imported, nothing allocated.

What is traced, when on (each span a child of what Envoy sent as ``traceparent`` on the
ext_proc stream, itself in the app's trace when the app sent one):

- ``ext_proc request`` / ``ext_proc response``: one span per ext_proc stream, with the
  GenAI attributes known there (operation, model, provider) and the gateway's decision;
- ``gateway.policy_check``: the request's policy checks (Redis calls inside it are
  child spans through the redis-py instrumentation);
- ``gateway.usage_record``: the request's usage record being finished (tokens, cost,
  status), parented to the request span even when Envoy's usage log finishes it later,
  possibly in another process (the request's ``traceparent`` rides in its facts);
- ``gateway.usage_write``: each batch written to Postgres, a root span of its own (one
  batch holds many requests) with a span link to each of its requests'
  ``gateway.usage_record`` spans (up to ``MAX_WRITE_LINKS``), so a trace viewer goes
  from a request to the write that stored it and back.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.trace import Span, Tracer

log = logging.getLogger(__name__)

SERVICE_NAME = "llm-gateway-ext-proc"
# None: tracing is off (the hooks check this and nothing else).
TRACER: Tracer | None = None
_provider: Any = None


def enabled_by(env: Mapping[str, str]) -> bool:
    """Whether the standard variables ask for traces."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if env.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() in ("none", ""):
        return False
    return bool(
        env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    )


def setup(env: Mapping[str, str] | None = None) -> bool:
    """Start exporting spans if the environment asks for it; True if it does."""
    global TRACER, _provider
    env = os.environ if env is None else env
    if not enabled_by(env):
        return False
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    protocol = (
        env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    ).strip()
    exporter: Any
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter()
    elif protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter as HttpExporter,
        )

        exporter = HttpExporter()
    else:
        raise ValueError(f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r}: use http/protobuf or grpc")
    resource = Resource.create({"service.name": env.get("OTEL_SERVICE_NAME") or SERVICE_NAME})
    provider = TracerProvider(resource=resource)  # OTEL_TRACES_SAMPLER is honoured
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    _provider = provider
    TRACER = provider.get_tracer("ext_proc")
    try:  # Redis calls as child spans (policy limits, caches)
        from opentelemetry.instrumentation.redis import RedisInstrumentor

        RedisInstrumentor().instrument(tracer_provider=provider)
    except ImportError:
        log.info("opentelemetry-instrumentation-redis is not installed: no Redis spans")
    log.info("exporting traces over OTLP (%s)", protocol)
    return True


def shutdown() -> None:
    """Flush and stop the exporter (at the end of ``serve``)."""
    global TRACER, _provider
    if _provider is not None:
        _provider.shutdown()
    TRACER = None
    _provider = None


def parent_from_metadata(metadata: Any) -> Context | None:
    """The trace context Envoy sent on an ext_proc stream (gRPC metadata ``traceparent``)."""
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    # grpc.aio's metadata items are (key, value) named tuples; grpclib's are pairs too.
    carrier = {key: value for key, value in metadata or () if key.startswith("trace")}
    if "traceparent" not in carrier:
        return None
    return TraceContextTextMapPropagator().extract(carrier)


def parent_from_traceparent(traceparent: str) -> Context | None:
    if not traceparent:
        return None
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    return TraceContextTextMapPropagator().extract({"traceparent": traceparent})


def traceparent_of(span: Span) -> str:
    """The W3C traceparent naming ``span`` (carried in a request's facts)."""
    ctx = span.get_span_context()
    if not ctx.is_valid:
        return ""
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def ids_of_current() -> tuple[str, str] | None:
    """(trace id, span id) of the current span, for log lines; None when none."""
    if TRACER is None:
        return None
    from opentelemetry import trace

    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None
    return f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}"


def start_stream_span(tracer: Tracer, side: str, metadata: Any) -> Span:
    """The span of one ext_proc stream (``side``: request or response)."""
    from opentelemetry.trace import SpanKind

    return tracer.start_span(
        f"ext_proc {side}", context=parent_from_metadata(metadata), kind=SpanKind.SERVER
    )


def end_stream_span(span: Span, facts: Any, status: int | None) -> None:
    """Name what the stream handled (GenAI attributes where known) and end its span."""
    if facts is not None:
        attributes = {
            "gen_ai.operation.name": facts.operation,
            "gen_ai.request.model": facts.model,
            "gen_ai.provider.name": facts.provider,
            "gateway.request_id": facts.request_id,
            "gateway.app": facts.app_id,
            "gateway.deployment": facts.deployment,
        }
        span.set_attributes({k: v for k, v in attributes.items() if v})
    if status is not None:
        span.set_attribute("gateway.answered_status", status)
    span.end()


def current_traceparent() -> str:
    """The traceparent of the current span ("" when tracing is off or there is none)."""
    if TRACER is None:
        return ""
    from opentelemetry import trace

    return traceparent_of(trace.get_current_span())


def record_span(facts: Any) -> Span | None:
    """A started ``gateway.usage_record`` span for a request being finished."""
    if TRACER is None:
        return None
    parent = parent_from_traceparent(getattr(facts, "trace_parent", ""))
    return TRACER.start_span("gateway.usage_record", context=parent)


def end_record_span(span: Span, rec: Any) -> None:
    attributes = {
        "gateway.request_id": rec.request_id,
        "gateway.recorded_by": rec.recorded_by,
        "gateway.decision": rec.decision,
        "http.response.status_code": rec.status_code,
        "gen_ai.request.model": rec.model,
        "gen_ai.response.model": rec.response_model,
        "gen_ai.provider.name": rec.provider,
        "gen_ai.usage.input_tokens": rec.prompt_tokens,
        "gen_ai.usage.output_tokens": rec.completion_tokens,
        "gateway.tokens_estimated": rec.tokens_estimated,
        "gateway.cost_usd": str(rec.cost_usd) if rec.cost_usd is not None else None,
        "gateway.attempts": rec.attempts,
    }
    span.set_attributes({k: v for k, v in attributes.items() if v is not None})
    span.end()


# Links on one usage_write span at most (a batch may hold thousands of records; the
# OpenTelemetry SDK's own default limit is 128 links per span).
MAX_WRITE_LINKS = 128


def context_of(span: Span) -> Any:
    """What a later span links to (``write_span``)."""
    return span.get_span_context()


def write_span(records: int, contexts: list[Any]) -> Span | None:
    """A started ``gateway.usage_write`` span for a batch of ``records`` usage records,
    linked to the request spans in ``contexts``."""
    if TRACER is None:
        return None
    from opentelemetry.trace import Link, SpanKind

    return TRACER.start_span(
        "gateway.usage_write",
        context=None,
        kind=SpanKind.CLIENT,
        links=[Link(c) for c in contexts[:MAX_WRITE_LINKS]],
        attributes={
            "db.system": "postgresql",
            "db.operation.name": "COPY",
            "db.collection.name": "usage_records",
            "gateway.batch_records": records,
        },
    )


def end_write_span(span: Span, *, inserted: int | None, spooled: bool) -> None:
    if inserted is not None:
        span.set_attribute("gateway.rows_inserted", inserted)
    span.set_attribute("gateway.spooled", spooled)
    span.end()

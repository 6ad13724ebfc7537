"""The ext_proc gRPC servicer: decode each message, dispatch to the stream's processor.

Two Envoy filters talk to this service: the request filter (its first message is the
request body, or the request headers where the config asks for them) and the response
filter for streams and translated answers (its first message is the response headers).
The first message decides which processor the stream gets; the loop itself stays dumb.
A failure inside one request's processing answers that request with an OpenAI-shaped
500 (or, on the response side, lets the answer through) and is counted; it never
escapes into grpc and never stops the server.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2

from ext_proc import telemetry
from ext_proc.server.context import Gateway
from ext_proc.server.processor import RequestError, RequestProcessor
from ext_proc.server.response import ResponseProcessor
from ext_proc.server.wire import decode_request

log = logging.getLogger(__name__)

SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"

# What handles each phase of a stream, per side: typed tables (mypy checks every method's
# signature against them) instead of a method looked up by name.
RequestHandler = Callable[
    [RequestProcessor, Any, pb.ProcessingRequest], Awaitable[pb.ProcessingResponse]
]
ResponseHandler = Callable[
    [ResponseProcessor, Any, pb.ProcessingRequest], Awaitable[pb.ProcessingResponse]
]
_REQUEST_SIDE: dict[str, RequestHandler] = {
    "request_headers": RequestProcessor.on_request_headers,
    "request_body": RequestProcessor.on_request_body,
}
_RESPONSE_SIDE: dict[str, ResponseHandler] = {
    "response_headers": ResponseProcessor.on_response_headers,
    "response_body": ResponseProcessor.on_response_body,
}
_PHASES = (*_REQUEST_SIDE, *_RESPONSE_SIDE)


def add_to_server(servicer: ExternalProcessor, server: grpc.aio.Server) -> None:
    """Serve ``servicer`` on ``server`` (the generated registration, with the request
    decoder that survives header bytes that are not UTF-8: see ``wire``)."""
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.Process,
        request_deserializer=decode_request,
        response_serializer=pb.ProcessingResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE, {"Process": handler}),)
    )


class ExternalProcessor(pb_grpc.ExternalProcessorServicer):
    def __init__(self, gateway: Gateway) -> None:
        self._gw = gateway
        metrics = gateway.metrics
        # Label children resolved once: .labels() costs a dict lookup and a lock per call.
        self._phase_timers = {phase: metrics.phase_duration.labels(phase) for phase in _PHASES}
        self._streams = metrics.streams_active

    async def Process(
        self,
        request_iterator: AsyncIterator[pb.ProcessingRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.ProcessingResponse]:
        proc: RequestProcessor | ResponseProcessor | None = None
        timers = self._phase_timers
        self._streams.inc()
        finished = False
        tracer = telemetry.TRACER
        span: Any = None
        answered: int | None = None
        try:
            async for request in request_iterator:
                phase = request.WhichOneof("request")
                if phase not in timers:
                    yield _passthrough(phase)  # trailers (not configured): let them pass
                    continue
                started = time.perf_counter()
                if proc is None:
                    proc = (
                        RequestProcessor(self._gw)
                        if phase.startswith("request")
                        else ResponseProcessor(self._gw, request)
                    )
                    if tracer is not None:
                        span = telemetry.start_stream_span(
                            tracer,
                            "request" if phase.startswith("request") else "response",
                            context.invocation_metadata(),
                        )
                token = None if span is None else _attach(span)
                try:
                    message = getattr(request, phase)
                    if type(proc) is RequestProcessor:
                        on_request = _REQUEST_SIDE.get(phase)
                        if on_request is None:
                            raise _WrongSide(phase, "request")
                        response = await on_request(proc, message, request)
                    else:
                        assert isinstance(proc, ResponseProcessor)
                        on_response = _RESPONSE_SIDE.get(phase)
                        if on_response is None:
                            raise _WrongSide(phase, "response")
                        response = await on_response(proc, message, request)
                except RequestError as denial:
                    assert isinstance(proc, RequestProcessor)
                    response = proc.deny(denial)
                except Exception as exc:  # one request failed: answer it, keep serving
                    response = proc.internal_error(exc)
                finally:
                    if token is not None:
                        _detach(token)
                if span is not None and response.HasField("immediate_response"):
                    answered = response.immediate_response.status.code
                timers[phase].observe(time.perf_counter() - started)
                if not request.observability_mode:
                    # An observe-only filter (streams the gateway does not rewrite)
                    # ignores answers: none is sent.
                    yield response
                if response.HasField("immediate_response") or proc.done:
                    # Nothing more will come on this stream: end the RPC here rather than
                    # wait for Envoy to cancel it (grpc.aio leaks native memory on every
                    # call cancelled while a read is pending: about 130 bytes a request,
                    # measured; grpc/grpc#43360).
                    finished = True
                    break
            else:
                finished = True
        except asyncio.CancelledError:
            # Envoy reset the stream: the app went away or the upstream failed mid-way.
            if proc is not None:
                proc.close(cancelled=True)
            if span is not None:
                telemetry.end_stream_span(span, proc.facts if proc else None, None)
                span = None
            proc = None
            raise
        finally:
            self._streams.dec()
            if proc is not None:
                token = None if span is None else _attach(span)
                try:
                    proc.close(cancelled=not finished)
                finally:
                    if token is not None:
                        _detach(token)
            if span is not None:
                telemetry.end_stream_span(span, proc.facts if proc else None, answered)


class HealthState:
    """``grpc.health.v1.Health`` of the ext_proc port, whichever server serves it: ``""``
    and the ext_proc service are known, both follow ``set``; ``changed`` is set (and
    replaced) on every change, for Watch."""

    SERVICES = ("", SERVICE)

    def __init__(self) -> None:
        self._serving = False
        self.changed = asyncio.Event()

    def set(self, serving: bool) -> None:
        self._serving = serving
        self.changed.set()
        self.changed = asyncio.Event()

    def status(self) -> int:
        response = health_pb2.HealthCheckResponse
        return int(response.SERVING if self._serving else response.NOT_SERVING)


class _WrongSide(RuntimeError):
    """A message of one side's phase on the other side's stream (a config mistake)."""

    def __init__(self, phase: str, side: str) -> None:
        super().__init__(f"a {phase} message on a {side}-side ext_proc stream")


def _passthrough(phase: str | None) -> pb.ProcessingResponse:
    if phase == "request_trailers":
        return pb.ProcessingResponse(request_trailers=pb.TrailersResponse())
    if phase == "response_trailers":
        return pb.ProcessingResponse(response_trailers=pb.TrailersResponse())
    return pb.ProcessingResponse()


def _attach(span: Any) -> object:
    """Make ``span`` current while a message is handled (tracing on only)."""
    from opentelemetry import context as otel_context
    from opentelemetry import trace

    return otel_context.attach(trace.set_span_in_context(span))


def _detach(token: Any) -> None:
    from opentelemetry import context as otel_context

    otel_context.detach(token)

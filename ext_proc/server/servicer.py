"""The ext_proc gRPC servicer: decode each message, dispatch to the request's processor.

The loop stays dumb on purpose (all decisions live in ``RequestProcessor``). A failure
inside one request's processing answers that request with an OpenAI-shaped 500 and is
counted; it never escapes into grpc and never stops the server.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from ext_proc.server.context import Gateway
from ext_proc.server.processor import RequestError, RequestProcessor

log = logging.getLogger(__name__)

_PHASES = ("request_headers", "request_body", "response_headers", "response_body")


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
        proc = RequestProcessor(self._gw)
        handlers = {
            "request_headers": proc.on_request_headers,
            "request_body": proc.on_request_body,
            "response_headers": proc.on_response_headers,
            "response_body": proc.on_response_body,
        }
        timers = self._phase_timers
        self._streams.inc()
        cancelled = True
        try:
            async for request in request_iterator:
                phase = request.WhichOneof("request")
                handler = handlers.get(phase) if phase else None
                started = time.perf_counter()
                if handler is None:
                    # Trailers (not configured) or a future message type: let it pass.
                    response = _passthrough(phase)
                else:
                    try:
                        response = await handler(getattr(request, phase))
                    except RequestError as denial:
                        response = proc.deny(denial)
                    except Exception as exc:  # one request failed: answer it, keep serving
                        response = proc.internal_error(exc)
                    timers[phase].observe(time.perf_counter() - started)
                yield response
                if response.HasField("immediate_response"):
                    cancelled = False
                    break
            else:
                cancelled = not proc.finished
        except asyncio.CancelledError:
            # Envoy reset the stream: the app went away or the upstream failed mid-way.
            proc.close(cancelled=True)
            raise
        finally:
            self._streams.dec()
            proc.close(cancelled=cancelled)


def _passthrough(phase: str | None) -> pb.ProcessingResponse:
    if phase == "request_trailers":
        return pb.ProcessingResponse(request_trailers=pb.TrailersResponse())
    if phase == "response_trailers":
        return pb.ProcessingResponse(response_trailers=pb.TrailersResponse())
    return pb.ProcessingResponse()

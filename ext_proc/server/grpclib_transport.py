"""The ext_proc and health services on ``grpclib`` (pure-Python HTTP/2 on ``h2``).

Chosen with ``EXT_PROC_GRPC_SERVER=grpclib``; ``grpcio`` (grpc.aio) remains available.
The stream logic is the same object either way (``servicer.ExternalProcessor``): this
module only adapts a grpclib stream to the iterator-in, iterator-out shape grpc.aio
gives the servicer. Why it exists: one ext_proc exchange costs about a quarter less CPU
on grpclib than on grpc.aio here, Envoy's side a little less too, and a second process
adds throughput where grpc.aio loses some (README "Performance" has the product's own
numbers from ``make bench``).

Differences from grpc.aio that matter here, and how they are handled:

* Requests are decoded by ``wire.decode_request`` (header bytes that are not UTF-8
  survive), given to grpclib's proto codec as the request type's ``FromString``.
* grpclib has no graceful stop of its own (``close`` cancels running streams): ``stop``
  stops accepting connections, waits up to ``grace`` seconds for open streams to end,
  then cancels the rest, which the servicer treats as Envoy resetting them (their
  usage is still recorded, as cancelled).
* grpclib puts no limit on a message's size; Envoy's own ``max_request_bytes`` and the
  ``request_size`` policy bound what reaches us.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Iterable
from typing import Any, cast

from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from grpc_health.v1 import health_pb2
from grpclib.const import Cardinality, Handler, Status
from grpclib.server import Server, Stream

from ext_proc.server.servicer import SERVICE, ExternalProcessor
from ext_proc.server.wire import decode_request

METHOD = f"/{SERVICE}/Process"


class _DecodedRequest:
    """The request type grpclib's codec sees: ``FromString`` is our tolerant decoder."""

    FromString = staticmethod(decode_request)


class _Context:
    """The one part of grpc.aio's ServicerContext the servicer reads: the metadata."""

    __slots__ = ("_stream",)

    def __init__(self, stream: Stream[Any, Any]) -> None:
        self._stream = stream

    def invocation_metadata(self) -> Iterable[tuple[str, str | bytes]]:
        metadata = self._stream.metadata
        return () if metadata is None else list(metadata.items())


class GrpclibExternalProcessor:
    """``ExternalProcessor.Process`` served over a grpclib stream."""

    def __init__(self, servicer: ExternalProcessor) -> None:
        self._servicer = servicer
        self.open_streams = 0
        self.idle = asyncio.Event()  # set while no stream is open
        self.idle.set()

    async def process(self, stream: Stream[pb.ProcessingRequest, pb.ProcessingResponse]) -> None:
        self.open_streams += 1
        self.idle.clear()
        responses = cast(
            AsyncGenerator[pb.ProcessingResponse, None],
            self._servicer.Process(stream, cast(Any, _Context(stream))),
        )
        try:
            # aclosing: a cancel while a response is being sent still runs the
            # servicer's cleanup (usage of a cut stream) now, not at garbage collection.
            async with contextlib.aclosing(responses):
                async for response in responses:
                    await stream.send_message(response)
        finally:
            self.open_streams -= 1
            if not self.open_streams:
                self.idle.set()

    def __mapping__(self) -> dict[str, Handler]:
        return {
            METHOD: Handler(
                self.process,
                Cardinality.STREAM_STREAM,
                cast(Any, _DecodedRequest),
                pb.ProcessingResponse,
            )
        }


class _Health:
    """``grpc.health.v1.Health`` on grpclib, with grpcio-health-checking's messages
    (grpclib's own copy of the same protos cannot share the process's descriptor pool).
    ``""`` and the ext_proc service are known; both follow ``serving``."""

    SERVICES = ("", SERVICE)

    def __init__(self) -> None:
        self._serving = False
        self._changed = asyncio.Event()

    def set(self, serving: bool) -> None:
        self._serving = serving
        self._changed.set()
        self._changed = asyncio.Event()

    def _status(self) -> int:
        response = health_pb2.HealthCheckResponse
        return int(response.SERVING if self._serving else response.NOT_SERVING)

    async def check(self, stream: Stream[Any, Any]) -> None:
        request = await stream.recv_message()
        if request is None or request.service not in self.SERVICES:
            await stream.send_trailing_metadata(status=Status.NOT_FOUND)
            return
        await stream.send_message(health_pb2.HealthCheckResponse(status=self._status()))

    async def watch(self, stream: Stream[Any, Any]) -> None:
        request = await stream.recv_message()
        if request is None or request.service not in self.SERVICES:
            await stream.send_message(
                health_pb2.HealthCheckResponse(
                    status=health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
                )
            )
            return
        while True:
            changed = self._changed
            await stream.send_message(health_pb2.HealthCheckResponse(status=self._status()))
            await changed.wait()

    def __mapping__(self) -> dict[str, Handler]:
        request, response = health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse
        return {
            "/grpc.health.v1.Health/Check": Handler(
                self.check, Cardinality.UNARY_UNARY, request, response
            ),
            "/grpc.health.v1.Health/Watch": Handler(
                self.watch, Cardinality.UNARY_STREAM, request, response
            ),
        }


class GrpclibServer:
    """The ext_proc service and gRPC health on one grpclib server."""

    def __init__(self, servicer: ExternalProcessor) -> None:
        self._processor = GrpclibExternalProcessor(servicer)
        self._health = _Health()
        self._server = Server([self._processor, self._health])
        self.port = 0

    async def start(self, host: str, port: int) -> int:
        await self._server.start(host, port)
        listener = cast(Any, self._server._server)  # an asyncio.Server once started
        sockets = listener.sockets if listener is not None else ()
        self.port = sockets[0].getsockname()[1] if sockets else 0
        self._health.set(True)
        return self.port

    async def stop(self, grace: float) -> None:
        """Stop accepting, let open streams finish for up to ``grace`` s, cancel the rest."""
        self._health.set(False)
        listener = self._server._server
        if listener is not None:
            listener.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._processor.idle.wait(), grace)
        self._server.close()
        await self._server.wait_closed()

"""The ext_proc and health services on ``grpclib`` (pure-Python HTTP/2 on ``h2``).

The default (``EXT_PROC_GRPC_SERVER=grpclib``); ``grpcio`` (grpc.aio) remains available.
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
* grpclib writes each HTTP/2 frame group to the socket as it is made: an answer's
  headers, its message and its trailers are three ``write`` calls (on loopback each one
  also runs Envoy's side of TCP, and wakes it). ``_CoalescingTransport`` gathers what
  one pass of the event loop writes and sends it as one: every answer, and every answer
  ready in the same pass, leaves in one segment.
* h2 advertises at most 100 concurrent streams per connection. A stream's response side
  holds its ext_proc stream for the whole answer, so 2,000 open streams needed ~20
  connections from Envoy and, at peak, 120-480 of them had no ext_proc stream open yet
  (their chunks waited; ``python -m bench --open-streams``). The server raises the limit
  to ``MAX_STREAMS_PER_CONNECTION``: the bounds are Envoy's (its circuit breakers on
  the ``ext_proc`` and ``ext_proc_response`` clusters).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Iterable
from typing import Any, cast

from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from grpc_health.v1 import health_pb2
from grpclib.const import Cardinality, Handler, Status
from grpclib.protocol import H2Protocol
from grpclib.server import Server, Stream
from h2.settings import SettingCodes

from ext_proc.server.servicer import SERVICE, ExternalProcessor, HealthState
from ext_proc.server.wire import decode_request

METHOD = f"/{SERVICE}/Process"
# As many as Envoy's ext_proc_response cluster lets it open (envoy_config: 65536).
MAX_STREAMS_PER_CONNECTION = 65536


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


class _CoalescingTransport:
    """The socket transport grpclib writes to, with its writes of one event-loop pass
    gathered into one (sent from a callback queued by the first of them). grpclib reads
    nothing else of it but ``is_closing``, ``get_extra_info`` and ``close``."""

    __slots__ = ("_chunks", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._loop = asyncio.get_running_loop()
        self._chunks: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not data:
            return
        chunks = self._chunks
        if not chunks:
            self._loop.call_soon(self._flush)
        chunks.append(data)

    def _flush(self) -> None:
        chunks = self._chunks
        if not chunks:
            return
        self._chunks = []
        if self._transport.is_closing():
            return  # the connection is gone: its streams are being failed already
        self._transport.write(chunks[0] if len(chunks) == 1 else b"".join(chunks))

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)

    def close(self) -> None:
        self._flush()  # a GOAWAY or the last trailers still leave
        self._transport.close()


class _ManyStreamsH2Protocol(H2Protocol):
    """grpclib's connection protocol, advertising ``MAX_STREAMS_PER_CONNECTION`` (a
    second SETTINGS frame right after h2's first, as grpclib does for its window size)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        h2_connection = self.connection._connection
        h2_connection.update_settings(
            {SettingCodes.MAX_CONCURRENT_STREAMS: MAX_STREAMS_PER_CONNECTION}
        )
        self.connection.flush()


class _CoalescingH2Protocol(_ManyStreamsH2Protocol):
    """grpclib's connection protocol, writing through a ``_CoalescingTransport``."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(
            cast(asyncio.BaseTransport, _CoalescingTransport(cast(asyncio.Transport, transport)))
        )


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


class _Health(HealthState):
    """``grpc.health.v1.Health`` on grpclib, with grpcio-health-checking's messages
    (grpclib's own copy of the same protos cannot share the process's descriptor pool)."""

    async def check(self, stream: Stream[Any, Any]) -> None:
        request = await stream.recv_message()
        if request is None or request.service not in self.SERVICES:
            await stream.send_trailing_metadata(status=Status.NOT_FOUND)
            return
        await stream.send_message(health_pb2.HealthCheckResponse(status=self.status()))

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
            changed = self.changed
            await stream.send_message(health_pb2.HealthCheckResponse(status=self.status()))
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
        plain_protocol = self._server._protocol_factory

        def coalescing_protocol() -> H2Protocol:
            made = plain_protocol()  # grpclib's bookkeeping of the connection's handler
            return _CoalescingH2Protocol(made.handler, made.config, made.h2_config)

        # grpclib offers no hook for its connections' protocol: its factory is wrapped.
        self._server._protocol_factory = coalescing_protocol  # type: ignore[method-assign]
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

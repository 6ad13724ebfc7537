"""The gateway's own HTTP/2 server for its gRPC services (``EXT_PROC_GRPC_SERVER=builtin``).

Why it exists: one Envoy ext_proc exchange is a handful of HTTP/2 frames, and on grpclib
about two fifths of ext_proc's CPU per request went to general-purpose HTTP/2 and gRPC
plumbing (h2's state machine and events, its header validation, grpclib's stream
wrappers); a streamed chunk was mostly that. This module serves exactly what Envoy's gRPC
client speaks to us and nothing more, with the same servicer object as the other two
libraries (``servicer.ExternalProcessor``) and gRPC health:

* frames are cut from the socket's bytes with one ``struct`` call each; a DATA frame that
  carries exactly one gRPC message (the usual case) becomes that message's bytes with
  one slice;
* request header blocks are decoded with ``hpack`` (the dynamic table must follow Envoy's
  encoder), and a block whose decoding left the table as it was is remembered: Envoy's
  repeated stream headers are all table references after the first stream, so the same
  bytes mean the same headers until the table changes;
* our own header blocks never use the dynamic table: the answer's headers and its
  ``grpc-status: 0`` trailers are constant bytes;
* everything a pass of the event loop writes on a connection leaves in one socket write.

What it does about the rest of HTTP/2: SETTINGS (acknowledged; the peer's initial window
and frame size are followed), PING (answered), WINDOW_UPDATE (both directions: the receive
windows are opened to the maximum at once and topped up per 1 GiB; sends wait for the
peer's window), RST_STREAM (the stream's handler is cancelled, which the servicer records
as a cancelled request), GOAWAY (no new streams from the peer), PRIORITY and unknown
frames (ignored), padding, CONTINUATION. A malformed connection gets GOAWAY with
PROTOCOL_ERROR and is closed, as does a header block past ``MAX_HEADER_BLOCK_BYTES``.
Compressed gRPC messages are refused (UNIMPLEMENTED): Envoy's ext_proc client does not
compress, and we do not advertise any encoding. A message announced past
``MAX_MESSAGE_BYTES`` is refused (RESOURCE_EXHAUSTED) before it is gathered; Envoy's
``max_request_bytes`` and the ``request_size`` policy bound what it sends well below.

Graceful stop (as with grpclib): stop accepting connections, let open streams end for up
to ``grace`` seconds, then cancel the rest (recorded as cancelled) and close the
connections with GOAWAY.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from collections import deque
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable
from typing import Any, cast

from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from grpc_health.v1 import health_pb2
from hpack import Decoder
from hpack.exceptions import HPACKError

from ext_proc.server.servicer import SERVICE, ExternalProcessor, HealthState
from ext_proc.server.wire import decode_request

log = logging.getLogger(__name__)

METHOD = f"/{SERVICE}/Process"
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# Frame types and flags (RFC 9113 section 6).
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY = range(8)
WINDOW_UPDATE, CONTINUATION = 8, 9
END_STREAM = ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20
# Error codes.
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR = 0, 1, 2, 3
FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL = 6, 7, 8
# SETTINGS identifiers.
SETTINGS_MAX_CONCURRENT_STREAMS = 0x3
SETTINGS_INITIAL_WINDOW_SIZE = 0x4
SETTINGS_MAX_FRAME_SIZE = 0x5

# gRPC status codes we send.
GRPC_OK, GRPC_NOT_FOUND, GRPC_RESOURCE_EXHAUSTED = 0, 5, 8
GRPC_UNIMPLEMENTED, GRPC_INTERNAL = 12, 13

# As many streams per connection as Envoy's ext_proc_response cluster lets it open
# (envoy_config: 65536): its circuit breakers are the bound, not us.
MAX_STREAMS_PER_CONNECTION = 65536
MAX_WINDOW = 2**31 - 1
# Receive windows are topped up once this much has arrived (they start at MAX_WINDOW).
WINDOW_TOP_UP = 2**30
# The largest frame we accept (advertised): fewer frames for large bodies.
OUR_MAX_FRAME_SIZE = 1 << 20
# Header blocks remembered per connection (see ``_Connection._headers``).
HEADER_CACHE_SIZE = 256
# The largest request message taken (as the grpcio server is configured): Envoy's own
# max_request_bytes bounds what it sends; this bounds what any peer can make us hold.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# The largest request header block, CONTINUATION frames included (Envoy's gRPC headers
# are a few hundred bytes): a peer cannot make us gather more.
MAX_HEADER_BLOCK_BYTES = 64 * 1024

_FRAME = struct.Struct(">HBBBL")  # length (24 bits as 16 + 8), type, flags, stream id
_SETTING = struct.Struct(">HL")
_U32 = struct.Struct(">L")
_GRPC_PREFIX = struct.Struct(">BL")  # compressed flag, message length


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    """One HTTP/2 frame's bytes."""
    n = len(payload)
    return _FRAME.pack(n >> 8, n & 0xFF, kind, flags, stream_id) + payload


def _hpack_int(value: int, prefix_bits: int, first: int) -> bytes:
    """An HPACK integer (RFC 7541 5.1) with ``first``'s high bits as the pattern."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first | value])
    out = bytearray([first | limit])
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _literal(name: bytes, value: bytes) -> bytes:
    """A header field literal without indexing, new name (our blocks never touch the
    decoder's dynamic table, so they are the same bytes every time)."""
    return b"\x00" + _hpack_int(len(name), 7, 0) + name + _hpack_int(len(value), 7, 0) + value


# ":status: 200" is static entry 8; "content-type" is static entry 31 (a literal with an
# indexed name, 4-bit prefix).
_RESPONSE_HEADERS = b"\x88" + _hpack_int(31, 4, 0) + _hpack_int(16, 7, 0) + b"application/grpc"


def _grpc_message_value(message: str) -> bytes:
    """``grpc-message``'s value: percent-encoded outside printable ASCII (gRPC spec)."""
    out = bytearray()
    for byte in message.encode():
        if 0x20 <= byte <= 0x7E and byte != 0x25:
            out.append(byte)
        else:
            out += b"%%%02X" % byte
    return bytes(out)


def trailers_block(status: int, message: str | None = None) -> bytes:
    block = _literal(b"grpc-status", str(status).encode())
    if message:
        block += _literal(b"grpc-message", _grpc_message_value(message))
    return block


_OK_TRAILERS = trailers_block(GRPC_OK)


def message_bytes(payload: bytes) -> bytes:
    """A gRPC length-prefixed message (uncompressed)."""
    return _GRPC_PREFIX.pack(0, len(payload)) + payload


class _Waiting:
    """Bytes that are not a whole unit yet (a frame, a message) and how many the unit
    needs: later bytes are appended (a large unit is copied once, not re-joined with
    every read) and the whole is handed back only once it is there."""

    __slots__ = ("buf", "need")

    def __init__(self) -> None:
        self.buf: bytearray | None = None
        self.need = 0

    def join(self, data: bytes) -> bytes | None:
        """``data`` after what waits; None while fewer than ``need`` bytes are there."""
        buf = self.buf
        if buf is None:
            return data
        buf += data
        if len(buf) < self.need:
            return None
        self.buf = None
        return bytes(buf)

    def keep(self, rest: bytes, need: int) -> None:
        self.buf = bytearray(rest)
        self.need = need


class ProtocolError(Exception):
    """The peer broke HTTP/2: the connection is closed with GOAWAY."""

    def __init__(self, message: str, code: int = PROTOCOL_ERROR) -> None:
        super().__init__(message)
        self.code = code


class StreamError(Exception):
    """This stream cannot be served (a compressed message): it ends with a gRPC status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Stream:
    """One gRPC call: its request messages in, its answers out (never blocks)."""

    __slots__ = (
        "_conn",
        "_items",
        "_refused",
        "_waiter",
        "_waiting",
        "headers",
        "id",
        "local_closed",
        "pending",
        "pending_trailers",
        "received",
        "remote_closed",
        "send_window",
        "started",
        "task",
    )

    def __init__(self, conn: _Connection, stream_id: int, headers: list[tuple[str, str]]):
        self._conn = conn
        self.id = stream_id
        self.headers = headers
        self._items: deque[bytes | StreamError] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._waiting = _Waiting()  # a message not whole yet
        self._refused = False  # a message too large was refused: nothing more is read
        self.remote_closed = False
        self.local_closed = False
        self.started = False  # our response headers are sent
        self.send_window = conn.peer_initial_window
        self.pending = bytearray()  # DATA waiting for the peer's window
        self.pending_trailers: bytes | None = None
        self.received = 0  # bytes since our last WINDOW_UPDATE for this stream
        self.task: asyncio.Task[None] | None = None

    # -- receiving ------------------------------------------------------------------
    def feed(self, data: bytes) -> None:
        """DATA payload: whole gRPC messages go to the inbox, a partial one waits."""
        if self._refused:
            return
        buf = self._waiting.join(data)
        if buf is None:
            return
        pos, end = 0, len(buf)
        items = self._items
        while end - pos >= 5:
            compressed, length = _GRPC_PREFIX.unpack_from(buf, pos)
            if length > MAX_MESSAGE_BYTES:
                # Refused before it is gathered; the rest of the stream is dropped.
                items.append(
                    StreamError(
                        GRPC_RESOURCE_EXHAUSTED,
                        f"a message of {length} bytes (at most {MAX_MESSAGE_BYTES})",
                    )
                )
                self._refused = True
                pos = end
                break
            if end - pos - 5 < length:
                break
            if compressed:
                items.append(StreamError(GRPC_UNIMPLEMENTED, "compressed messages"))
            else:
                items.append(buf[pos + 5 : pos + 5 + length])
            pos += 5 + length
        if pos < end:
            rest = buf[pos:]
            self._waiting.keep(rest, 5 + _GRPC_PREFIX.unpack_from(rest)[1] if len(rest) >= 5 else 5)
        if items:
            self._wake()

    def end_remote(self) -> None:
        self.remote_closed = True
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    async def recv(self) -> bytes | None:
        """The next request message's bytes, or None once the peer has ended."""
        items = self._items
        while not items:
            if self.remote_closed:
                return None
            self._waiter = waiter = self._conn.loop.create_future()
            await waiter
        item = items.popleft()
        if isinstance(item, StreamError):
            raise item
        return item

    def __aiter__(self) -> Stream:
        return self

    async def __anext__(self) -> pb.ProcessingRequest:
        data = await self.recv()
        if data is None:
            raise StopAsyncIteration
        return decode_request(data)

    def invocation_metadata(self) -> Iterable[tuple[str, str]]:
        """The request's metadata, as grpc.aio's ServicerContext gives it."""
        return [(name, value) for name, value in self.headers if not name.startswith(":")]

    # -- sending --------------------------------------------------------------------
    def send_message(self, payload: bytes) -> None:
        if self.local_closed:
            return
        conn = self._conn
        if not self.started:
            self.started = True
            conn.write(conn.response_headers(self.id))
        data = message_bytes(payload)
        n = len(data)
        if (
            not self.pending
            and n <= self.send_window
            and n <= conn.send_window
            and n <= conn.peer_max_frame
        ):
            self.send_window -= n
            conn.send_window -= n
            conn.write(frame(DATA, 0, self.id, data))
            return
        self.pending += data
        conn.pump(self)

    def finish(self, status: int = GRPC_OK, message: str | None = None) -> None:
        """The trailers (END_STREAM), after any DATA still waiting for a window."""
        if self.local_closed:
            return
        self.local_closed = True
        conn = self._conn
        block = _OK_TRAILERS if status == GRPC_OK else trailers_block(status, message)
        if not self.started:  # trailers-only answer
            self.started = True
            block = _RESPONSE_HEADERS + block
        trailers = conn.header_frames(self.id, block, end_stream=True)
        if self.pending:
            self.pending_trailers = trailers
            conn.pump(self)
            return
        conn.write(trailers)
        conn.stream_done(self)


Handler = Callable[[Stream], Awaitable[None]]


class _Connection(asyncio.Protocol):
    """One HTTP/2 connection from Envoy."""

    def __init__(self, server: H2GrpcServer) -> None:
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self._waiting = _Waiting()  # a frame not whole yet
        self._preface = False
        self._out: list[bytes] = []
        self._decoder = Decoder()
        # Decoded blocks that left the table unchanged; emptied whenever it changes.
        self._header_cache: dict[bytes, list[tuple[str, str]]] = {}
        # A header block being continued: (stream id, fragments, end_stream).
        self._continuing: tuple[int, list[bytes], bool] | None = None
        self.streams: dict[int, Stream] = {}
        self._blocked: set[Stream] = set()
        self.last_stream_id = 0
        self.peer_initial_window = 65535
        self.peer_max_frame = 16384
        self.send_window = 65535
        self._received = 0  # connection bytes since our last WINDOW_UPDATE
        self._closing = False

    # -- asyncio.Protocol ---------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.server.connections.add(self)
        settings = b"".join(
            (
                _SETTING.pack(SETTINGS_MAX_CONCURRENT_STREAMS, MAX_STREAMS_PER_CONNECTION),
                _SETTING.pack(SETTINGS_INITIAL_WINDOW_SIZE, MAX_WINDOW),
                _SETTING.pack(SETTINGS_MAX_FRAME_SIZE, OUR_MAX_FRAME_SIZE),
            )
        )
        self.write(frame(SETTINGS, 0, 0, settings))
        self.write(frame(WINDOW_UPDATE, 0, 0, _U32.pack(MAX_WINDOW - 65535)))

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        self._closing = True
        streams, self.streams = self.streams, {}
        for stream in streams.values():
            stream.local_closed = True
            if stream.task is not None and not stream.task.done():
                stream.task.cancel()  # Envoy is gone: the request was cut
            stream.end_remote()

    def data_received(self, data: bytes) -> None:
        buf = self._waiting.join(data)
        if buf is None:
            return
        try:
            pos = self._frames(buf)
        except ProtocolError as exc:
            log.warning("closing an HTTP/2 connection from Envoy: %s", exc)
            self.close(exc.code)
            return
        if pos < len(buf):
            rest = buf[pos:]
            if not self._preface:
                need = len(PREFACE)
            elif len(rest) >= 9:
                high, low = _FRAME.unpack_from(rest)[:2]
                length = (high << 8) | low
                # Too large: parsed (and refused) with the next bytes, not gathered.
                need = 9 + length if length <= OUR_MAX_FRAME_SIZE else 9
            else:
                need = 9
            self._waiting.keep(rest, need)

    # -- writing ------------------------------------------------------------------
    def write(self, data: bytes) -> None:
        out = self._out
        if not out:
            self.loop.call_soon(self._flush)
        out.append(data)

    def _flush(self) -> None:
        out = self._out
        if not out:
            return
        self._out = []
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        transport.write(out[0] if len(out) == 1 else b"".join(out))

    def response_headers(self, stream_id: int) -> bytes:
        return frame(HEADERS, END_HEADERS, stream_id, _RESPONSE_HEADERS)

    def header_frames(self, stream_id: int, block: bytes, end_stream: bool) -> bytes:
        flags = END_STREAM if end_stream else 0
        limit = self.peer_max_frame
        if len(block) <= limit:
            return frame(HEADERS, flags | END_HEADERS, stream_id, block)
        parts = [frame(HEADERS, flags, stream_id, block[:limit])]
        for start in range(limit, len(block), limit):
            last = start + limit >= len(block)
            parts.append(
                frame(CONTINUATION, END_HEADERS if last else 0, stream_id, block[start:][:limit])
            )
        return b"".join(parts)

    def pump(self, stream: Stream) -> None:
        """Send what the windows allow of ``stream``'s waiting DATA, then its trailers."""
        pending = stream.pending
        while pending:
            n = min(len(pending), stream.send_window, self.send_window, self.peer_max_frame)
            if n <= 0:
                self._blocked.add(stream)
                return
            self.write(frame(DATA, 0, stream.id, bytes(pending[:n])))
            del pending[:n]
            stream.send_window -= n
            self.send_window -= n
        self._blocked.discard(stream)
        trailers = stream.pending_trailers
        if trailers is not None:
            stream.pending_trailers = None
            self.write(trailers)
            self.stream_done(stream)

    def stream_done(self, stream: Stream) -> None:
        """We have ended ``stream``; forget it once the peer has too (Envoy ends or
        resets its side when it sees our trailers; anything it sends later is dropped)."""
        if stream.remote_closed:
            self.streams.pop(stream.id, None)

    def _remote_ended(self, stream: Stream) -> None:
        """The peer has ended ``stream``; forget it once we have too."""
        stream.end_remote()
        if stream.local_closed:
            self.streams.pop(stream.id, None)

    def close(self, code: int = NO_ERROR) -> None:
        if self._closing:
            return
        self._closing = True
        self.write(frame(GOAWAY, 0, 0, _U32.pack(self.last_stream_id) + _U32.pack(code)))
        self._flush()
        if self.transport is not None:
            self.transport.close()

    # -- reading ------------------------------------------------------------------
    def _frames(self, buf: bytes) -> int:
        pos, end = 0, len(buf)
        if not self._preface:
            if end < len(PREFACE):
                if not PREFACE.startswith(buf):
                    raise ProtocolError("not an HTTP/2 connection preface")
                return 0
            if not buf.startswith(PREFACE):
                raise ProtocolError("not an HTTP/2 connection preface")
            self._preface = True
            pos = len(PREFACE)
        unpack = _FRAME.unpack_from
        while end - pos >= 9:
            high, low, kind, flags, stream_id = unpack(buf, pos)
            length = (high << 8) | low
            if length > OUR_MAX_FRAME_SIZE:
                raise ProtocolError(f"a frame of {length} bytes", FRAME_SIZE_ERROR)
            start = pos + 9
            if end - start < length:
                break
            pos = start + length
            stream_id &= 0x7FFFFFFF
            if kind == DATA:
                self._on_data(stream_id, flags, buf[start:pos])
            elif kind == HEADERS:
                self._on_headers(stream_id, flags, buf[start:pos])
            elif kind == CONTINUATION:
                self._on_continuation(stream_id, flags, buf[start:pos])
            elif self._continuing is not None:
                raise ProtocolError("a frame inside a header block")
            elif kind == RST_STREAM:
                self._on_reset(stream_id)
            elif kind == WINDOW_UPDATE:
                self._on_window_update(stream_id, buf[start:pos])
            elif kind == SETTINGS:
                self._on_settings(stream_id, flags, buf[start:pos])
            elif kind == PING:
                if not flags & ACK:
                    if length != 8:
                        raise ProtocolError("a PING of other than 8 bytes", FRAME_SIZE_ERROR)
                    self.write(frame(PING, ACK, 0, buf[start:pos]))
            elif kind == GOAWAY:
                if not self.streams:
                    self.close()
            elif kind == PUSH_PROMISE:
                raise ProtocolError("PUSH_PROMISE from a client")
            # PRIORITY and unknown frame types: ignored.
        return pos

    @staticmethod
    def _unpad(flags: int, payload: bytes) -> bytes:
        if flags & PADDED:
            if not payload:
                raise ProtocolError("padding without its length")
            pad = payload[0]
            if pad >= len(payload):
                raise ProtocolError("padding longer than the frame")
            return payload[1 : len(payload) - pad]
        return payload

    def _on_data(self, stream_id: int, flags: int, payload: bytes) -> None:
        if stream_id == 0:
            raise ProtocolError("DATA on stream 0")
        size = len(payload)
        self._received += size
        if self._received >= WINDOW_TOP_UP:
            self.write(frame(WINDOW_UPDATE, 0, 0, _U32.pack(self._received)))
            self._received = 0
        stream = self.streams.get(stream_id)
        if stream is None:
            return  # a stream we have ended (or reset): its late data is dropped
        if flags & PADDED:
            payload = self._unpad(flags, payload)
        stream.received += size
        if stream.received >= WINDOW_TOP_UP and not flags & END_STREAM:
            self.write(frame(WINDOW_UPDATE, 0, stream_id, _U32.pack(stream.received)))
            stream.received = 0
        if stream.remote_closed:
            return  # DATA after the peer's END_STREAM: a broken stream, dropped
        if payload:
            stream.feed(payload)
        if flags & END_STREAM:
            self._remote_ended(stream)

    def _on_headers(self, stream_id: int, flags: int, payload: bytes) -> None:
        if stream_id == 0:
            raise ProtocolError("HEADERS on stream 0")
        payload = self._unpad(flags, payload)
        if flags & PRIORITY_FLAG:
            payload = payload[5:]
        if flags & END_HEADERS:
            self._header_block(stream_id, payload, bool(flags & END_STREAM))
        else:
            if len(payload) > MAX_HEADER_BLOCK_BYTES:
                raise ProtocolError("a header block too large")
            self._continuing = (stream_id, [payload], bool(flags & END_STREAM))

    def _on_continuation(self, stream_id: int, flags: int, payload: bytes) -> None:
        continuing = self._continuing
        if continuing is None or continuing[0] != stream_id:
            raise ProtocolError("CONTINUATION without its HEADERS")
        continuing[1].append(payload)
        if sum(map(len, continuing[1])) > MAX_HEADER_BLOCK_BYTES:
            raise ProtocolError("a header block too large (CONTINUATION)")
        if flags & END_HEADERS:
            self._continuing = None
            self._header_block(stream_id, b"".join(continuing[1]), continuing[2])

    def _headers(self, block: bytes) -> list[tuple[str, str]]:
        """The block's headers. Envoy's encoder indexes what it sends, so after the
        first stream its blocks are mostly references into the dynamic table: a block
        whose decoding left the table unchanged decodes the same way for as long as the
        table stays unchanged (the cache is emptied when it changes)."""
        cached = self._header_cache.get(block)
        if cached is not None:
            return cached
        table = self._decoder.header_table
        entries = table.dynamic_entries
        before = (len(entries), entries[0] if entries else None, table.maxsize)
        try:
            headers = cast(list[tuple[str, str]], self._decoder.decode(block))
        except (HPACKError, UnicodeDecodeError, ValueError) as exc:
            raise ProtocolError(f"a header block that cannot be decoded ({exc})") from exc
        entries = table.dynamic_entries
        if (len(entries), entries[0] if entries else None, table.maxsize) != before:
            self._header_cache.clear()
        else:
            if len(self._header_cache) >= HEADER_CACHE_SIZE:
                self._header_cache.clear()
            self._header_cache[block] = headers
        return headers

    def _header_block(self, stream_id: int, block: bytes, end_stream: bool) -> None:
        headers = self._headers(block)  # always decoded: the table must follow Envoy's
        stream = self.streams.get(stream_id)
        if stream is not None:  # trailers (Envoy's gRPC client sends none; accepted)
            if not end_stream:
                raise ProtocolError(f"trailers without END_STREAM on stream {stream_id}")
            self._remote_ended(stream)
            return
        if stream_id % 2 == 0 or stream_id <= self.last_stream_id:
            if stream_id % 2 == 0:
                raise ProtocolError(f"a client stream with the even id {stream_id}")
            return  # a stream already ended: late trailers, ignored
        self.last_stream_id = stream_id
        stream = Stream(self, stream_id, headers)
        if end_stream:
            stream.remote_closed = True
        if self._closing or self.server.closing:
            self.write(frame(RST_STREAM, 0, stream_id, _U32.pack(REFUSED_STREAM)))
            return
        path = ""
        for name, value in headers:
            if name == ":path":
                path = value
                break
        handler = self.server.handlers.get(path)
        self.streams[stream_id] = stream
        if handler is None:
            stream.finish(GRPC_UNIMPLEMENTED, f"unknown method {path}")
            return
        stream.task = self.loop.create_task(self.server.run(handler, stream))

    def _on_reset(self, stream_id: int) -> None:
        stream = self.streams.pop(stream_id, None)
        if stream is None:
            return
        self._blocked.discard(stream)
        stream.pending.clear()
        stream.pending_trailers = None
        stream.end_remote()
        if not stream.local_closed:
            stream.local_closed = True  # nothing more may be sent on it
            task = stream.task
            if task is not None and not task.done():
                task.cancel()

    def _on_window_update(self, stream_id: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise ProtocolError("a WINDOW_UPDATE of other than 4 bytes", FRAME_SIZE_ERROR)
        increment = _U32.unpack(payload)[0] & 0x7FFFFFFF
        if stream_id == 0:
            self.send_window += increment
            if self.send_window > MAX_WINDOW:
                raise ProtocolError("connection window above 2^31-1", FLOW_CONTROL_ERROR)
            for blocked in list(self._blocked):
                self.pump(blocked)
            return
        stream = self.streams.get(stream_id)
        if stream is None:
            return
        stream.send_window += increment
        if stream in self._blocked:
            self.pump(stream)

    def _on_settings(self, stream_id: int, flags: int, payload: bytes) -> None:
        if stream_id != 0:
            raise ProtocolError("SETTINGS on a stream")
        if flags & ACK:
            return
        if len(payload) % 6:
            raise ProtocolError("SETTINGS of a length not a multiple of 6", FRAME_SIZE_ERROR)
        for offset in range(0, len(payload), 6):
            ident, value = _SETTING.unpack_from(payload, offset)
            if ident == SETTINGS_INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise ProtocolError("initial window above 2^31-1", FLOW_CONTROL_ERROR)
                delta = value - self.peer_initial_window
                self.peer_initial_window = value
                for stream in self.streams.values():
                    stream.send_window += delta
            elif ident == SETTINGS_MAX_FRAME_SIZE:
                if not 16384 <= value <= 2**24 - 1:
                    raise ProtocolError(f"SETTINGS_MAX_FRAME_SIZE {value}")
                self.peer_max_frame = value
        self.write(frame(SETTINGS, ACK, 0))
        for stream in list(self._blocked):
            self.pump(stream)


class _Health(HealthState):
    """``grpc.health.v1.Health`` on this server's streams."""

    async def _request(self, stream: Stream) -> Any:
        data = await stream.recv()
        return None if data is None else health_pb2.HealthCheckRequest.FromString(data)

    async def check(self, stream: Stream) -> None:
        request = await self._request(stream)
        if request is None or request.service not in self.SERVICES:
            stream.finish(GRPC_NOT_FOUND, "unknown service")
            return
        response = health_pb2.HealthCheckResponse(status=self.status())
        stream.send_message(response.SerializeToString())
        stream.finish()

    async def watch(self, stream: Stream) -> None:
        request = await self._request(stream)
        if request is None or request.service not in self.SERVICES:
            unknown = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
            stream.send_message(health_pb2.HealthCheckResponse(status=unknown).SerializeToString())
            stream.finish()
            return
        while not stream.local_closed:
            changed = self.changed
            response = health_pb2.HealthCheckResponse(status=self.status())
            stream.send_message(response.SerializeToString())
            await changed.wait()


class H2GrpcServer:
    """The ext_proc service and gRPC health on the gateway's own HTTP/2 server."""

    def __init__(self, servicer: ExternalProcessor) -> None:
        self._servicer = servicer
        self._health = _Health()
        self.handlers: dict[str, Handler] = {
            METHOD: self._process,
            "/grpc.health.v1.Health/Check": self._health.check,
            "/grpc.health.v1.Health/Watch": self._health.watch,
        }
        self.connections: set[_Connection] = set()
        self.closing = False
        self.open_streams = 0
        self.idle = asyncio.Event()  # set while no handler runs
        self.idle.set()
        self._listener: asyncio.AbstractServer | None = None
        self.port = 0

    async def _process(self, stream: Stream) -> None:
        responses = cast(
            AsyncGenerator[pb.ProcessingResponse, None],
            self._servicer.Process(stream, cast(Any, stream)),
        )
        # aclosing: a cancel while an answer is being made still runs the servicer's
        # cleanup (usage of a cut stream) now, not at garbage collection.
        async with contextlib.aclosing(responses):
            async for response in responses:
                stream.send_message(response.SerializeToString())

    async def run(self, handler: Handler, stream: Stream) -> None:
        self.open_streams += 1
        self.idle.clear()
        try:
            await handler(stream)
            stream.finish()
        except asyncio.CancelledError:
            pass  # Envoy reset the stream or the connection went away
        except StreamError as exc:
            stream.finish(exc.status, str(exc))
        except Exception:
            log.exception("gRPC handler failed on stream %d", stream.id)
            stream.finish(GRPC_INTERNAL, "internal error")
        finally:
            self.open_streams -= 1
            if not self.open_streams:
                self.idle.set()

    async def start(self, host: str, port: int) -> int:
        loop = asyncio.get_running_loop()
        self._listener = await loop.create_server(
            lambda: _Connection(self), host, port, reuse_address=True, backlog=1024
        )
        sockets = self._listener.sockets
        self.port = sockets[0].getsockname()[1] if sockets else 0
        self._health.set(True)
        return self.port

    async def stop(self, grace: float) -> None:
        """Stop accepting, let open streams finish for up to ``grace`` s, cancel the rest."""
        self._health.set(False)
        if self._listener is not None:
            self._listener.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.idle.wait(), grace)
        self.closing = True
        for conn in list(self.connections):
            for stream in list(conn.streams.values()):
                if stream.task is not None and not stream.task.done():
                    stream.task.cancel()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.idle.wait(), 1.0)
        for conn in list(self.connections):
            conn.close()
        if self._listener is not None:
            await self._listener.wait_closed()

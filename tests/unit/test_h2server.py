"""The gateway's own HTTP/2 gRPC server (``ext_proc/server/h2server.py``), spoken to by an
independent HTTP/2 implementation (the ``h2`` library as the client) over a real socket,
and by hand-made frames where a client library would not send them (CONTINUATION,
compressed messages, a broken preface).

Envoy itself is the client in ``tests/e2e/test_grpc_servers.py`` and, the server being
the default, in the whole e2e suite.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from grpc_health.v1 import health_pb2
from hpack import Encoder

from ext_proc.server import h2server
from ext_proc.server.h2server import METHOD, H2GrpcServer


def grpc_message(message: Any) -> bytes:
    data = message.SerializeToString()
    return struct.pack(">BL", 0, len(data)) + data


def request(n: int) -> pb.ProcessingRequest:
    body = pb.HttpBody(body=b"x" * n, end_of_stream=True)
    return pb.ProcessingRequest(request_body=body)


class EchoServicer:
    """Answers each request with a response whose body mutation is the request's body
    and whose dynamic metadata carries the stream's ``x-tag`` metadata."""

    def __init__(self) -> None:
        self.seen_tags: list[str | None] = []
        self.cancelled = 0
        self.entered = asyncio.Event()
        self.hold: asyncio.Event | None = None

    async def Process(self, requests: AsyncIterator[pb.ProcessingRequest], context: Any):
        tags = dict(context.invocation_metadata())
        self.seen_tags.append(tags.get("x-tag"))
        self.entered.set()
        try:
            async for req in requests:
                if self.hold is not None:
                    await self.hold.wait()
                response = pb.ProcessingResponse()
                mutation = response.request_body.response.body_mutation
                mutation.body = req.request_body.body
                yield response
        except asyncio.CancelledError:
            self.cancelled += 1
            raise


class Client:
    """An h2 client connection to the server, with its events collected per stream."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        )
        self.events: list[h2.events.Event] = []
        self.data: dict[int, bytearray] = {}
        self.trailers: dict[int, dict[str, str]] = {}
        self.headers: dict[int, dict[str, str]] = {}
        self.reset: set[int] = set()
        self.closed = False

    @classmethod
    async def connect(cls, port: int, settings: dict[int, int] | None = None) -> Client:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        client = cls(reader, writer)
        client.conn.initiate_connection()
        if settings:
            client.conn.update_settings(settings)
        client.flush()
        return client

    def flush(self) -> None:
        self.writer.write(self.conn.data_to_send())

    def send(self, n: int, *, end: bool = True, **open_args: Any) -> int:
        """A new stream with one request of ``n`` body bytes (and its end, by default)."""
        sid = self.open(**open_args)
        self.conn.send_data(sid, grpc_message(request(n)), end_stream=end)
        self.flush()
        return sid

    def open(self, tag: str | None = None, path: str = METHOD) -> int:
        sid = self.conn.get_next_available_stream_id()
        headers = [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", path),
            (":authority", "ext_proc"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ]
        if tag is not None:
            headers.append(("x-tag", tag))
        self.conn.send_headers(sid, headers)
        return sid

    async def pump(self, until: Any, timeout: float = 5.0) -> None:
        """Read and handle events until ``until()`` is true."""
        async with asyncio.timeout(timeout):
            while not until():
                data = await self.reader.read(65536)
                if not data:
                    self.closed = True
                    if until():
                        return
                    raise ConnectionError("server closed the connection")
                for event in self.conn.receive_data(data):
                    self.events.append(event)
                    if isinstance(event, h2.events.DataReceived):
                        self.data.setdefault(event.stream_id, bytearray()).extend(event.data)
                        self.conn.acknowledge_received_data(
                            event.flow_controlled_length, event.stream_id
                        )
                    elif isinstance(event, h2.events.ResponseReceived):
                        self.headers[event.stream_id] = dict(event.headers)
                    elif isinstance(event, h2.events.TrailersReceived):
                        self.trailers[event.stream_id] = dict(event.headers)
                    elif isinstance(event, h2.events.StreamReset):
                        self.reset.add(event.stream_id)
                self.flush()

    def messages(self, sid: int) -> list[pb.ProcessingResponse]:
        data, out, pos = bytes(self.data.get(sid, b"")), [], 0
        while pos < len(data):
            flag, n = struct.unpack_from(">BL", data, pos)
            assert flag == 0
            out.append(pb.ProcessingResponse.FromString(data[pos + 5 : pos + 5 + n]))
            pos += 5 + n
        return out

    def grpc_status(self, sid: int) -> str | None:
        trailers = self.trailers.get(sid)
        if trailers is None:  # a trailers-only answer comes as the response headers
            trailers = self.headers.get(sid, {}) if self._ended(sid) else {}
        return trailers.get("grpc-status")

    def _ended(self, sid: int) -> bool:
        return any(isinstance(e, h2.events.StreamEnded) and e.stream_id == sid for e in self.events)

    def close(self) -> None:
        self.writer.close()


@pytest.fixture
async def served() -> AsyncIterator[tuple[H2GrpcServer, EchoServicer]]:
    servicer = EchoServicer()
    server = H2GrpcServer(servicer)  # type: ignore[arg-type]
    await server.start("127.0.0.1", 0)
    try:
        yield server, servicer
    finally:
        await server.stop(0.5)


async def test_one_message_in_one_answer_out_and_the_stream_is_forgotten(served) -> None:
    server, servicer = served
    client = await Client.connect(server.port)
    sid = client.send(10, tag="a")
    await client.pump(lambda: client.grpc_status(sid) is not None)
    assert client.headers[sid][":status"] == "200"
    assert client.headers[sid]["content-type"] == "application/grpc"
    assert client.grpc_status(sid) == "0"
    [answer] = client.messages(sid)
    assert answer.request_body.response.body_mutation.body == b"x" * 10
    assert servicer.seen_tags == ["a"]
    await asyncio.sleep(0.05)
    [conn] = server.connections
    assert conn.streams == {}  # both sides ended: nothing kept
    assert server.open_streams == 0
    client.close()


async def test_messages_split_across_frames_joined_and_padding_removed(served) -> None:
    server, _ = served
    client = await Client.connect(server.port)
    sid = client.open()
    wire = grpc_message(request(3000)) + grpc_message(request(7))
    client.conn.send_data(sid, wire[:4], pad_length=9)  # not even the prefix yet
    client.conn.send_data(sid, wire[4:2000])
    client.conn.send_data(sid, wire[2000:], end_stream=True, pad_length=3)
    client.flush()
    await client.pump(lambda: client.grpc_status(sid) is not None)
    bodies = [m.request_body.response.body_mutation.body for m in client.messages(sid)]
    assert bodies == [b"x" * 3000, b"x" * 7]
    assert client.grpc_status(sid) == "0"
    client.close()


async def test_a_large_message_in_many_small_frames_both_ways(served) -> None:
    """3 MB in 16 KiB DATA frames in (gathered, not re-joined per frame), the same
    3 MB out through the client's 64 KiB window (sent as it opens)."""
    server, _ = served
    client = await Client.connect(server.port)
    # The server's SETTINGS and WINDOW_UPDATE open its windows to 2^31-1.
    await client.pump(lambda: client.conn.outbound_flow_control_window > 2**30)
    sid = client.open()
    wire = grpc_message(request(3_000_000))
    for start in range(0, len(wire), 16384):
        client.conn.send_data(sid, wire[start : start + 16384])
        client.flush()
    client.conn.end_stream(sid)
    client.flush()
    await client.pump(lambda: client.grpc_status(sid) is not None, timeout=20)
    [answer] = client.messages(sid)
    assert answer.request_body.response.body_mutation.body == b"x" * 3_000_000
    assert client.grpc_status(sid) == "0"
    client.close()


async def test_many_streams_on_one_connection_each_with_its_own_metadata(served) -> None:
    """Repeated header blocks hit the decoded-block cache; a changed value adds a table
    entry (the cache must not answer with stale headers)."""
    server, servicer = served
    client = await Client.connect(server.port)
    tags = ["a", "a", "b", "a", "b", "c", "c", "a"]
    sids = []
    for tag in tags:
        sid = client.send(1, tag=tag)
        sids.append(sid)
        await client.pump(lambda sid=sid: client.grpc_status(sid) is not None)
    assert servicer.seen_tags == tags
    assert all(client.grpc_status(sid) == "0" for sid in sids)
    client.close()


async def test_unknown_method_is_a_trailers_only_unimplemented(served) -> None:
    server, _ = served
    client = await Client.connect(server.port)
    sid = client.send(1, path="/no.Such/Method")
    await client.pump(lambda: client._ended(sid) or sid in client.reset)
    assert client.headers[sid]["grpc-status"] == "12"
    assert "/no.Such/Method" in client.headers[sid]["grpc-message"]
    client.close()


async def test_a_reset_from_the_client_cancels_the_handler(served) -> None:
    server, servicer = served
    servicer.hold = asyncio.Event()  # the handler waits with the request in hand
    client = await Client.connect(server.port)
    sid = client.send(1, end=False)
    await asyncio.wait_for(servicer.entered.wait(), 5)
    await asyncio.sleep(0.05)
    assert server.open_streams == 1
    client.conn.reset_stream(sid, error_code=8)  # CANCEL
    client.flush()
    await asyncio.wait_for(server.idle.wait(), 5)
    assert servicer.cancelled == 1
    assert server.open_streams == 0
    [conn] = server.connections
    assert conn.streams == {}
    client.close()


async def test_the_peers_small_window_is_respected_and_trailers_wait_for_the_data(
    served,
) -> None:
    server, _ = served
    client = await Client.connect(
        server.port, settings={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 100}
    )
    sid = client.send(5000)
    await client.pump(lambda: client.grpc_status(sid) is not None)
    [answer] = client.messages(sid)
    assert answer.request_body.response.body_mutation.body == b"x" * 5000
    data_frames = [
        e for e in client.events if isinstance(e, h2.events.DataReceived) and e.stream_id == sid
    ]
    assert len(data_frames) > 1  # sent as the window opened, 100 bytes at a time at first
    assert max(len(e.data) for e in data_frames) <= 5100
    assert client.grpc_status(sid) == "0"
    client.close()


async def test_ping_is_answered(served) -> None:
    server, _ = served
    client = await Client.connect(server.port)
    client.conn.ping(b"12345678")
    client.flush()
    await client.pump(lambda: any(isinstance(e, h2.events.PingAckReceived) for e in client.events))
    [ack] = [e for e in client.events if isinstance(e, h2.events.PingAckReceived)]
    assert ack.ping_data == b"12345678"
    client.close()


def raw_frame(kind: int, flags: int, sid: int, payload: bytes) -> bytes:
    return h2server.frame(kind, flags, sid, payload)


async def raw_exchange(port: int, frames: bytes) -> bytes:
    """Send the preface, SETTINGS and ``frames``; return all the server sent back until
    it closed the connection or 1 s passed."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(h2server.PREFACE + raw_frame(h2server.SETTINGS, 0, 0, b"") + frames)
    received = bytearray()
    try:
        async with asyncio.timeout(1.0):
            while data := await reader.read(65536):
                received += data
    except (TimeoutError, ConnectionResetError):
        # Reset: the server closed with our bytes unread (the kernel's RST may also
        # discard its last frames: callers that need those send nothing unread).
        pass
    writer.close()
    return bytes(received)


def parse_frames(data: bytes) -> list[tuple[int, int, int, bytes]]:
    out, pos = [], 0
    while pos + 9 <= len(data):
        high, low, kind, flags, sid = struct.unpack_from(">HBBBL", data, pos)
        n = (high << 8) | low
        out.append((kind, flags, sid, data[pos + 9 : pos + 9 + n]))
        pos += 9 + n
    return out


def request_headers_block(extra: list[tuple[str, str]] = ()) -> bytes:  # type: ignore[assignment]
    return Encoder().encode(
        [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", METHOD),
            (":authority", "ext_proc"),
            ("content-type", "application/grpc"),
            *extra,
        ]
    )


async def test_headers_continued_in_continuation_frames(served) -> None:
    server, servicer = served
    block = request_headers_block([("x-tag", "t" * 300)])
    frames = (
        raw_frame(h2server.HEADERS, 0, 1, block[:10])
        + raw_frame(h2server.CONTINUATION, 0, 1, block[10:100])
        + raw_frame(h2server.CONTINUATION, h2server.END_HEADERS, 1, block[100:])
        + raw_frame(h2server.DATA, h2server.END_STREAM, 1, grpc_message(request(2)))
    )
    received = parse_frames(await raw_exchange(server.port, frames))
    assert servicer.seen_tags == ["t" * 300]
    ends = [f for f in received if f[0] == h2server.HEADERS and f[1] & h2server.END_STREAM]
    assert len(ends) == 1 and ends[0][2] == 1


async def test_a_compressed_message_is_refused_as_unimplemented(served) -> None:
    server, _ = served
    data = request(2).SerializeToString()
    frames = raw_frame(h2server.HEADERS, h2server.END_HEADERS, 1, request_headers_block())
    frames += raw_frame(
        h2server.DATA, h2server.END_STREAM, 1, struct.pack(">BL", 1, len(data)) + data
    )
    received = parse_frames(await raw_exchange(server.port, frames))
    [trailers] = [f for f in received if f[0] == h2server.HEADERS and f[1] & h2server.END_STREAM]
    assert b"grpc-status\x0212" in trailers[3]  # "12": UNIMPLEMENTED


async def test_not_http2_is_closed_with_goaway(served) -> None:
    server, _ = served
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    async with asyncio.timeout(2.0):
        data = await reader.read()  # until the server closes
    writer.close()
    kinds = [f[0] for f in parse_frames(data)]
    assert h2server.GOAWAY in kinds
    [goaway] = [f for f in parse_frames(data) if f[0] == h2server.GOAWAY]
    assert struct.unpack(">L", goaway[3][4:8])[0] == h2server.PROTOCOL_ERROR


async def test_health_check_over_the_same_server(served) -> None:
    server, _ = served
    client = await Client.connect(server.port)
    sid = client.open(path="/grpc.health.v1.Health/Check")
    client.conn.send_data(
        sid, grpc_message(health_pb2.HealthCheckRequest(service="")), end_stream=True
    )
    client.flush()
    await client.pump(lambda: client.grpc_status(sid) is not None)
    data = bytes(client.data[sid])
    answer = health_pb2.HealthCheckResponse.FromString(data[5:])
    assert answer.status == health_pb2.HealthCheckResponse.SERVING
    client.close()


async def held_stream() -> tuple[H2GrpcServer, EchoServicer, Client, int]:
    """A server of its own whose handler holds one stream's request until ``hold``."""
    servicer = EchoServicer()
    servicer.hold = asyncio.Event()
    server = H2GrpcServer(servicer)  # type: ignore[arg-type]
    await server.start("127.0.0.1", 0)
    client = await Client.connect(server.port)
    sid = client.send(4)
    await asyncio.wait_for(servicer.entered.wait(), 5)
    return server, servicer, client, sid


async def test_stop_lets_an_open_stream_finish_within_the_grace() -> None:
    server, servicer, client, sid = await held_stream()
    assert servicer.hold is not None
    stopping = asyncio.create_task(server.stop(5.0))
    await asyncio.sleep(0.1)
    assert not stopping.done()  # waiting for the open stream
    servicer.hold.set()
    await client.pump(lambda: client.grpc_status(sid) is not None)
    assert client.grpc_status(sid) == "0"
    await asyncio.wait_for(stopping, 5)
    assert servicer.cancelled == 0
    client.close()


async def test_stop_cancels_what_outlives_the_grace() -> None:
    server, servicer, client, _ = await held_stream()  # hold never set
    await asyncio.wait_for(server.stop(0.2), 5)
    assert servicer.cancelled == 1
    assert server.open_streams == 0
    client.close()


def test_our_header_blocks_decode_with_a_standard_decoder() -> None:
    from hpack import Decoder

    decoder = Decoder()
    assert decoder.decode(h2server._RESPONSE_HEADERS) == [
        (":status", "200"),
        ("content-type", "application/grpc"),
    ]
    block = h2server.trailers_block(13, "bad\n thing é" + "x" * 200)
    decoded = dict(decoder.decode(block))
    assert decoded["grpc-status"] == "13"
    assert decoded["grpc-message"] == "bad%0A thing %C3%A9" + "x" * 200
    assert decoder.header_table.dynamic_entries == type(decoder.header_table.dynamic_entries)()


async def test_a_message_announced_too_large_is_refused_before_it_is_gathered(served) -> None:
    server, _ = served
    announced = h2server.MAX_MESSAGE_BYTES + 1
    frames = raw_frame(h2server.HEADERS, h2server.END_HEADERS, 1, request_headers_block())
    # Only the prefix and a little of the body: the answer must not wait for the rest.
    frames += raw_frame(h2server.DATA, 0, 1, struct.pack(">BL", 0, announced) + b"x" * 100)
    received = parse_frames(await raw_exchange(server.port, frames))
    [trailers] = [f for f in received if f[0] == h2server.HEADERS and f[1] & h2server.END_STREAM]
    assert b"grpc-status\x018" in trailers[3]  # RESOURCE_EXHAUSTED
    assert str(announced).encode() in trailers[3]
    assert server.open_streams == 0


async def test_an_endless_header_block_closes_the_connection(served) -> None:
    server, servicer = served
    frames = raw_frame(h2server.HEADERS, 0, 1, request_headers_block())
    for _ in range(10):
        frames += raw_frame(h2server.CONTINUATION, 0, 1, b"\x00" * 16000)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(h2server.PREFACE + raw_frame(h2server.SETTINGS, 0, 0, b"") + frames)
    # The server closes it (EOF, or a reset since our frames are unread); were it to
    # keep gathering, the timeout would fail the test.
    with contextlib.suppress(ConnectionResetError):
        async with asyncio.timeout(2.0):
            while await reader.read(65536):
                pass
    writer.close()
    assert servicer.seen_tags == []  # no stream was started
    await asyncio.sleep(0.05)
    assert not server.connections  # and the server let the connection go

"""ext_proc.http.server over real sockets: framing, keep-alive, streaming, errors.

The server runs on its own event loop in a thread (both the stock asyncio loop and
uvloop), and the tests talk to it with plain blocking sockets, so what is checked is
exactly what goes over the wire.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
import uvloop

from ext_proc.http import AbortConnection, Handler, HttpServer, Request, Response

TIMEOUT = 10.0


@dataclass
class State:
    """What the handler saw and did, shared with the test thread."""

    gate: asyncio.Event | None = None  # created on the server loop
    stream_closed: threading.Event = field(default_factory=threading.Event)
    produced: int = 0
    requests: list[Request] = field(default_factory=list)


def make_handler(state: State) -> Handler:
    async def handler(request: Request) -> Response:
        state.requests.append(request)
        path = request.path
        if path == "/hello":
            return Response(200, [("content-type", "text/plain")], b"hello")
        if path == "/echo":
            payload = {
                "method": request.method,
                "path": request.path,
                "query": request.query,
                "headers": request.headers,
                "body": request.body.decode(),
            }
            return Response(200, [("content-type", "application/json")], orjson.dumps(payload))
        if path == "/boom":
            raise RuntimeError("handler exploded")
        if path == "/framing":
            # The server owns framing: a wrong Content-Length from the handler is dropped.
            return Response(200, [("Content-Length", "999"), ("x-ok", "1")], b"abc")
        if path == "/stream":
            return Response(200, [("content-type", "text/event-stream")], gated_stream(state))
        if path == "/abort":
            return Response(200, [], aborted_stream())
        if path == "/forever":
            return Response(200, [], endless_stream(state))
        if path == "/big":
            return Response(200, [], big_stream(state))
        if path == "/broken-stream":
            return Response(200, [], broken_stream())
        return Response(404, [], b"not found")

    return handler


async def gated_stream(state: State) -> AsyncIterator[bytes]:
    state.gate = asyncio.Event()
    yield b"one"
    await state.gate.wait()
    yield b""  # empty items are skipped: an empty chunk would end the body
    yield b"two"


async def aborted_stream() -> AsyncIterator[bytes]:
    yield b"partial"
    raise AbortConnection


async def endless_stream(state: State) -> AsyncIterator[bytes]:
    try:
        yield b"tick"
        await asyncio.Event().wait()
        yield b"never"
    finally:
        state.stream_closed.set()


BIG_CHUNK = 1024 * 1024
BIG_COUNT = 64


async def big_stream(state: State) -> AsyncIterator[bytes]:
    block = b"x" * BIG_CHUNK
    for _ in range(BIG_COUNT):
        state.produced += 1
        yield block


async def broken_stream() -> AsyncIterator[bytes]:
    yield b"start"
    raise ValueError("stream failed")


class ServerThread:
    """An HttpServer on its own loop in a daemon thread."""

    def __init__(self, loop_factory: Callable[[], asyncio.AbstractEventLoop], **kwargs: Any):
        self.state = State()
        self.loop = loop_factory()
        self.server = HttpServer(make_handler(self.state), **kwargs)
        self.port = 0
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._ready.wait(TIMEOUT), "server did not start"

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.port = self.loop.run_until_complete(self.server.start("127.0.0.1", 0))
        self._ready.set()
        self.loop.run_forever()
        self.loop.close()

    def call(self, fn: Callable[[], object]) -> None:
        self.loop.call_soon_threadsafe(fn)

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        asyncio.run_coroutine_threadsafe(self.server.close(), self.loop).result(TIMEOUT)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(TIMEOUT)


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes
    chunks: list[bytes] | None  # the chunk framing, for chunked bodies


class Client:
    """A blocking HTTP/1.1 client that exposes the framing it reads."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        self.buf = b""

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def request(self, method: str, path: str, body: bytes = b"", headers: str = "") -> None:
        head = f"{method} {path} HTTP/1.1\r\nhost: test\r\n{headers}"
        if body:
            head += f"content-length: {len(body)}\r\n"
        self.send(head.encode() + b"\r\n" + body)

    def _fill(self) -> bool:
        data = self.sock.recv(1 << 20)
        self.buf += data
        return bool(data)

    def read_until(self, sep: bytes) -> bytes:
        while sep not in self.buf:
            if not self._fill():
                raise EOFError(f"connection closed before {sep!r}; got {self.buf!r}")
        out, self.buf = self.buf.split(sep, 1)
        return out

    def read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not self._fill():
                raise EOFError(f"connection closed after {len(self.buf)} of {n} bytes")
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def read_head(self) -> tuple[int, dict[str, str]]:
        lines = self.read_until(b"\r\n\r\n").decode("latin-1").split("\r\n")
        version, status, _ = lines[0].split(" ", 2)
        assert version == "HTTP/1.1"
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, value = line.split(":", 1)
            assert name.lower() not in headers, f"duplicate header {name}"
            headers[name.lower()] = value.strip()
        return int(status), headers

    def read_chunk(self) -> bytes | None:
        """The next chunk's data; None for the terminating chunk."""
        size = int(self.read_until(b"\r\n"), 16)
        data = self.read_exact(size)
        assert self.read_exact(2) == b"\r\n"
        return data if size else None

    def read_response(self, method: str = "GET") -> RawResponse:
        status, headers = self.read_head()
        if method == "HEAD":
            return RawResponse(status, headers, b"", None)
        if headers.get("transfer-encoding") == "chunked":
            assert "content-length" not in headers
            chunks: list[bytes] = []
            while (chunk := self.read_chunk()) is not None:
                chunks.append(chunk)
            return RawResponse(status, headers, b"".join(chunks), chunks)
        return RawResponse(status, headers, self.read_exact(int(headers["content-length"])), None)

    def at_eof(self) -> bool:
        """Whether the server closed the connection (blocks up to the timeout for data)."""
        if self.buf:
            return False
        try:
            return not self._fill()
        except ConnectionResetError:
            return True


@pytest.fixture(params=["asyncio", "uvloop"])
def loop_factory(request: pytest.FixtureRequest) -> Callable[[], asyncio.AbstractEventLoop]:
    return asyncio.new_event_loop if request.param == "asyncio" else uvloop.new_event_loop


@pytest.fixture
def make_server(
    loop_factory: Callable[[], asyncio.AbstractEventLoop],
) -> Iterator[Callable[..., ServerThread]]:
    started: list[ServerThread] = []

    def make(**kwargs: Any) -> ServerThread:
        server = ServerThread(loop_factory, **kwargs)
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


@pytest.fixture
def server(make_server: Callable[..., ServerThread]) -> ServerThread:
    return make_server()


@pytest.fixture
def client(server: ServerThread) -> Iterator[Client]:
    c = Client(server.port)
    yield c
    c.close()


def test_keep_alive_serves_requests_on_one_connection(client: Client) -> None:
    for _ in range(3):
        client.request("GET", "/hello")
        response = client.read_response()
        assert response.status == 200
        assert response.body == b"hello"
        assert response.headers["content-length"] == "5"
        assert response.headers["content-type"] == "text/plain"
        assert response.headers["date"].endswith("GMT")
        assert "connection" not in response.headers


def test_request_fields_reach_the_handler(client: Client) -> None:
    client.request(
        "POST",
        "/echo?a=1&b=%20x",
        body=b'{"k": 1}',
        headers="X-Thing: one\r\nx-thing: two\r\nContent-Type: application/json\r\n",
    )
    response = client.read_response()
    echoed = orjson.loads(response.body)
    assert echoed["method"] == "POST"
    assert echoed["path"] == "/echo"
    assert echoed["query"] == "a=1&b=%20x"
    assert echoed["headers"]["x-thing"] == "one, two"
    assert echoed["headers"]["content-type"] == "application/json"
    assert echoed["body"] == '{"k": 1}'


def test_chunked_request_body_is_reassembled(client: Client) -> None:
    client.send(
        b"POST /echo HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    )
    assert orjson.loads(client.read_response().body)["body"] == "hello world"


def test_pipelined_requests_are_answered_in_order(client: Client) -> None:
    client.send(
        b"".join(f"GET /echo?n={i} HTTP/1.1\r\nhost: t\r\n\r\n".encode() for i in range(1, 41))
    )
    queries = [orjson.loads(client.read_response().body)["query"] for _ in range(40)]
    assert queries == [f"n={i}" for i in range(1, 41)]


def test_connection_close_is_honoured(client: Client) -> None:
    client.request("GET", "/hello", headers="Connection: close\r\n")
    response = client.read_response()
    assert response.status == 200
    assert response.headers["connection"] == "close"
    assert client.at_eof()


def test_http_1_0_closes_unless_keep_alive(server: ServerThread) -> None:
    client = Client(server.port)
    client.send(b"GET /hello HTTP/1.0\r\n\r\n")
    response = client.read_response()
    assert response.body == b"hello"
    assert client.at_eof()
    client.close()


def test_head_gets_length_without_body(client: Client) -> None:
    client.request("HEAD", "/hello")
    response = client.read_response("HEAD")
    assert response.headers["content-length"] == "5"
    client.request("GET", "/hello")  # nothing stray was left on the wire
    assert client.read_response().body == b"hello"


def test_server_owns_framing_headers(client: Client) -> None:
    client.request("GET", "/framing")
    response = client.read_response()
    assert response.headers["content-length"] == "3"
    assert response.headers["x-ok"] == "1"
    assert response.body == b"abc"


def test_streaming_body_flushes_each_item_as_a_chunk(server: ServerThread) -> None:
    client = Client(server.port)
    client.request("GET", "/stream")
    status, headers = client.read_head()
    assert status == 200
    assert headers["transfer-encoding"] == "chunked"
    assert "content-length" not in headers
    # The generator is now blocked on the gate: "one" must have arrived on its own.
    assert client.read_chunk() == b"one"
    state = server.state
    assert state.gate is not None
    server.call(state.gate.set)
    assert client.read_chunk() == b"two"
    assert client.read_chunk() is None
    client.request("GET", "/hello")  # the connection is reusable after a stream
    assert client.read_response().body == b"hello"
    client.close()


def test_abort_connection_cuts_the_stream(server: ServerThread) -> None:
    client = Client(server.port)
    client.request("GET", "/abort")
    status, _ = client.read_head()
    assert status == 200
    assert client.read_chunk() == b"partial"
    assert client.at_eof()  # no terminating chunk
    client.close()
    again = Client(server.port)
    again.request("GET", "/hello")
    assert again.read_response().body == b"hello"
    again.close()


def test_failing_stream_ends_the_body_early_and_is_logged(
    server: ServerThread, caplog: pytest.LogCaptureFixture
) -> None:
    client = Client(server.port)
    with caplog.at_level(logging.ERROR, logger="ext_proc.http.server"):
        client.request("GET", "/broken-stream")
        client.read_head()
        assert client.read_chunk() == b"start"
        assert client.at_eof()
    assert any(r.exc_info and "stream failed" in str(r.exc_info[1]) for r in caplog.records)
    client.close()


def test_client_disconnect_closes_the_stream_iterator(server: ServerThread) -> None:
    client = Client(server.port)
    client.request("GET", "/forever")
    client.read_head()
    assert client.read_chunk() == b"tick"
    client.close()
    assert server.state.stream_closed.wait(TIMEOUT)


def test_server_close_closes_open_streams(make_server: Callable[..., ServerThread]) -> None:
    server = make_server()
    client = Client(server.port)
    client.request("GET", "/forever")
    client.read_head()
    assert client.read_chunk() == b"tick"
    server.stop()
    assert server.state.stream_closed.is_set()
    assert client.at_eof()
    client.close()


def test_stream_respects_back_pressure(server: ServerThread) -> None:
    client = Client(server.port)
    client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    client.request("GET", "/big")
    client.read_head()
    received = 0
    for read in range(1, BIG_COUNT + 1):
        chunk = client.read_chunk()
        assert chunk is not None
        received += len(chunk)
        # Without flow control the generator would run to the end before the first read;
        # with it, it stays within socket buffers' worth of the reader.
        assert server.state.produced <= read + 16, (read, server.state.produced)
    assert client.read_chunk() is None
    assert received == BIG_CHUNK * BIG_COUNT
    client.close()


def test_body_over_the_limit_gets_413(make_server: Callable[..., ServerThread]) -> None:
    server = make_server(max_body_bytes=100)
    client = Client(server.port)
    client.request("POST", "/echo", body=b"x" * 101)
    response = client.read_response()
    assert response.status == 413
    assert response.headers["connection"] == "close"
    assert orjson.loads(response.body)["error"]["message"] == "request body too large"
    assert client.at_eof()
    client.close()
    assert server.state.requests == []

    chunked = Client(server.port)
    chunked.send(
        b"POST /echo HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n"
        + b"40\r\n"
        + b"y" * 64
        + b"\r\n"
        + b"40\r\n"
        + b"y" * 64
        + b"\r\n"
    )
    assert chunked.read_response().status == 413
    chunked.close()

    within = Client(server.port)
    within.request("POST", "/echo", body=b"x" * 100)
    assert within.read_response().status == 200
    within.close()


def test_malformed_request_gets_400(server: ServerThread) -> None:
    client = Client(server.port)
    client.send(b"THIS IS NOT HTTP\r\n\r\n")
    response = client.read_response()
    assert response.status == 400
    assert response.headers["connection"] == "close"
    assert client.at_eof()
    client.close()


def test_requests_before_a_malformed_one_are_answered(client: Client) -> None:
    client.send(b"GET /hello HTTP/1.1\r\nhost: t\r\n\r\nGET /x HTTP/1.1\r\nbad header\r\n\r\n")
    assert client.read_response().body == b"hello"
    assert client.read_response().status == 400


def test_handler_exception_gives_500_and_server_keeps_serving(
    client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="ext_proc.http.server"):
        client.request("GET", "/boom")
        response = client.read_response()
    assert response.status == 500
    assert orjson.loads(response.body)["error"]["type"] == "server_error"
    failures = [(r.getMessage(), r.exc_info[1]) for r in caplog.records if r.exc_info]
    assert len(failures) == 1
    message, error = failures[0]
    assert "GET /boom" in message
    assert isinstance(error, RuntimeError) and str(error) == "handler exploded"
    client.request("GET", "/hello")  # same connection still works
    assert client.read_response().body == b"hello"


def test_upgrade_request_is_answered_as_http_1_1_then_closed(client: Client) -> None:
    client.send(
        b"GET /hello HTTP/1.1\r\nhost: t\r\nconnection: Upgrade, HTTP2-Settings\r\n"
        b"upgrade: h2c\r\nhttp2-settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"
    )
    response = client.read_response()
    assert response.status == 200
    assert response.body == b"hello"
    assert response.headers["connection"] == "close"
    assert client.at_eof()


def test_expect_100_continue(client: Client) -> None:
    client.send(
        b"POST /echo HTTP/1.1\r\nhost: t\r\ncontent-length: 4\r\nexpect: 100-continue\r\n\r\n"
    )
    assert client.read_until(b"\r\n\r\n") == b"HTTP/1.1 100 Continue"
    client.send(b"ping")
    assert orjson.loads(client.read_response().body)["body"] == "ping"


def test_idle_connections_are_closed(make_server: Callable[..., ServerThread]) -> None:
    server = make_server(idle_timeout=0.2)
    client = Client(server.port)
    client.request("GET", "/hello")
    assert client.read_response().status == 200
    assert client.at_eof()  # recv blocks (bounded by the socket timeout) until the close
    client.close()

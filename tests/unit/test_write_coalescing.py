"""Writes gathered per event-loop pass: the gRPC connection's frames (grpclib) and the
lean Redis client's commands leave in one socket write, in order, and nothing is
written to a connection that is gone."""

from __future__ import annotations

import asyncio
from typing import Any

from ext_proc.server.grpclib_transport import _CoalescingTransport
from ext_proc.stores.resp import RespClient, _Protocol, pack


class _Transport:
    """The part of an asyncio transport these writers use, recording each write."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closing = False

    def write(self, data: bytes) -> None:
        assert not self.closing, "written after close"
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 1)}.get(name, default)


async def _next_pass() -> None:
    await asyncio.sleep(0)
    await asyncio.sleep(0)


async def test_grpc_frames_of_one_pass_leave_in_one_write() -> None:
    raw = _Transport()
    transport = _CoalescingTransport(raw)  # type: ignore[arg-type]
    transport.write(b"headers")
    transport.write(b"")
    transport.write(b"data")
    transport.write(b"trailers")
    assert raw.writes == []
    await _next_pass()
    assert raw.writes == [b"headersdatatrailers"]
    transport.write(b"next")
    await _next_pass()
    assert raw.writes == [b"headersdatatrailers", b"next"]
    assert transport.get_extra_info("peername") == ("127.0.0.1", 1)


async def test_grpc_close_sends_what_is_pending_first() -> None:
    raw = _Transport()
    transport = _CoalescingTransport(raw)  # type: ignore[arg-type]
    transport.write(b"goaway")
    transport.close()
    assert raw.writes == [b"goaway"] and raw.closing and transport.is_closing()
    await _next_pass()  # the queued flush finds nothing to send
    assert raw.writes == [b"goaway"]


async def test_grpc_nothing_is_written_to_a_closed_connection() -> None:
    raw = _Transport()
    transport = _CoalescingTransport(raw)  # type: ignore[arg-type]
    transport.write(b"late")
    raw.closing = True  # the peer went away before the pass ended
    await _next_pass()
    assert raw.writes == []


async def test_redis_commands_of_one_pass_leave_in_one_write_and_get_their_replies() -> None:
    raw = _Transport()
    protocol = _Protocol()
    protocol.connection_made(raw)  # type: ignore[arg-type]
    client = RespClient("redis://127.0.0.1:1")
    client._protocol = protocol
    calls = [asyncio.ensure_future(client.execute_command("GET", key)) for key in ("a", "b", "c")]
    await _next_pass()
    assert raw.writes == [pack(("GET", "a")) + pack(("GET", "b")) + pack(("GET", "c"))]
    protocol.data_received(b"$1\r\nA\r\n$1\r\nB\r\n$1\r\nC\r\n")
    assert await asyncio.gather(*calls) == [b"A", b"B", b"C"]


async def test_redis_commands_queued_on_a_failed_connection_are_not_written() -> None:
    raw = _Transport()
    protocol = _Protocol()
    protocol.connection_made(raw)  # type: ignore[arg-type]
    client = RespClient("redis://127.0.0.1:1")
    client._protocol = protocol
    call = asyncio.ensure_future(client.execute_command("GET", "a"))
    await asyncio.sleep(0)  # the command is queued, not yet written
    protocol.connection_lost(ConnectionResetError("gone"))
    await _next_pass()
    assert raw.writes == []
    assert call.done() and call.exception() is not None

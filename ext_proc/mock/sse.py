"""Bodies of the mock: timing knobs, cut-after, and server-sent-event framing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence

import orjson

from ext_proc.http import AbortConnection, Response
from ext_proc.mock.knobs import Knobs

SSE_HEADERS = (("content-type", "text/event-stream; charset=utf-8"), ("cache-control", "no-cache"))


def data_event(payload: object) -> bytes:
    """An OpenAI-style event: ``data: {json}`` and a blank line."""
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def named_event(name: bytes, payload: object) -> bytes:
    """An Anthropic-style event: ``event: NAME``, ``data: {json}`` and a blank line."""
    return b"event: " + name + b"\ndata: " + orjson.dumps(payload) + b"\n\n"


async def sleep_ms(ms: int) -> None:
    if ms > 0:
        await asyncio.sleep(ms / 1000)


async def stream_events(
    knobs: Knobs,
    head: Sequence[bytes],
    contents: Sequence[str],
    frame: Callable[[str], bytes],
    tail: Sequence[bytes],
) -> AsyncIterator[bytes]:
    """``head`` events, one framed event per content chunk, then ``tail``.

    ``ttft_ms`` delays the first event, ``chunk_delay_ms`` separates content events and
    ``cut_after`` aborts the connection after that many content events (the head is
    sent; nothing after the cut is).

    Content event *i* is due ``i * chunk_delay_ms`` after the first, on the mock's own
    clock (like a model generating tokens): a busy event loop delays an event but the
    delays do not add up over a long stream, so a 30 s stream of 600 chunks takes 30 s
    while the mock keeps up (``python -m bench --open-streams`` relies on it).
    """
    await sleep_ms(knobs.ttft_ms)
    for event in head:
        yield event
    cut_after = knobs.cut_after
    delay = knobs.chunk_delay_ms / 1000
    loop = asyncio.get_running_loop()
    first = loop.time()
    for i, text in enumerate(contents):
        if cut_after is not None and i >= cut_after:
            raise AbortConnection
        if i and delay > 0:
            wait = first + i * delay - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
        yield frame(text)
    if cut_after is not None:
        raise AbortConnection
    for event in tail:
        yield event


async def truncated(body: bytes) -> AsyncIterator[bytes]:
    """Half of a JSON body, then the connection is cut (``x-mock-cut-after`` without stream)."""
    yield body[: len(body) // 2]
    raise AbortConnection


def json_response(headers: list[tuple[str, str]], payload: bytes, knobs: Knobs) -> Response:
    """A 200 with a JSON body: whole, or ``truncated`` when ``x-mock-cut-after`` is set."""
    if knobs.cut_after is not None:
        return Response(200, headers, truncated(payload))
    return Response(200, headers, payload)

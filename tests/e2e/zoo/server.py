"""The provider zoo: a fake LLM upstream whose answers imitate real providers' quirks.

The gateway's own mock (``ext_proc/mock``) is honest and tidy; real providers are not.
Each request names the quirk it wants in the ``x-zoo`` header (app headers pass through
the gateway to the provider), and the zoo answers with exactly those bytes: odd or
missing content-types, compressed bodies nobody asked for, chunked transfer, CRLF event
framing, a UTF-8 character split across two TCP writes, usage in an unusual place or not
at all, Azure's content-filter chunks, Anthropic's event sequence with its placeholder
``output_tokens: 1``, bodies cut mid-way, silence past the gateway's timeout.

HTTP/1.1 is written by hand over asyncio streams (no framework could be made to send
these bytes), in a thread with its own event loop, so a test session can run it beside
its own loop. Connections are kept alive between requests, as Envoy's pool expects.

Everything the zoo received is recorded (``ZooServer.received``) so tests can check
what reached the "provider": its credential, never the gateway's key.

The numbers every usage report carries are distinctive (``OPENAI_USAGE`` ...), so a test
can tell the provider's numbers from the gateway's estimate. The texts are known to the
tests, which count the expected estimates from them.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import itertools
import json
import re
import struct
import threading
import time
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from email.utils import formatdate
from typing import Any
from urllib.parse import parse_qsl

try:  # optional: the br case is skipped without it
    import brotli  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - depends on the environment
    brotli = None

# --------------------------------------------------------------------------- what it says

OPENAI_MODEL = "gpt-4o-mini-2024-07-18"  # what "gpt-4o-mini" answers as
AZURE_MODEL = "gpt-4o-2024-11-20"  # what the Azure deployment "gpt-4o-prod" answers as
EMBEDDING_MODEL = "text-embedding-3-small"
CLAUDE_MODEL = "claude-sonnet-4-20250514"

TEXT = "The zoo keeper counts every token: zebras, otters and one very patient tortoise."
TEXT_2 = "A second keeper disagrees: there are two tortoises, both of them very patient."
# Multi-byte characters of 2, 3 and 4 bytes; the stream case splits the 4-byte one.
TEXT_UTF8 = "Café crème for the okapi, 漢字 and a 🦓 too."
SPLIT_CHAR = "🦓"
TOOL_NAME = "get_weather"
TOOL_ARGS = '{"city": "Paris", "unit": "celsius"}'
LARGE_TEXT = "zoo " * (512 * 1024)  # 2 MiB of content

# Streams cut (by the zoo) or held (until the app cancels) after this many text deltas.
CUT_AFTER = 3

PROMPT, COMPLETION, CACHED, REASONING = 37, 23, 11, 5
OPENAI_USAGE: dict[str, Any] = {
    "prompt_tokens": PROMPT,
    "completion_tokens": COMPLETION,
    "total_tokens": PROMPT + COMPLETION,
    "prompt_tokens_details": {"cached_tokens": CACHED, "audio_tokens": 0},
    "completion_tokens_details": {
        "reasoning_tokens": REASONING,
        "audio_tokens": 0,
        "accepted_prediction_tokens": 0,
        "rejected_prediction_tokens": 0,
    },
}
EMBEDDING_USAGE: dict[str, Any] = {"prompt_tokens": PROMPT, "total_tokens": PROMPT}
# Anthropic reports cache reads and writes beside input_tokens: the prompt is their sum.
A_INPUT, A_CACHE_READ, A_CACHE_CREATION, A_OUTPUT = 29, 11, 7, 23
ANTHROPIC_USAGE: dict[str, Any] = {
    "input_tokens": A_INPUT,
    "cache_creation_input_tokens": A_CACHE_CREATION,
    "cache_read_input_tokens": A_CACHE_READ,
    "output_tokens": A_OUTPUT,
    "service_tier": "standard",
}
ANTHROPIC_PROMPT = A_INPUT + A_CACHE_READ + A_CACHE_CREATION  # 47

PROVIDER_500 = {
    "error": {
        "message": "The server had an error while processing your request. Sorry about that!",
        "type": "server_error",
        "param": None,
        "code": None,
    }
}


def pieces(text: str) -> list[str]:
    """How the zoo streams a text: word by word, each with its leading space."""
    return re.findall(r"\s*\S+", text)


TOOL_ARG_PIECES = [
    '{"',
    "city",
    '":',
    ' "',
    "Paris",
    '",',
    ' "',
    "unit",
    '":',
    ' "',
    "celsius",
    '"}',
]
assert "".join(TOOL_ARG_PIECES) == TOOL_ARGS

# ------------------------------------------------------------------------- what it heard


@dataclass
class Received:
    """One request as the zoo read it off the wire."""

    case: str
    method: str
    target: str  # path with query string
    headers: dict[str, str]  # lower-cased names
    body: bytes
    peer_closed: bool = False  # the gateway went away before the answer ended

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]

    @property
    def query(self) -> dict[str, str]:
        return dict(parse_qsl(self.target.partition("?")[2]))

    def json(self) -> Any:
        return json.loads(self.body)


# ----------------------------------------------------------------------------- the wire

CUT = object()  # close the connection here (FIN), mid-answer
HOLD = object()  # send nothing more until the gateway closes the connection
PEER_WAIT_S = 10.0  # bound on HOLD and on the silent case


class Reply:
    """Raw writes to one connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def head(self, status: int, reason: str, headers: list[tuple[str, str]]) -> None:
        lines = [f"HTTP/1.1 {status} {reason}", f"Date: {formatdate(usegmt=True)}"]
        lines += [f"{name}: {value}" for name, value in headers]
        await self.send(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))

    async def chunk(self, data: bytes) -> None:
        if data:  # an empty chunk would end the body
            await self.send(f"{len(data):x}\r\n".encode() + data + b"\r\n")

    async def end_chunks(self) -> None:
        await self.send(b"0\r\n\r\n")

    def cut(self) -> None:
        self.writer.close()

    async def wait_peer_close(self, timeout: float = PEER_WAIT_S) -> bool:
        """Until the other side closes the connection (True) or ``timeout`` passes."""
        try:
            async with asyncio.timeout(timeout):
                while await self.reader.read(65536):
                    pass
        except TimeoutError:
            return False
        return True


_ids = itertools.count(1)


def _new_id(prefix: str) -> str:
    return f"{prefix}zoo{next(_ids):06d}"


def openai_headers(content_type: str | None, *extra: tuple[str, str]) -> list[tuple[str, str]]:
    headers = [("Content-Type", content_type)] if content_type is not None else []
    return [
        *headers,
        ("x-request-id", _new_id("req_")),  # OpenAI's own id: never the gateway's
        ("openai-processing-ms", "321"),
        ("openai-version", "2020-10-01"),
        *extra,
    ]


def anthropic_headers(content_type: str) -> list[tuple[str, str]]:
    return [
        ("Content-Type", content_type),
        ("request-id", _new_id("req_011")),
        ("anthropic-organization-id", "b6a3d2f0-zoo"),
    ]


async def send_json(
    reply: Reply,
    obj: Any,
    *,
    status: int = 200,
    reason: str = "OK",
    content_type: str | None = "application/json",
    encoding: str | None = None,
    chunked: bool = False,
    indent: int | None = 2,
    anthropic: bool = False,
) -> bool:
    body = json.dumps(obj, indent=indent, ensure_ascii=False).encode()
    extra: list[tuple[str, str]] = []
    if encoding == "gzip":
        body = gzip.compress(body)
    elif encoding == "deflate":
        body = zlib.compress(body)  # HTTP's "deflate" is the zlib format
    elif encoding == "br":
        assert brotli is not None
        body = brotli.compress(body)
    if encoding:
        extra.append(("Content-Encoding", encoding))
    if anthropic:
        headers = anthropic_headers(content_type or "application/json")
    else:
        headers = openai_headers(content_type)
    if not chunked:
        await reply.head(status, reason, [*headers, *extra, ("Content-Length", str(len(body)))])
        await reply.send(body)
        return True
    await reply.head(status, reason, [*headers, *extra, ("Transfer-Encoding", "chunked")])
    step = max(1, len(body) // 4)
    for start in range(0, len(body), step):
        await reply.chunk(body[start : start + step])
    await reply.end_chunks()
    return True


Step = bytes | float | object  # bytes: one write (one HTTP chunk); float: pause; CUT, HOLD


async def send_stream(
    reply: Reply,
    received: Received,
    steps: list[Step],
    *,
    content_type: str | None = "text/event-stream; charset=utf-8",
    anthropic: bool = False,
    gzip_events: bool = False,
) -> bool:
    """A chunked answer, one HTTP chunk per ``bytes`` step (each its own TCP write).

    ``gzip_events``: the body gzip-compressed, unasked, each event sync-flushed so it
    is readable as it arrives (what a compressing proxy in front of a model server does).
    """
    headers = anthropic_headers(content_type or "") if anthropic else openai_headers(content_type)
    if gzip_events:
        headers.append(("Content-Encoding", "gzip"))
    compressor = zlib.compressobj(wbits=31) if gzip_events else None
    await reply.head(
        200, "OK", [*headers, ("Cache-Control", "no-cache"), ("Transfer-Encoding", "chunked")]
    )
    for step in steps:
        if isinstance(step, bytes):
            if compressor is not None:
                step = compressor.compress(step) + compressor.flush(zlib.Z_SYNC_FLUSH)
            await reply.chunk(step)
        elif isinstance(step, float):
            await asyncio.sleep(step)
        elif step is CUT:
            reply.cut()
            return False
        elif step is HOLD:
            received.peer_closed = await reply.wait_peer_close()
            return False
    if compressor is not None:
        await reply.chunk(compressor.flush())
    await reply.end_chunks()
    return True


# ------------------------------------------------------------------------ OpenAI shapes


def chat_completion(
    message: dict[str, Any] | None = None,
    *,
    choices: list[dict[str, Any]] | None = None,
    usage: dict[str, Any] | None = OPENAI_USAGE,
    model: str = OPENAI_MODEL,
    **extra: Any,
) -> dict[str, Any]:
    if choices is None:
        message = message or {"role": "assistant", "content": TEXT}
        choices = [_choice(0, message)]
    obj: dict[str, Any] = {
        "id": _new_id("chatcmpl-"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
    }
    if usage is not None:
        obj["usage"] = usage
    obj["service_tier"] = "default"
    obj["system_fingerprint"] = "fp_zoo"
    obj.update(extra)
    return obj


def _choice(index: int, message: dict[str, Any], finish: str = "stop") -> dict[str, Any]:
    full = {"refusal": None, "annotations": [], **message}
    return {"index": index, "message": full, "logprobs": None, "finish_reason": finish}


def tool_call_message() -> dict[str, Any]:
    return {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_zoo1",
                "type": "function",
                "function": {"name": TOOL_NAME, "arguments": TOOL_ARGS},
            }
        ],
    }


def data(obj: Any, newline: bytes = b"\n") -> bytes:
    return (
        b"data: "
        + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()
        + newline
        + newline
    )


DONE = b"data: [DONE]\n\n"


class ChunkMaker:
    """``chat.completion.chunk`` objects of one stream (shared id, created, model)."""

    def __init__(self, model: str, with_usage: bool, **extra: Any) -> None:
        self.base: dict[str, Any] = {
            "id": _new_id("chatcmpl-"),
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model,
            "service_tier": "default",
            "system_fingerprint": "fp_zoo",
            **extra,
        }
        self.with_usage = with_usage  # OpenAI adds "usage": null to every chunk then

    def __call__(
        self, delta: dict[str, Any], finish: str | None = None, index: int = 0, **choice: Any
    ) -> dict[str, Any]:
        obj = {
            **self.base,
            "choices": [
                {
                    "index": index,
                    "delta": delta,
                    "logprobs": None,
                    "finish_reason": finish,
                    **choice,
                }
            ],
        }
        if self.with_usage:
            obj["usage"] = None
        return obj

    def usage(self) -> dict[str, Any]:
        return {**self.base, "choices": [], "usage": OPENAI_USAGE}


def wants_usage(received: Received) -> bool:
    """Like OpenAI and Azure: a usage chunk only when the request asked for one."""
    try:
        options = received.json().get("stream_options")
    except (ValueError, AttributeError):
        return False
    return isinstance(options, dict) and options.get("include_usage") is True


def text_stream(
    received: Received,
    text: str = TEXT,
    *,
    usage: bool | None = None,
    model: str = OPENAI_MODEL,
    newline: bytes = b"\n",
) -> list[bytes]:
    """The plain OpenAI stream: role chunk, one chunk per word, finish, usage, [DONE]."""
    usage = wants_usage(received) if usage is None else usage
    make = ChunkMaker(model, usage)
    events = [data(make({"role": "assistant", "content": "", "refusal": None}), newline)]
    events += [data(make({"content": piece}), newline) for piece in pieces(text)]
    events.append(data(make({}, "stop"), newline))
    if usage:
        events.append(data(make.usage(), newline))
    events.append(b"data: [DONE]" + newline + newline)
    return events


def tool_stream(received: Received, *, usage: bool | None) -> list[bytes]:
    usage = wants_usage(received) if usage is None else usage
    make = ChunkMaker(OPENAI_MODEL, usage)
    first = {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "index": 0,
                "id": "call_zoo1",
                "type": "function",
                "function": {"name": TOOL_NAME, "arguments": ""},
            }
        ],
        "refusal": None,
    }
    events = [data(make(first))]
    events += [
        data(make({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}))
        for piece in TOOL_ARG_PIECES
    ]
    events.append(data(make({}, "tool_calls")))
    if usage:
        events.append(data(make.usage()))
    events.append(DONE)
    return events


_FILTER_OK = {
    "hate": {"filtered": False, "severity": "safe"},
    "self_harm": {"filtered": False, "severity": "safe"},
    "sexual": {"filtered": False, "severity": "safe"},
    "violence": {"filtered": False, "severity": "safe"},
}
_PROMPT_FILTER = [
    {
        "prompt_index": 0,
        "content_filter_results": {
            **_FILTER_OK,
            "jailbreak": {"filtered": False, "detected": False},
        },
    }
]


# ---------------------------------------------------------------------- Anthropic shapes


def named(event: str, obj: Any) -> bytes:
    return (
        f"event: {event}\ndata: "
        + json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
        + "\n\n"
    ).encode()


def anthropic_message(*, usage: bool = True) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "id": _new_id("msg_01"),
        "type": "message",
        "role": "assistant",
        "model": CLAUDE_MODEL,
        "content": [{"type": "text", "text": TEXT}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
    }
    if usage:
        obj["usage"] = ANTHROPIC_USAGE
    return obj


def anthropic_head() -> list[bytes]:
    start_usage = {**ANTHROPIC_USAGE, "output_tokens": 1}  # the placeholder, never final
    message = {
        "id": _new_id("msg_01"),
        "type": "message",
        "role": "assistant",
        "model": CLAUDE_MODEL,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": start_usage,
    }
    return [
        named("message_start", {"type": "message_start", "message": message}),
        named(
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            },
        ),
        named("ping", {"type": "ping"}),
    ]


def anthropic_deltas(texts: list[str]) -> list[bytes]:
    return [
        named(
            "content_block_delta",
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": t}},
        )
        for t in texts
    ]


def anthropic_tail() -> list[bytes]:
    return [
        named("content_block_stop", {"type": "content_block_stop", "index": 0}),
        named(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {k: v for k, v in ANTHROPIC_USAGE.items() if k != "service_tier"},
            },
        ),
        named("message_stop", {"type": "message_stop"}),
    ]


# ------------------------------------------------------------------------------- cases

Handler = Callable[[Reply, Received], Awaitable[bool]]  # True: keep the connection


@dataclass(frozen=True)
class Case:
    family: str  # chat | azure-chat | embeddings | messages: where it must arrive
    handler: Handler
    about: str = ""


CASES: dict[str, Case] = {}


def case(name: str, family: str = "chat", about: str = "") -> Callable[[Handler], Handler]:
    def register(handler: Handler) -> Handler:
        CASES[name] = Case(family, handler, about)
        return handler

    return register


def _json_case(name: str, about: str, **options: Any) -> None:
    async def handler(reply: Reply, received: Received) -> bool:
        return await send_json(reply, chat_completion(), **options)

    case(name, about=about)(handler)


_json_case("json-plain", "application/json (the control)")
_json_case(
    "json-charset",
    "application/json; charset=utf-8",
    content_type="application/json; charset=utf-8",
)
_json_case("json-capital", "Application/JSON", content_type="Application/JSON")
_json_case("json-no-ct", "no content-type at all", content_type=None)
_json_case("json-gzip", "content-encoding gzip, unasked", encoding="gzip")
_json_case("json-deflate", "content-encoding deflate, unasked", encoding="deflate")
_json_case("json-chunked", "transfer-encoding chunked", chunked=True, indent=None)


@case("json-br", about="content-encoding br, unasked")
async def _json_br(reply: Reply, received: Received) -> bool:
    if brotli is None:
        return await send_json(
            reply,
            {"error": {"message": "zoo: brotli is not installed"}},
            status=501,
            reason="Not Implemented",
        )
    return await send_json(reply, chat_completion(), encoding="br")


@case("json-large", about="~2 MB of content")
async def _json_large(reply: Reply, received: Received) -> bool:
    message = {"role": "assistant", "content": LARGE_TEXT}
    return await send_json(reply, chat_completion(message), indent=None)


@case("json-no-usage", about="a text answer without usage")
async def _json_no_usage(reply: Reply, received: Received) -> bool:
    return await send_json(reply, chat_completion(usage=None))


@case("json-no-usage-tools", about="a tool-call-only answer without usage")
async def _json_no_usage_tools(reply: Reply, received: Received) -> bool:
    choices = [_choice(0, tool_call_message(), "tool_calls")]
    return await send_json(reply, chat_completion(choices=choices, usage=None))


@case("json-no-usage-n2", about="n: 2, two choices, without usage")
async def _json_no_usage_n2(reply: Reply, received: Received) -> bool:
    choices = [
        _choice(0, {"role": "assistant", "content": TEXT}),
        _choice(1, {"role": "assistant", "content": TEXT_2}),
    ]
    return await send_json(reply, chat_completion(choices=choices, usage=None))


@case("json-cut", about="a 200 whose body stops before the answer, then the connection closes")
async def _json_cut(reply: Reply, received: Received) -> bool:
    body = json.dumps(chat_completion(), indent=2).encode()
    cut_at = body.index(b'"choices"')  # nothing of the answer's text goes out
    await reply.head(
        200, "OK", [*openai_headers("application/json"), ("Content-Length", str(len(body)))]
    )
    await reply.send(body[:cut_at])
    reply.cut()
    return False


@case("error-500", about="the provider's own 500")
async def _error_500(reply: Reply, received: Received) -> bool:
    return await send_json(reply, PROVIDER_500, status=500, reason="Internal Server Error")


@case("silent", about="reads the request, answers nothing")
async def _silent(reply: Reply, received: Received) -> bool:
    received.peer_closed = await reply.wait_peer_close()
    return False


# --- OpenAI streams


@case("sse-capital", about="content-type Text/Event-Stream")
async def _sse_capital(reply: Reply, received: Received) -> bool:
    return await send_stream(
        reply, received, text_stream(received), content_type="Text/Event-Stream"
    )


@case("sse-gzip", about="a stream gzip-compressed, unasked, flushed per event")
async def _sse_gzip(reply: Reply, received: Received) -> bool:
    return await send_stream(reply, received, text_stream(received), gzip_events=True)


@case("sse-no-ct", about="a stream without content-type")
async def _sse_no_ct(reply: Reply, received: Received) -> bool:
    return await send_stream(reply, received, text_stream(received), content_type=None)


@case("sse-crlf", about="events framed with CRLF line endings")
async def _sse_crlf(reply: Reply, received: Received) -> bool:
    return await send_stream(reply, received, text_stream(received, newline=b"\r\n"))


@case("sse-split-utf8", about="a 4-byte UTF-8 character split across two TCP writes")
async def _sse_split_utf8(reply: Reply, received: Received) -> bool:
    steps: list[Step] = []
    needle = SPLIT_CHAR.encode()
    for event in text_stream(received, TEXT_UTF8):
        at = event.find(needle)
        if at < 0:
            steps.append(event)
        else:  # two writes, apart in time, so they reach the gateway as two chunks
            steps += [event[: at + 2], 0.05, event[at + 2 :]]
    return await send_stream(reply, received, steps)


@case("sse-usage-early", about="the usage chunk before the last choice chunks")
async def _sse_usage_early(reply: Reply, received: Received) -> bool:
    make = ChunkMaker(OPENAI_MODEL, True)
    words = pieces(TEXT)
    events = [data(make({"role": "assistant", "content": "", "refusal": None}))]
    events += [data(make({"content": w})) for w in words[:-1]]
    events.append(data(make.usage()))
    events += [data(make({"content": words[-1]})), data(make({}, "stop")), DONE]
    return await send_stream(reply, received, list(events))


@case("sse-n2", about="n: 2, interleaved choices")
async def _sse_n2(reply: Reply, received: Received) -> bool:
    usage = wants_usage(received)
    make = ChunkMaker(OPENAI_MODEL, usage)
    events = [
        data(make({"role": "assistant", "content": "", "refusal": None}, index=i)) for i in (0, 1)
    ]
    first, second = pieces(TEXT), pieces(TEXT_2)
    for a, b in itertools.zip_longest(first, second):
        if a is not None:
            events.append(data(make({"content": a}, index=0)))
        if b is not None:
            events.append(data(make({"content": b}, index=1)))
    events += [data(make({}, "stop", index=i)) for i in (0, 1)]
    if usage:
        events.append(data(make.usage()))
    events.append(DONE)
    return await send_stream(reply, received, list(events))


@case("sse-tools", about="a tool call streamed as deltas (usage as asked)")
async def _sse_tools(reply: Reply, received: Received) -> bool:
    return await send_stream(reply, received, list(tool_stream(received, usage=None)))


@case("sse-tools-no-usage", about="a tool call streamed as deltas, include_usage ignored")
async def _sse_tools_no_usage(reply: Reply, received: Received) -> bool:
    return await send_stream(reply, received, list(tool_stream(received, usage=False)))


@case("sse-no-usage", about="ignores stream_options.include_usage: no usage chunk")
async def _sse_no_usage(reply: Reply, received: Received) -> bool:
    return await send_stream(reply, received, list(text_stream(received, usage=False)))


@case("sse-done-linger", about="a complete stream whose body ends 0.4 s after [DONE]")
async def _sse_done_linger(reply: Reply, received: Received) -> bool:
    # The openai SDK drains 0.1 s after [DONE], then closes: it goes before the body ends.
    return await send_stream(reply, received, [*text_stream(received), 0.4])


@case("sse-cut", about="the provider closes the connection after CUT_AFTER deltas")
async def _sse_cut(reply: Reply, received: Received) -> bool:
    events = text_stream(received, usage=False)
    return await send_stream(reply, received, [*events[: 1 + CUT_AFTER], 0.05, CUT])


@case("sse-hold", about="CUT_AFTER deltas, then nothing until the app goes away")
async def _sse_hold(reply: Reply, received: Received) -> bool:
    events = text_stream(received)
    return await send_stream(reply, received, [*events[: 1 + CUT_AFTER], HOLD])


# --- Azure


@case("azure-json", "azure-chat", "Azure's JSON with prompt and content filter results")
async def _azure_json(reply: Reply, received: Received) -> bool:
    choice = _choice(0, {"role": "assistant", "content": TEXT})
    choice["content_filter_results"] = _FILTER_OK
    obj = chat_completion(choices=[choice], model=AZURE_MODEL, prompt_filter_results=_PROMPT_FILTER)
    return await send_json(reply, obj, content_type="application/json")


@case("azure-sse", "azure-chat", "Azure's stream: a first chunk with choices [] and model ''")
async def _azure_sse(reply: Reply, received: Received) -> bool:
    usage = wants_usage(received)
    first = {
        "choices": [],
        "created": 0,
        "id": "",
        "model": "",
        "object": "",
        "prompt_filter_results": _PROMPT_FILTER,
    }
    if usage:
        first["usage"] = None
    make = ChunkMaker(AZURE_MODEL, usage)
    events = [
        data(first),
        data(
            make({"content": "", "refusal": None, "role": "assistant"}, content_filter_results={})
        ),
    ]
    events += [data(make({"content": w}, content_filter_results=_FILTER_OK)) for w in pieces(TEXT)]
    events.append(data(make({}, "stop", content_filter_results={})))
    if usage:
        events.append(data(make.usage()))
    events.append(DONE)
    return await send_stream(reply, received, list(events))


# --- embeddings


@case("embeddings", "embeddings", "an embeddings answer (charset content-type)")
async def _embeddings(reply: Reply, received: Received) -> bool:
    vector = [0.0023064255, -0.009327292, 0.015797347, -0.0077780345]
    body = received.json()
    if body.get("encoding_format") == "base64":
        embedding: Any = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
    else:
        embedding = vector
    obj = {
        "object": "list",
        "data": [{"object": "embedding", "index": 0, "embedding": embedding}],
        "model": EMBEDDING_MODEL,
        "usage": EMBEDDING_USAGE,
    }
    return await send_json(reply, obj, content_type="application/json; charset=utf-8")


# --- Anthropic


@case("anthropic-json", "messages", "a message with cache reads and writes")
async def _anthropic_json(reply: Reply, received: Received) -> bool:
    return await send_json(reply, anthropic_message(), anthropic=True, indent=None)


@case("anthropic-json-no-usage", "messages", "a message without usage")
async def _anthropic_json_no_usage(reply: Reply, received: Received) -> bool:
    return await send_json(reply, anthropic_message(usage=False), anthropic=True, indent=None)


@case("anthropic-sse", "messages", "the full event sequence")
async def _anthropic_sse(reply: Reply, received: Received) -> bool:
    events = [*anthropic_head(), *anthropic_deltas(pieces(TEXT)), *anthropic_tail()]
    return await send_stream(reply, received, list(events), anthropic=True)


@case("anthropic-sse-gzip", "messages", "the full event sequence, gzip-compressed unasked")
async def _anthropic_sse_gzip(reply: Reply, received: Received) -> bool:
    events = [*anthropic_head(), *anthropic_deltas(pieces(TEXT)), *anthropic_tail()]
    return await send_stream(reply, received, list(events), anthropic=True, gzip_events=True)


@case("anthropic-sse-cut", "messages", "closed by the provider after CUT_AFTER deltas")
async def _anthropic_sse_cut(reply: Reply, received: Received) -> bool:
    events = [*anthropic_head(), *anthropic_deltas(pieces(TEXT)[:CUT_AFTER])]
    return await send_stream(reply, received, [*events, 0.05, CUT], anthropic=True)


@case("anthropic-sse-hold", "messages", "CUT_AFTER deltas, then nothing until the app goes away")
async def _anthropic_sse_hold(reply: Reply, received: Received) -> bool:
    events = [*anthropic_head(), *anthropic_deltas(pieces(TEXT)[:CUT_AFTER])]
    return await send_stream(reply, received, [*events, HOLD], anthropic=True)


_AZURE_PATH = re.compile(r"/openai/deployments/[^/]+/chat/completions")


def _at_home(family: str, received: Received) -> bool:
    path = received.path
    if family == "chat":
        return path == "/v1/chat/completions"
    if family == "azure-chat":
        return bool(_AZURE_PATH.fullmatch(path)) and "api-version" in received.query
    if family == "embeddings":
        return path == "/v1/embeddings"
    if family == "messages":
        return path == "/v1/messages"
    return False


# ------------------------------------------------------------------------------ server


class ZooServer:
    """The zoo on 127.0.0.1, on a free port, in a thread with its own event loop."""

    def __init__(self) -> None:
        self.port = 0
        self.received: list[Received] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def requests(self, marker: str) -> list[Received]:
        """What arrived carrying ``x-test-id: marker``."""
        return [r for r in list(self.received) if r.headers.get("x-test-id") == marker]

    # --- life cycle

    def start(self) -> None:
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            try:
                self._server = loop.run_until_complete(
                    asyncio.start_server(self._connection, "127.0.0.1", 0, limit=1 << 20)
                )
                self.port = self._server.sockets[0].getsockname()[1]
            except BaseException as exc:  # reported by start()
                failure.append(exc)
                ready.set()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                self._server.close()
                tasks = asyncio.all_tasks(loop)
                for task in tasks:
                    task.cancel()
                loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
                loop.close()

        self._thread = threading.Thread(target=run, name="provider-zoo", daemon=True)
        self._thread.start()
        if not ready.wait(10) or failure:
            raise RuntimeError(f"the zoo did not start: {failure}")

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._loop = self._thread = None

    # --- HTTP/1.1

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        reply = Reply(reader, writer)
        try:
            while True:
                received = await self._read_request(reader)
                if received is None:
                    break
                self.received.append(received)
                if not await self._answer(reply, received):
                    break
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    async def _read_request(self, reader: asyncio.StreamReader) -> Received | None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return None  # the connection closed between requests
        lines = head.decode("latin-1").split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if not line:
                continue
            name, _, value = line.partition(":")
            name, value = name.strip().lower(), value.strip()
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        if "chunked" in headers.get("transfer-encoding", "").lower():
            body = bytearray()
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    await reader.readuntil(b"\r\n")  # no trailers expected
                    break
                body += await reader.readexactly(size)
                await reader.readexactly(2)
            payload = bytes(body)
        else:
            payload = await reader.readexactly(int(headers.get("content-length", "0")))
        return Received(headers.get("x-zoo", ""), method, target, headers, payload)

    async def _answer(self, reply: Reply, received: Received) -> bool:
        if received.method == "GET" and received.path == "/healthz":
            return await send_json(reply, {"status": "ok"})
        found = CASES.get(received.case)
        if found is None:
            message = f"zoo: unknown x-zoo case {received.case!r}; known: {sorted(CASES)}"
            error = {
                "error": {
                    "message": message,
                    "type": "invalid_request_error",
                    "code": "zoo_unknown_case",
                }
            }
            return await send_json(reply, error, status=400, reason="Bad Request")
        if not _at_home(found.family, received):
            message = (
                f"zoo: case {received.case!r} ({found.family}) is not served at {received.target}"
            )
            error = {
                "error": {
                    "message": message,
                    "type": "invalid_request_error",
                    "code": "zoo_wrong_path",
                }
            }
            return await send_json(reply, error, status=404, reason="Not Found")
        return await found.handler(reply, received)

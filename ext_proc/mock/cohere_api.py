"""Cohere v2 Chat (``POST /v2/chat``) and Embed (``POST /v2/embed``) of the mock.

Shapes follow Cohere's API reference and its Python SDK's types, field for field: a chat
answer ``{"id", "finish_reason", "message": {"role", "content" | "tool_plan" +
"tool_calls"}, "usage": {"billed_units", "tokens"}}``; a stream of named SSE events
(``message-start``, ``content-start``, ``content-delta``..., ``content-end``, or
``tool-plan-delta``..., ``tool-call-start``, ``tool-call-delta``..., ``tool-call-end``;
then ``message-end`` with ``delta.finish_reason`` and ``delta.usage``); an embed answer
``{"id", "embeddings": {"float": [...]}, "texts", "meta": {"api_version",
"billed_units"}, "response_type"}``; errors ``{"id", "message"}``, including the answer to
``x-mock-status``.

Token counts are honest for the mock's stand-in tokenizer (Cohere's is not in tiktoken:
o200k_base, as for Anthropic). Billed input (what Cohere charges) is the text the caller
sent: each message's content (text parts; image parts as ``counting`` prices them), tool
plans, tool calls' names and arguments, and the compact JSON of ``tools``; the
``tokens`` count adds the prompt template Cohere wraps around it
(``TEMPLATE_TOKENS`` + ``TEMPLATE_TOKENS_PER_MESSAGE`` per message), which it does not
bill. Output: billed = the tokens generated; ``tokens`` adds the end-of-turn token.

Tool calls: a request with ``tools`` whose last message is not a tool result (and whose
``tool_choice`` is not ``NONE``) is answered by a call to its first tool, with a short
plan and arguments filled from the tool's required parameters; after a tool result the
model answers in text. Knobs (``x-mock-*``) work as for the other shapes: latency, TTFT,
chunks and their delay, cut-after (a stream cut after that many content events, a JSON
answer cut in half), completion length, forced error status, cached tokens (reported as
``usage.cached_tokens``).
"""

from __future__ import annotations

import hashlib
import struct
import uuid
from collections.abc import Callable
from typing import Any

import orjson

from ext_proc.http import Request, Response
from ext_proc.mock.counting import TokenCounter, count_for_body
from ext_proc.mock.errors import BadRequest
from ext_proc.mock.knobs import KnobError, Knobs, read_knobs
from ext_proc.mock.sse import SSE_HEADERS, json_response, named_event, sleep_ms, stream_events
from ext_proc.mock.text import CompletionWriter, split_chunks

# Cohere's tokenizer is not in tiktoken: o200k_base stands in (as for Anthropic).
COHERE_ENCODING = "o200k_base"
# The prompt template Cohere adds around the caller's text (counted in ``tokens``, not
# billed): a fixed preamble and a few tokens per message.
TEMPLATE_TOKENS = 64
TEMPLATE_TOKENS_PER_MESSAGE = 4
# The end-of-turn token each answer ends with (in ``tokens.output_tokens``, not billed).
END_OF_TURN_TOKENS = 1

DEFAULT_EMBEDDING_DIMENSIONS = 8
MAX_EMBEDDING_DIMENSIONS = 4096
MAX_TEXTS = 96  # Cohere's limit per embed call

_JSON_HEADER = ("content-type", "application/json")
_ROLES = frozenset({"system", "user", "assistant", "tool"})
_INPUT_TYPES = frozenset(
    {"search_document", "search_query", "classification", "clustering", "image"}
)


def cohere_error(status: int, message: str) -> Response:
    """Cohere's error body: ``{"id": ..., "message": ...}``."""
    body = {"id": str(uuid.uuid4()), "message": message}
    return Response(status, [_JSON_HEADER], orjson.dumps(body))


class CohereApi:
    """Answers Cohere's v2 chat and embed calls (``handle``), with its own error shape."""

    paths = frozenset({"/v2/chat", "/v2/embed"})

    def __init__(self, writer: Callable[[], CompletionWriter], new_id: Callable[[], str]) -> None:
        self._writer = writer
        self._new_id = new_id

    async def handle(self, request: Request, defaults: Knobs) -> Response:
        """One request to ``paths``: knobs, then the route; errors in Cohere's shape."""
        if request.method != "POST":
            return cohere_error(404, f"Invalid URL ({request.method} {request.path})")
        try:
            knobs = read_knobs(request.headers, defaults)
        except KnobError as exc:
            return cohere_error(400, f"invalid request: {exc}")
        await sleep_ms(knobs.latency_ms)
        if knobs.status is not None:
            return cohere_error(
                knobs.status, f"mock upstream error (x-mock-status: {knobs.status})"
            )
        try:
            body = orjson.loads(request.body)
            if not isinstance(body, dict):
                raise BadRequest("the request body must be a JSON object")
            if request.path == "/v2/chat":
                return await self.chat(body, knobs, len(request.body))
            return await self.embed(body, knobs, len(request.body))
        except orjson.JSONDecodeError as exc:
            return cohere_error(400, f"invalid request: the body is not valid JSON: {exc}")
        except BadRequest as exc:
            return cohere_error(400, f"invalid request: {exc.message}")

    # --- chat ---

    async def chat(self, body: dict[str, Any], knobs: Knobs, body_bytes: int = 0) -> Response:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise BadRequest("model must be specified")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("messages must be a non-empty list")
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or message.get("role") not in _ROLES:
                raise BadRequest(f"messages[{i}].role must be one of {sorted(_ROLES)}")
        cap = body.get("max_tokens")
        if cap is not None and (type(cap) is not int or cap < 1):
            raise BadRequest("max_tokens must be a positive integer")
        stream = body.get("stream")
        if stream is not None and type(stream) is not bool:
            raise BadRequest("stream must be a boolean")
        tools = body.get("tools")
        if tools is not None and not isinstance(tools, list):
            raise BadRequest("tools must be a list")
        writer = self._writer()
        billed_input = await count_for_body(
            lambda: _billed_input(writer, messages, tools), body_bytes
        )
        ident = _uuid(self._new_id())
        tool = _tool_to_call(tools, body.get("tool_choice"), messages)
        if tool is not None:
            return await self._tool_call(
                ident, writer, tool, billed_input, len(messages), knobs, stream is True
            )
        completion = writer.for_request(model, knobs, cap)
        finish = "MAX_TOKENS" if completion.truncated else "COMPLETE"
        usage = _usage(billed_input, len(messages), completion.tokens, knobs)
        if stream is not True:
            await sleep_ms(completion.generation_ms(knobs))
            payload = {
                "id": ident,
                "finish_reason": finish,
                "message": {
                    "role": "assistant",
                    "content": [{"type": "text", "text": completion.text}],
                },
                "usage": usage,
            }
            return json_response([_JSON_HEADER], orjson.dumps(payload), knobs)
        head = [
            _event(_message_start(ident)),
            _event(
                {
                    "type": "content-start",
                    "index": 0,
                    "delta": {"message": {"content": {"type": "text", "text": ""}}},
                }
            ),
        ]
        tail = [
            _event({"type": "content-end", "index": 0}),
            _event({"type": "message-end", "delta": {"finish_reason": finish, "usage": usage}}),
        ]

        def delta(text: str) -> bytes:
            return _event(
                {
                    "type": "content-delta",
                    "index": 0,
                    "delta": {"message": {"content": {"text": text}}},
                }
            )

        contents = split_chunks(completion.pieces, knobs.chunks)
        return Response(200, list(SSE_HEADERS), stream_events(knobs, head, contents, delta, tail))

    async def _tool_call(
        self,
        ident: str,
        writer: CompletionWriter,
        tool: dict[str, Any],
        billed_input: int,
        message_count: int,
        knobs: Knobs,
        stream: bool,
    ) -> Response:
        counter = writer.counter
        name = tool["name"]
        plan = f"I will use {name} to answer this."
        arguments = orjson.dumps(_arguments(tool.get("parameters"))).decode()
        call_id = f"{name}_{ident.replace('-', '')[-12:]}"
        output = counter.text(plan) + counter.text(name) + counter.text(arguments)
        usage = _usage(billed_input, message_count, output, knobs)
        if not stream:
            await sleep_ms(knobs.ttft_ms)
            payload = {
                "id": ident,
                "finish_reason": "TOOL_CALL",
                "message": {
                    "role": "assistant",
                    "tool_plan": plan,
                    "tool_calls": [
                        {
                            "id": call_id,
                            "type": "function",
                            "function": {"name": name, "arguments": arguments},
                        }
                    ],
                },
                "usage": usage,
            }
            return json_response([_JSON_HEADER], orjson.dumps(payload), knobs)
        events: list[bytes] = [
            _event({"type": "tool-plan-delta", "delta": {"message": {"tool_plan": piece}}})
            for piece in split_chunks(_token_pieces(counter, plan), knobs.chunks)
        ]
        events.append(
            _event(
                {
                    "type": "tool-call-start",
                    "index": 0,
                    "delta": {
                        "message": {
                            "tool_calls": {
                                "id": call_id,
                                "type": "function",
                                "function": {"name": name, "arguments": ""},
                            }
                        }
                    },
                }
            )
        )
        events.extend(
            _event(
                {
                    "type": "tool-call-delta",
                    "index": 0,
                    "delta": {"message": {"tool_calls": {"function": {"arguments": piece}}}},
                }
            )
            for piece in split_chunks(_token_pieces(counter, arguments), knobs.chunks)
        )
        tail = [
            _event({"type": "tool-call-end", "index": 0}),
            _event(
                {"type": "message-end", "delta": {"finish_reason": "TOOL_CALL", "usage": usage}}
            ),
        ]
        # Each content event is already framed: the knobs (TTFT, delay, cut) apply to them
        # as to text deltas.
        contents = [event.decode() for event in events]
        body = stream_events(knobs, [_event(_message_start(ident))], contents, str.encode, tail)
        return Response(200, list(SSE_HEADERS), body)

    # --- embed ---

    async def embed(self, body: dict[str, Any], knobs: Knobs, body_bytes: int = 0) -> Response:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise BadRequest("model must be specified")
        input_type = body.get("input_type")
        if input_type not in _INPUT_TYPES:
            raise BadRequest(f"input_type must be one of {sorted(_INPUT_TYPES)}")
        texts = body.get("texts")
        if (
            not isinstance(texts, list)
            or not texts
            or not all(isinstance(text, str) for text in texts)
        ):
            raise BadRequest("texts must be a non-empty list of strings")
        if len(texts) > MAX_TEXTS:
            raise BadRequest(f"texts must contain at most {MAX_TEXTS} items")
        types = body.get("embedding_types", ["float"])
        if types != ["float"]:
            raise BadRequest('the mock serves embedding_types ["float"] only')
        dimensions = body.get("output_dimension", DEFAULT_EMBEDDING_DIMENSIONS)
        if type(dimensions) is not int or not 1 <= dimensions <= MAX_EMBEDDING_DIMENSIONS:
            raise BadRequest(
                f"output_dimension must be an integer in 1..{MAX_EMBEDDING_DIMENSIONS}"
            )
        counter = self._writer().counter
        tokens = await count_for_body(lambda: sum(counter.text(text) for text in texts), body_bytes)
        payload = {
            "id": _uuid(self._new_id()),
            "embeddings": {"float": [_vector(text, dimensions) for text in texts]},
            "texts": texts,
            "meta": {"api_version": {"version": "2"}, "billed_units": {"input_tokens": tokens}},
            "response_type": "embeddings_by_type",
        }
        return json_response([_JSON_HEADER], orjson.dumps(payload), knobs)


# --- helpers ---


def _event(payload: dict[str, Any]) -> bytes:
    return named_event(payload["type"].encode(), payload)


def _message_start(ident: str) -> dict[str, Any]:
    return {
        "id": ident,
        "type": "message-start",
        "delta": {
            "message": {
                "role": "assistant",
                "content": [],
                "tool_plan": "",
                "tool_calls": [],
                "citations": [],
            }
        },
    }


def _uuid(new_id: str) -> str:
    """A UUID-shaped id (Cohere's ids are UUIDs) from the mock's unique hex id."""
    return str(uuid.UUID(hex=new_id.rjust(32, "0")[-32:]))


def _billed_input(writer: CompletionWriter, messages: list[Any], tools: Any) -> int:
    counter = writer.counter
    total = counter.tools(tools)
    for message in messages:
        total += counter.chat_content(message.get("content"))
        plan = message.get("tool_plan")
        if isinstance(plan, str):
            total += counter.text(plan)
        for call in message.get("tool_calls") or ():
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict):
                for key in ("name", "arguments"):
                    value = function.get(key)
                    if isinstance(value, str):
                        total += counter.text(value)
    return total


def _usage(billed_input: int, message_count: int, output: int, knobs: Knobs) -> dict[str, Any]:
    usage: dict[str, Any] = {
        "billed_units": {"input_tokens": billed_input, "output_tokens": output},
        "tokens": {
            "input_tokens": billed_input
            + TEMPLATE_TOKENS
            + TEMPLATE_TOKENS_PER_MESSAGE * message_count,
            "output_tokens": output + END_OF_TURN_TOKENS,
        },
    }
    if knobs.cached_tokens:
        usage["cached_tokens"] = min(knobs.cached_tokens, billed_input)
    return usage


def _tool_to_call(tools: Any, choice: Any, messages: list[Any]) -> dict[str, Any] | None:
    """The function the "model" calls, or None when it answers in text."""
    if not tools or choice == "NONE" or messages[-1].get("role") == "tool":
        return None
    first = tools[0]
    function = first.get("function") if isinstance(first, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise BadRequest("tools[0].function.name must be a string")
    return function


def _arguments(schema: Any) -> dict[str, Any]:
    """A value for each required parameter of a JSON Schema object, by its type."""
    if not isinstance(schema, dict):
        return {}
    properties = schema.get("properties")
    properties = properties if isinstance(properties, dict) else {}
    out: dict[str, Any] = {}
    for name in schema.get("required") or ():
        spec = properties.get(name)
        kind = spec.get("type") if isinstance(spec, dict) else None
        enum = spec.get("enum") if isinstance(spec, dict) else None
        if isinstance(enum, list) and enum:
            out[name] = enum[0]
        elif kind in ("integer", "number"):
            out[name] = 1
        elif kind == "boolean":
            out[name] = True
        elif kind == "array":
            out[name] = []
        elif kind == "object":
            out[name] = {}
        else:
            out[name] = "mock"
    return out


def _token_pieces(counter: TokenCounter, text: str) -> tuple[str, ...]:
    """``text`` split at its token boundaries (the mock's texts here are ASCII)."""
    encoding = counter.encoding
    return tuple(encoding.decode([token]) for token in encoding.encode_ordinary(text))


def _vector(text: str, dimensions: int) -> list[float]:
    """A deterministic unit-ish vector for ``text``."""
    out: list[float] = []
    seed = text.encode("utf-8")
    block = 0
    while len(out) < dimensions:
        digest = hashlib.sha256(seed + block.to_bytes(4, "big")).digest()
        for (value,) in struct.iter_unpack("<i", digest):
            if len(out) == dimensions:
                break
            out.append(round(value / 2**31, 6))
        block += 1
    return out

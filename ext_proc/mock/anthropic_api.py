"""Anthropic Messages API (``POST /v1/messages``) of the mock.

Token counts are approximate: Anthropic's tokenizer is not public, so input and output
are counted with o200k_base (see ``counting.anthropic_input``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson

from ext_proc.http import Response
from ext_proc.mock.counting import count_for_body
from ext_proc.mock.errors import BadRequest
from ext_proc.mock.knobs import Knobs
from ext_proc.mock.sse import SSE_HEADERS, json_response, named_event, sleep_ms, stream_events
from ext_proc.mock.text import CompletionWriter, split_chunks

_JSON_HEADER = ("content-type", "application/json")


class AnthropicApi:
    def __init__(self, writer: Callable[[], CompletionWriter], new_id: Callable[[], str]) -> None:
        self._writer = writer
        self._new_id = new_id

    async def messages(self, body: dict[str, Any], knobs: Knobs, body_bytes: int = 0) -> Response:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise BadRequest("model: Field required")
        max_tokens = body.get("max_tokens")
        if max_tokens is None:
            raise BadRequest("max_tokens: Field required")
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise BadRequest("max_tokens: must be a positive integer")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("messages: must be a non-empty list")
        writer = self._writer()
        counter = writer.counter
        counted = await count_for_body(
            lambda: counter.anthropic_input(body.get("system"), messages, body.get("tools")),
            body_bytes,
        )
        completion = writer.for_request(model, knobs, max_tokens)
        stop_reason = "max_tokens" if completion.truncated else "end_turn"
        # Anthropic's input_tokens excludes cache reads: the three add up to the prompt.
        cached = min(knobs.cached_tokens, counted)
        input_tokens = counted - cached
        # Extended thinking is billed as output.
        output_tokens = completion.tokens + knobs.reasoning_tokens
        ident = "msg_" + self._new_id()
        headers = [_JSON_HEADER, ("request-id", "req_" + ident[4:])]
        if body.get("stream") is not True:
            await sleep_ms(completion.generation_ms(knobs))
            payload = orjson.dumps(
                {
                    "id": ident,
                    "type": "message",
                    "role": "assistant",
                    "model": model,
                    "content": [{"type": "text", "text": completion.text}],
                    "stop_reason": stop_reason,
                    "stop_sequence": None,
                    "usage": {
                        "input_tokens": input_tokens,
                        "cache_creation_input_tokens": 0,
                        "cache_read_input_tokens": cached,
                        "output_tokens": output_tokens,
                    },
                }
            )
            return json_response(headers, payload, knobs)

        head = [
            named_event(
                b"message_start",
                {
                    "type": "message_start",
                    "message": {
                        "id": ident,
                        "type": "message",
                        "role": "assistant",
                        "model": model,
                        "content": [],
                        "stop_reason": None,
                        "stop_sequence": None,
                        "usage": {
                            "input_tokens": input_tokens,
                            "cache_creation_input_tokens": 0,
                            "cache_read_input_tokens": cached,
                            "output_tokens": 1,
                        },
                    },
                },
            ),
            named_event(
                b"content_block_start",
                {
                    "type": "content_block_start",
                    "index": 0,
                    "content_block": {"type": "text", "text": ""},
                },
            ),
            named_event(b"ping", {"type": "ping"}),
        ]
        tail = [
            named_event(b"content_block_stop", {"type": "content_block_stop", "index": 0}),
            named_event(
                b"message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                    "usage": {"output_tokens": output_tokens},
                },
            ),
            named_event(b"message_stop", {"type": "message_stop"}),
        ]

        def delta(text: str) -> bytes:
            return named_event(
                b"content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "text_delta", "text": text},
                },
            )

        contents = split_chunks(completion.pieces, knobs.chunks)
        events = stream_events(knobs, head, contents, delta, tail)
        return Response(200, [*SSE_HEADERS, headers[1]], events)

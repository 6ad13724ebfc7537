"""OpenAI's Responses API in the mock (``POST /v1/responses``, and Azure's
``/openai/responses``): a JSON response object or its typed SSE events, honest usage.

The prompt is counted by the chat rules (``counting``): ``instructions`` as a system
message, a string ``input`` as a user message, input items as the chat messages they
stand for (a function call as an assistant tool call, its output as a tool message).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import orjson

from ext_proc.http import AbortConnection, Response
from ext_proc.mock.counting import count_for_body
from ext_proc.mock.errors import BadRequest
from ext_proc.mock.knobs import Knobs
from ext_proc.mock.openai_api import NewId, WritersFor
from ext_proc.mock.sse import SSE_HEADERS, json_response, named_event, sleep_ms
from ext_proc.mock.text import Completion, split_chunks

_JSON_HEADER = ("content-type", "application/json")


def as_chat_messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The request's instructions and input as the chat messages they stand for."""
    messages: list[dict[str, Any]] = []
    instructions = body.get("instructions")
    if isinstance(instructions, str) and instructions:
        messages.append({"role": "system", "content": instructions})
    items = body.get("input")
    if isinstance(items, str):
        messages.append({"role": "user", "content": items})
        return messages
    if not isinstance(items, list):
        return messages
    for item in items:
        if not isinstance(item, dict):
            continue
        kind = item.get("type", "message")
        if kind == "message":
            content = item.get("content")
            if isinstance(content, list):
                content = [
                    {"type": "text", "text": part.get("text", "")}
                    for part in content
                    if isinstance(part, dict) and part.get("type") in ("input_text", "output_text")
                ]
            messages.append({"role": item.get("role", "user"), "content": content})
        elif kind == "function_call":
            call = {
                "id": item.get("call_id"),
                "type": "function",
                "function": {"name": item.get("name"), "arguments": item.get("arguments")},
            }
            messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            messages.append(
                {
                    "role": "tool",
                    "tool_call_id": item.get("call_id"),
                    "content": output if isinstance(output, str) else orjson.dumps(output).decode(),
                }
            )
    return messages


class ResponsesApi:
    def __init__(self, writers: WritersFor, new_id: NewId) -> None:
        self._writers = writers
        self._new_id = new_id

    async def create(
        self, body: dict[str, Any], knobs: Knobs, model: str, body_bytes: int = 0
    ) -> Response:
        items = body.get("input")
        if items is not None and not isinstance(items, str | list):
            raise BadRequest("'input' must be a string or an array of input items", "input")
        cap = body.get("max_output_tokens")
        if cap is not None and (not isinstance(cap, int) or isinstance(cap, bool) or cap < 16):
            raise BadRequest("'max_output_tokens' must be an integer >= 16", "max_output_tokens")
        writer = self._writers(model)
        counter = writer.counter
        messages = as_chat_messages(body)
        prompt = await count_for_body(
            lambda: counter.chat_prompt(messages, body.get("tools")), body_bytes
        )
        completion = writer.for_request(model, knobs, cap)
        ident = "resp_" + self._new_id()
        message_id = "msg_" + self._new_id()
        created = int(time.time())
        headers = [_JSON_HEADER, ("x-request-id", "req_" + ident[5:])]
        usage = _usage(prompt, completion, knobs)
        status = "incomplete" if completion.truncated else "completed"
        done = _response(ident, created, model, body, status, usage, message_id, completion.text)
        if body.get("stream") is not True:
            await sleep_ms(completion.generation_ms(knobs))
            return json_response(headers, orjson.dumps(done), knobs)
        return Response(
            200,
            [*SSE_HEADERS, headers[1]],
            _events(knobs, ident, created, model, body, message_id, completion, done),
        )


def _usage(prompt: int, completion: Completion, knobs: Knobs) -> dict[str, Any]:
    output = completion.tokens + knobs.reasoning_tokens
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": knobs.cached_tokens},
        "output_tokens": output,
        "output_tokens_details": {"reasoning_tokens": knobs.reasoning_tokens},
        "total_tokens": prompt + output,
    }


def _message(message_id: str, text: str, status: str) -> dict[str, Any]:
    return {
        "id": message_id,
        "type": "message",
        "status": status,
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}],
    }


def _response(
    ident: str,
    created: int,
    model: str,
    body: dict[str, Any],
    status: str,
    usage: dict[str, Any] | None,
    message_id: str,
    text: str | None,
) -> dict[str, Any]:
    output = [] if text is None else [_message(message_id, text, "completed")]
    return {
        "id": ident,
        "object": "response",
        "created_at": created,
        "status": status,
        "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "model": model,
        "output": output,
        "parallel_tool_calls": True,
        "previous_response_id": body.get("previous_response_id"),
        "reasoning": {"effort": None, "summary": None},
        "store": body.get("store", True),
        "temperature": body.get("temperature", 1.0),
        "text": {"format": {"type": "text"}},
        "tool_choice": "auto",
        "tools": body.get("tools") or [],
        "top_p": body.get("top_p", 1.0),
        "truncation": "disabled",
        "usage": usage,
        "user": body.get("user"),
        "metadata": body.get("metadata") or {},
    }


async def _events(
    knobs: Knobs,
    ident: str,
    created: int,
    model: str,
    body: dict[str, Any],
    message_id: str,
    completion: Completion,
    done: dict[str, Any],
) -> AsyncIterator[bytes]:
    sequence = iter(range(1_000_000))

    def event(kind: str, **fields: Any) -> bytes:
        return named_event(
            kind.encode(), {"type": kind, "sequence_number": next(sequence), **fields}
        )

    started = _response(ident, created, model, body, "in_progress", None, message_id, None)
    await sleep_ms(knobs.ttft_ms)
    yield event("response.created", response=started)
    yield event("response.in_progress", response=started)
    yield event(
        "response.output_item.added",
        output_index=0,
        item={**_message(message_id, "", "in_progress"), "content": []},
    )
    yield event(
        "response.content_part.added",
        item_id=message_id,
        output_index=0,
        content_index=0,
        part={"type": "output_text", "text": "", "annotations": []},
    )
    cut_after = knobs.cut_after
    for i, delta in enumerate(split_chunks(completion.pieces, knobs.chunks)):
        if cut_after is not None and i >= cut_after:
            raise AbortConnection
        if i:
            await sleep_ms(knobs.chunk_delay_ms)
        yield event(
            "response.output_text.delta",
            item_id=message_id,
            output_index=0,
            content_index=0,
            delta=delta,
        )
    if cut_after is not None:
        raise AbortConnection
    text = completion.text
    part = {"type": "output_text", "text": text, "annotations": []}
    yield event(
        "response.output_text.done", item_id=message_id, output_index=0, content_index=0, text=text
    )
    yield event(
        "response.content_part.done", item_id=message_id, output_index=0, content_index=0, part=part
    )
    yield event(
        "response.output_item.done", output_index=0, item=_message(message_id, text, "completed")
    )
    yield event(f"response.{done['status']}", response=done)

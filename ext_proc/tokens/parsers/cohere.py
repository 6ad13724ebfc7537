"""Cohere chat responses: v2 ``/v2/chat`` (JSON and SSE stream) and v1 ``/v1/chat`` JSON.

Usage: v2 reports ``usage.tokens`` and ``usage.billed_units``, v1 the same two under
``meta``, each with ``input_tokens`` / ``output_tokens``. We prefer ``tokens`` (what the
model actually processed, including Cohere's own prompt template, so it is comparable
with other providers' counts and with our estimate) and fall back to ``billed_units``
field by field. A response with an input count but no output count (embed) has 0
completion tokens.

v2 streams: ``content-delta`` carries text at ``delta.message.content.text`` (or
``.thinking``); ``tool-plan-delta`` and ``tool-call-start`` / ``tool-call-delta`` carry the
plan and tool calls; ``message-end`` carries ``delta.usage`` and ``delta.finish_reason``
and completes the stream (unless its finish reason is ``ERROR``). The legacy v1 stream
(newline-delimited JSON, not SSE) is not parsed: it yields no usage and no text.
"""

from __future__ import annotations

from typing import Any

from ext_proc.tokens.parsers.base import (
    ResponseFormat,
    SSEStreamParser,
    append_function,
    append_text,
    append_tool_calls,
    as_int,
    dumps_text,
    load_json,
    sum_known,
    usage_has_completion,
)
from ext_proc.tokens.types import ResponseSummary, Usage


def _count(preferred: Any, fallback: Any, name: str) -> int | None:
    value = as_int(preferred.get(name)) if type(preferred) is dict else None
    if value is None and type(fallback) is dict:
        value = as_int(fallback.get(name))
    return value


def _usage(raw: Any) -> Usage | None:
    """From a v2 ``usage`` or a v1 ``meta`` object."""
    if type(raw) is not dict:
        return None
    tokens, billed = raw.get("tokens"), raw.get("billed_units")
    prompt = _count(tokens, billed, "input_tokens")
    completion = _count(tokens, billed, "output_tokens")
    if prompt is None and completion is None:
        return None
    if completion is None:
        completion = 0
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=sum_known(prompt, completion),
    )


def _message_text(text: list[str], obj: dict[str, Any]) -> None:
    message = obj.get("message")
    if type(message) is dict:  # v2
        append_text(text, message.get("tool_plan"))
        content = message.get("content")
        if type(content) is list:
            for block in content:
                if type(block) is dict:
                    append_text(text, block.get("thinking"))
                    append_text(text, block.get("text"))
        append_tool_calls(text, message.get("tool_calls"))
    else:  # v1
        append_text(text, obj.get("text"))
        tool_calls = obj.get("tool_calls")
        if type(tool_calls) is list:
            for call in tool_calls:
                if type(call) is dict:
                    append_text(text, call.get("name"))
                    if "parameters" in call:
                        append_text(text, dumps_text(call["parameters"]))


def parse_json(body: bytes) -> ResponseSummary:
    obj = load_json(body)
    if type(obj) is not dict:
        return ResponseSummary()
    usage = _usage(obj["usage"] if "usage" in obj else obj.get("meta"))
    reason = obj.get("finish_reason")
    model = obj.get("model")
    # An error body is {"message": "..."} (a string; a v2 reply's message is an object).
    failed = type(obj.get("message")) is str or reason == "ERROR"
    summary = ResponseSummary(
        usage=usage,
        response_model=model if type(model) is str and model else None,
        finish_reason=reason if type(reason) is str else None,
        complete=not failed,
    )
    if not usage_has_completion(usage):
        _message_text(summary.delivered_text, obj)
    return summary


class CohereStreamParser(SSEStreamParser):
    format_name = "cohere"

    def __init__(self) -> None:
        super().__init__()
        self._raw_usage: Any = None

    def _on(self, obj: dict[str, Any]) -> None:
        kind = obj.get("type")
        delta = obj.get("delta")
        message = delta.get("message") if type(delta) is dict else None
        if kind == "content-delta":
            content = message.get("content") if type(message) is dict else None
            if type(content) is dict:
                value = content.get("text")
                if value is None:
                    value = content.get("thinking")
                if value and type(value) is str:
                    self.text.append(value)
        elif kind == "tool-plan-delta":
            if type(message) is dict:
                append_text(self.text, message.get("tool_plan"))
        elif kind in ("tool-call-start", "tool-call-delta"):
            call = message.get("tool_calls") if type(message) is dict else None
            if type(call) is dict:
                append_function(self.text, call.get("function"))
        elif kind == "message-end":
            if type(delta) is dict:
                usage = delta.get("usage")
                if type(usage) is dict:
                    self._raw_usage = usage
                reason = delta.get("finish_reason")
                if type(reason) is str:
                    self.finish_reason = reason
                    if reason == "ERROR":
                        self.failed = True
            self.complete = True
        elif kind == "error" or "error" in obj:
            self.failed = True

    def _usage(self) -> Usage | None:
        return _usage(self._raw_usage)


FORMAT = ResponseFormat(
    "cohere",
    parse_json,
    CohereStreamParser,
    usage_of=lambda obj: _usage(obj["usage"] if "usage" in obj else obj.get("meta")),
    usage_fields=tuple(
        f"{root}.{group}.{name}"
        for root in ("usage", "meta")
        for group in ("tokens", "billed_units")
        for name in ("input_tokens", "output_tokens")
    ),
    model_field=None,  # Cohere's answers do not name the model
)

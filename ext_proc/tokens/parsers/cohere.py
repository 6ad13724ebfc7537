"""Cohere responses: v2 ``/v2/chat`` (JSON and SSE stream) and ``/v2/embed``; v1 JSON.

Usage. Cohere reports two counts for each side of a call: ``billed_units`` and
``tokens``. ``tokens`` is everything the model processed, including the prompt template
and the special tokens Cohere adds itself; ``billed_units`` is what Cohere charges for
("tokens you don't have control over, you are not charged for them": Cohere's "How does
Cohere's pricing work?"). With tools the two differ widely (Cohere's own example: billed
6772 in / 248 out against 7596 / 645 processed). We take ``billed_units``, field by
field falling back to ``tokens``: a row's counts are what the request cost, its
``cost_usd`` is priced per billed token, and budgets and token limits settle on them.
v2 chat answers put the counts under ``usage``; v2 embed and every v1 answer under
``meta``. ``cached_tokens`` (prompt tokens that hit Cohere's cache, beside the two
groups) is kept, capped at the prompt count, since Cohere does not say whether its
billed count includes them. An answer with an input count but no output count (embed)
has 0 completion tokens. ``read_usage`` is this mapping, shared with the translation
(``ext_proc.routing.translate.openai_cohere``) so the app and the row see one count.

Cohere's answers do not name the model that served them (neither v2 chat nor embed has
a ``model`` field): ``response_model`` stays None.

Errors: an HTTP error body is ``{"id": ..., "message": "..."}`` (``message`` a string,
where a v2 chat answer's ``message`` is an object): incomplete, no usage. A JSON answer
with ``finish_reason`` ``ERROR`` is incomplete too.

v2 streams (SSE; the JSON names its event in ``type``): ``content-start`` /
``content-delta`` carry text at ``delta.message.content.text`` (or ``.thinking``, which
Cohere bills as output); ``tool-plan-delta`` the tool plan; ``tool-call-start`` the
call's name (and any first arguments) and ``tool-call-delta`` argument fragments;
``message-end`` carries ``delta.usage``, ``delta.finish_reason`` and, when generation
failed, ``delta.error``, and completes the stream unless it failed (finish reason
``ERROR`` or an error). A final ``data: [DONE]`` may follow; it carries nothing.
Everything delivered is kept as text so that a cut or cancelled stream, which never
reaches ``message-end``, is counted from what the app received. The legacy v1 stream
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


def read_usage(raw: Any) -> Usage | None:
    """The usage in a v2 ``usage`` or a ``meta`` object (see the module docstring), or
    None when it reports no token count."""
    if type(raw) is not dict:
        return None
    billed, tokens = raw.get("billed_units"), raw.get("tokens")
    prompt = _count(billed, tokens, "input_tokens")
    completion = _count(billed, tokens, "output_tokens")
    if prompt is None and completion is None:
        return None
    if completion is None:
        completion = 0
    cached = as_int(raw.get("cached_tokens"))
    if cached is not None and prompt is not None:
        cached = min(cached, prompt)
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=sum_known(prompt, completion),
        cached_tokens=cached,
    )


def _usage_of(obj: dict[str, Any]) -> Usage | None:
    return read_usage(obj["usage"] if "usage" in obj else obj.get("meta"))


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
    usage = _usage_of(obj)
    reason = obj.get("finish_reason")
    # An error body is {"id": ..., "message": "..."} (a v2 chat answer's message is an
    # object).
    failed = type(obj.get("message")) is str or reason == "ERROR"
    summary = ResponseSummary(
        usage=usage,
        finish_reason=reason if type(reason) is str else None,
        complete=not failed,
    )
    if not usage_has_completion(usage):
        _message_text(summary.delivered_text, obj)
    return summary


def _content_text(text: list[str], content: Any) -> None:
    """A ``content-start`` / ``content-delta`` content object: its text or thinking."""
    if type(content) is dict:
        value = content.get("text")
        if value is None:
            value = content.get("thinking")
        if value and type(value) is str:
            text.append(value)


class CohereStreamParser(SSEStreamParser):
    format_name = "cohere"

    def __init__(self) -> None:
        super().__init__()
        self._raw_usage: Any = None

    def _on(self, obj: dict[str, Any]) -> None:
        kind = obj.get("type")
        delta = obj.get("delta")
        message = delta.get("message") if type(delta) is dict else None
        if kind == "content-delta" or kind == "content-start":
            if type(message) is dict:
                _content_text(self.text, message.get("content"))
        elif kind == "tool-plan-delta":
            if type(message) is dict:
                append_text(self.text, message.get("tool_plan"))
        elif kind == "tool-call-start" or kind == "tool-call-delta":
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
                if delta.get("error"):
                    self.failed = True
            self.complete = True
        elif kind == "error" or "error" in obj:
            self.failed = True

    def _on_other(self, data: bytes) -> None:
        if data != b"[DONE]":  # the end marker Cohere's SDK stops at: not malformed
            self.malformed += 1

    def _usage(self) -> Usage | None:
        return read_usage(self._raw_usage)


FORMAT = ResponseFormat(
    "cohere",
    parse_json,
    CohereStreamParser,
    usage_of=_usage_of,
    usage_fields=tuple(
        f"{root}.{group}.{name}"
        for root in ("usage", "meta")
        for group in ("tokens", "billed_units")
        for name in ("input_tokens", "output_tokens")
    ),
    model_field=None,  # Cohere's answers do not name the model
)

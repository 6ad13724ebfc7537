"""OpenAI's Responses API (``/v1/responses``, and Azure's): JSON and streamed answers.

JSON usage: ``usage.input_tokens`` (all the prompt, cached included: the gateway's
``prompt_tokens``), ``usage.output_tokens`` (reasoning included), ``usage.total_tokens``,
``usage.input_tokens_details.cached_tokens`` / ``.cache_write_tokens`` and
``usage.output_tokens_details.reasoning_tokens``. A response object carries
``"error": null`` when it succeeded. One in background mode answers ``status: queued``
with no usage: the gateway never sees its usage (it is fetched later by the app).

Streams: typed events (``type`` in the data). The text the app receives arrives in
``response.output_text.delta`` (and ``.refusal.delta``, ``.reasoning_summary_text.delta``,
``.reasoning_text.delta``); a function call's name in ``response.output_item.added``
and its arguments in ``response.function_call_arguments.delta`` (custom tools:
``response.custom_tool_call_input.delta``). ``response.completed`` and
``response.incomplete`` (stopped at ``max_output_tokens``) end the stream with the whole
response, whose ``usage`` is final; ``response.failed`` and ``error`` end it failed.
"""

from __future__ import annotations

from typing import Any

from ext_proc.tokens.parsers.base import (
    ResponseFormat,
    SSEStreamParser,
    append_text,
    as_int,
    load_json,
    sum_known,
    usage_has_completion,
)
from ext_proc.tokens.types import ResponseSummary, Usage

NAME = "openai_responses"

# Stream events whose ``delta`` is text the app receives.
_TEXT_DELTAS = frozenset(
    {
        "response.output_text.delta",
        "response.refusal.delta",
        "response.reasoning_summary_text.delta",
        "response.reasoning_text.delta",
        "response.function_call_arguments.delta",
        "response.custom_tool_call_input.delta",
    }
)
_FINAL = frozenset({"response.completed", "response.incomplete"})


def _usage(raw: Any) -> Usage | None:
    if type(raw) is not dict:
        return None
    prompt = as_int(raw.get("input_tokens"))
    completion = as_int(raw.get("output_tokens"))
    if prompt is None and completion is None:
        return None
    total = as_int(raw.get("total_tokens"))
    usage = Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=total if total is not None else sum_known(prompt, completion),
    )
    details = raw.get("input_tokens_details")
    if type(details) is dict:
        usage.cached_tokens = as_int(details.get("cached_tokens"))
        usage.cache_creation_tokens = as_int(details.get("cache_write_tokens")) or None
    details = raw.get("output_tokens_details")
    if type(details) is dict:
        usage.reasoning_tokens = as_int(details.get("reasoning_tokens"))
    return usage


def _output_text(output: Any, text: list[str]) -> None:
    """The text of a response's ``output`` items, as the app received it."""
    if type(output) is not list:
        return
    for item in output:
        if type(item) is not dict:
            continue
        kind = item.get("type")
        if kind == "message":
            for part in item.get("content") or ():
                if type(part) is dict:
                    append_text(text, part.get("text") or part.get("refusal"))
        elif kind == "function_call":
            append_text(text, item.get("name"))
            append_text(text, item.get("arguments"))
        elif kind == "custom_tool_call":
            append_text(text, item.get("name"))
            append_text(text, item.get("input"))
        elif kind == "reasoning":
            for group in ("summary", "content"):
                for part in item.get(group) or ():
                    if type(part) is dict:
                        append_text(text, part.get("text"))


def _model(response: Any) -> str | None:
    model = response.get("model") if type(response) is dict else None
    return model if type(model) is str and model else None


def parse_json(body: bytes) -> ResponseSummary:
    obj = load_json(body)
    if type(obj) is not dict:
        return ResponseSummary()
    usage = _usage(obj.get("usage"))
    status = obj.get("status")
    summary = ResponseSummary(
        usage=usage,
        response_model=_model(obj),
        finish_reason=status if type(status) is str else None,
        complete=obj.get("error") is None and status != "failed",
    )
    if not usage_has_completion(usage):
        _output_text(obj.get("output"), summary.delivered_text)
    return summary


class ResponsesStreamParser(SSEStreamParser):
    format_name = NAME

    def __init__(self) -> None:
        super().__init__()
        self._raw_usage: Any = None

    def _on(self, obj: dict[str, Any]) -> None:
        kind = obj.get("type")
        if kind in _TEXT_DELTAS:
            delta = obj.get("delta")
            if delta and type(delta) is str:
                self.text.append(delta)
            return
        if kind == "response.output_item.added":
            item = obj.get("item")
            if type(item) is dict and item.get("type") in ("function_call", "custom_tool_call"):
                append_text(self.text, item.get("name"))  # its arguments follow as deltas
            return
        response = obj.get("response")
        if self.response_model is None:
            self.response_model = _model(response)
        if kind in _FINAL:
            self.complete = True
            if type(response) is dict:
                self._raw_usage = response.get("usage")
                status = response.get("status")
                self.finish_reason = status if type(status) is str else None
        elif kind == "response.failed":
            self.failed = True
            if type(response) is dict:
                self._raw_usage = response.get("usage")  # what was spent before it failed
        elif kind == "error":
            self.failed = True

    def _usage(self) -> Usage | None:
        return _usage(self._raw_usage)


FORMAT = ResponseFormat(
    NAME,
    parse_json,
    ResponsesStreamParser,
    usage_of=lambda obj: _usage(obj.get("usage")),
    usage_fields=(
        "usage.input_tokens",
        "usage.output_tokens",
        "usage.total_tokens",
        "usage.input_tokens_details.cached_tokens",
        "usage.input_tokens_details.cache_write_tokens",
        "usage.output_tokens_details.reasoning_tokens",
    ),
)

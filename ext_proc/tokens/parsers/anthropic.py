"""Anthropic Messages API responses (``/v1/messages``), JSON and streamed.

Usage mapping (the choice every Anthropic caller must make, since Anthropic reports cache
reads and writes *beside* ``input_tokens`` rather than inside it):
``prompt_tokens = input_tokens + cache_read_input_tokens + cache_creation_input_tokens``
(everything the model read, like OpenAI's ``prompt_tokens``, which includes cached
tokens), ``cached_tokens = cache_read_input_tokens``, ``cache_creation_tokens =
cache_creation_input_tokens``, ``completion_tokens = output_tokens``.

Streams: ``message_start`` carries ``message.usage`` (input counts and an initial output
count); each ``message_delta`` carries the *cumulative* ``usage.output_tokens`` (and,
lately, the input counts again). Every field keeps the last value seen: nothing is
summed, so nothing is counted twice. ``message_stop`` completes the stream; an ``error``
event makes it incomplete. The output count of ``message_start`` is a placeholder (1, or
a few, before any text): until a ``message_delta`` reports the count, the stream's usage
has the input counts and no completion count, so a cut or cancelled stream is counted
from the text it delivered, never as 1 token.
"""

from __future__ import annotations

from typing import Any

from ext_proc.tokens.parsers.base import (
    ResponseFormat,
    SSEStreamParser,
    append_text,
    as_int,
    dumps_text,
    load_json,
    sum_known,
    usage_has_completion,
)
from ext_proc.tokens.types import ResponseSummary, Usage

# Anthropic usage field -> its slot in the [input, cache read, cache write, output] list.
_FIELDS = (
    ("input_tokens", 0),
    ("cache_read_input_tokens", 1),
    ("cache_creation_input_tokens", 2),
    ("output_tokens", 3),
)


def update_counts(counts: list[int | None], raw: Any) -> bool:
    """Overwrite ``counts`` with the fields ``raw`` reports; True if it reported any.

    Also used by ``ext_proc.routing.translate.openai_anthropic``: one field mapping.
    """
    if type(raw) is not dict:
        return False
    seen = False
    for name, slot in _FIELDS:
        value = as_int(raw.get(name))
        if value is not None:
            counts[slot] = value
            seen = True
    return seen


def _usage_from_counts(counts: list[int | None]) -> Usage:
    input_tokens, cache_read, cache_creation, output = counts
    prompt = None
    if input_tokens is not None:
        prompt = input_tokens + (cache_read or 0) + (cache_creation or 0)
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=output,
        total_tokens=sum_known(prompt, output),
        cached_tokens=cache_read,
        cache_creation_tokens=cache_creation,
    )


def _block_text(text: list[str], block: Any) -> None:
    if type(block) is not dict:
        return
    kind = block.get("type")
    if kind == "text":
        value = block.get("text")
    elif kind == "thinking":
        value = block.get("thinking")
    elif kind in ("tool_use", "server_tool_use"):
        append_text(text, block.get("name"))
        value = dumps_text(block.get("input")) if "input" in block else None
    else:
        return
    append_text(text, value)


def parse_json(body: bytes) -> ResponseSummary:
    obj = load_json(body)
    if type(obj) is not dict:
        return ResponseSummary()
    counts: list[int | None] = [None, None, None, None]
    usage = _usage_from_counts(counts) if update_counts(counts, obj.get("usage")) else None
    model = obj.get("model")
    reason = obj.get("stop_reason")
    summary = ResponseSummary(
        usage=usage,
        response_model=model if type(model) is str and model else None,
        finish_reason=reason if type(reason) is str else None,
        complete=obj.get("type") != "error" and "error" not in obj,
    )
    content = obj.get("content")
    if not usage_has_completion(usage) and type(content) is list:
        for block in content:
            _block_text(summary.delivered_text, block)
    return summary


class AnthropicStreamParser(SSEStreamParser):
    format_name = "anthropic"

    def __init__(self) -> None:
        super().__init__()
        self._counts: list[int | None] = [None, None, None, None]
        self._has_usage = False
        self._output_final = False  # a message_delta reported the output count

    def _on(self, obj: dict[str, Any]) -> None:
        kind = obj.get("type")
        if kind == "content_block_delta":
            delta = obj.get("delta")
            if type(delta) is dict:
                dtype = delta.get("type")
                if dtype == "text_delta":
                    value = delta.get("text")
                elif dtype == "input_json_delta":
                    value = delta.get("partial_json")
                elif dtype == "thinking_delta":
                    value = delta.get("thinking")
                else:  # signature_delta, citations_delta: not text the model wrote
                    return
                if value and type(value) is str:
                    self.text.append(value)
        elif kind == "content_block_start":
            block = obj.get("content_block")
            if type(block) is dict and block.get("type") in ("tool_use", "server_tool_use"):
                # The tool's name is delivered here; its input follows as deltas.
                append_text(self.text, block.get("name"))
            elif type(block) is dict and block.get("type") in ("text", "thinking"):
                _block_text(self.text, block)  # usually empty; deltas follow
        elif kind == "message_delta":
            usage = obj.get("usage")
            if update_counts(self._counts, usage):
                self._has_usage = True
                if type(usage) is dict and as_int(usage.get("output_tokens")) is not None:
                    self._output_final = True
            delta = obj.get("delta")
            if type(delta) is dict:
                reason = delta.get("stop_reason")
                if type(reason) is str:
                    self.finish_reason = reason
        elif kind == "message_start":
            message = obj.get("message")
            if type(message) is dict:
                if update_counts(self._counts, message.get("usage")):
                    self._has_usage = True
                model = message.get("model")
                if model and type(model) is str:
                    self.response_model = model
        elif kind == "message_stop":
            self.complete = True
        elif kind == "error":
            self.failed = True

    def _usage(self) -> Usage | None:
        if not self._has_usage:
            return None
        counts = self._counts
        if not self._output_final:
            counts = [*counts[:3], None]  # message_start's output count is a placeholder
        return _usage_from_counts(counts)


def _usage_of(obj: dict[str, Any]) -> Usage | None:
    counts: list[int | None] = [None, None, None, None]
    return _usage_from_counts(counts) if update_counts(counts, obj.get("usage")) else None


FORMAT = ResponseFormat(
    "anthropic",
    parse_json,
    AnthropicStreamParser,
    usage_of=_usage_of,
    usage_fields=tuple(f"usage.{name}" for name, _ in _FIELDS),
)

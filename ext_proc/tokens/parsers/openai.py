"""OpenAI (and Azure OpenAI) responses: chat/completions, legacy completions, embeddings.

JSON ``usage``: ``prompt_tokens``, ``completion_tokens``, ``total_tokens``,
``prompt_tokens_details.cached_tokens``, ``completion_tokens_details.reasoning_tokens``.
An embeddings response reports no ``completion_tokens``: it is 0 there.

Streams: ``data: {chunk}`` events ended by ``data: [DONE]``. Usage comes from the chunk
whose ``usage`` is not null (the last one, when ``stream_options.include_usage`` was
set; Azure sends ``"usage": null`` on the others). The stream counts as complete at
``[DONE]``, at a chunk carrying usage, or at a ``finish_reason`` (so a stream cut after
its last choice finished, before usage, is complete with usage None: the caller counts
the delivered text). An ``{"error": ...}`` event makes it incomplete.
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
    load_json,
    sum_known,
    usage_has_completion,
)
from ext_proc.tokens.types import ResponseSummary, Usage


def _usage(raw: Any, *, embeddings: bool = False) -> Usage | None:
    if type(raw) is not dict:
        return None
    prompt = as_int(raw.get("prompt_tokens"))
    completion = as_int(raw.get("completion_tokens"))
    if completion is None and embeddings and prompt is not None:
        completion = 0
    if prompt is None and completion is None:
        return None
    total = as_int(raw.get("total_tokens"))
    usage = Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=total if total is not None else sum_known(prompt, completion),
    )
    details = raw.get("prompt_tokens_details")
    if type(details) is dict:
        usage.cached_tokens = as_int(details.get("cached_tokens"))
    details = raw.get("completion_tokens_details")
    if type(details) is dict:
        usage.reasoning_tokens = as_int(details.get("reasoning_tokens"))
    return usage


def _message_text(choices: list[Any]) -> list[str]:
    """The text a JSON response delivered, for counting when usage is missing."""
    text: list[str] = []
    for choice in choices:
        if type(choice) is not dict:
            continue
        message = choice.get("message")
        if type(message) is dict:
            append_text(text, message.get("reasoning_content"))
            append_text(text, message.get("content"))
            append_text(text, message.get("refusal"))
            append_tool_calls(text, message.get("tool_calls"))
            append_function(text, message.get("function_call"))
        else:
            append_text(text, choice.get("text"))  # legacy completions
    return text


def parse_json(body: bytes) -> ResponseSummary:
    obj = load_json(body)
    if type(obj) is not dict:
        return ResponseSummary()
    choices = obj.get("choices")
    has_choices = type(choices) is list
    usage = _usage(obj.get("usage"), embeddings=not has_choices)
    model = obj.get("model")
    summary = ResponseSummary(
        usage=usage,
        response_model=model if type(model) is str and model else None,
        complete="error" not in obj,
    )
    if type(choices) is list:
        if choices and type(choices[0]) is dict:
            reason = choices[0].get("finish_reason")
            summary.finish_reason = reason if type(reason) is str else None
        if not usage_has_completion(usage):
            summary.delivered_text = _message_text(choices)
    return summary


class OpenAIStreamParser(SSEStreamParser):
    format_name = "openai"

    def __init__(self) -> None:
        super().__init__()
        self._raw_usage: dict[str, Any] | None = None

    def _on(self, obj: dict[str, Any]) -> None:
        choices = obj.get("choices")
        if choices and type(choices) is list:
            append = self.text.append
            for choice in choices:
                if type(choice) is not dict:
                    continue
                delta = choice.get("delta")
                if type(delta) is dict:
                    if delta:
                        content = delta.get("content")
                        if content and type(content) is str:
                            append(content)
                        if len(delta) > 1 or content is None:
                            self._rare_delta(delta)
                else:
                    text = choice.get("text")  # legacy completions
                    if text and type(text) is str:
                        append(text)
                reason = choice.get("finish_reason")
                if reason is not None and type(reason) is str:
                    self.finish_reason = reason
                    self.complete = True
        usage = obj.get("usage")
        if usage and type(usage) is dict:
            self._raw_usage = usage  # cumulative: the last one wins
            self.complete = True
        if self.response_model is None:
            model = obj.get("model")
            if model and type(model) is str:  # Azure's first chunk has model ""
                self.response_model = model
        if "error" in obj:
            self.failed = True

    def _rare_delta(self, delta: dict[str, Any]) -> None:
        """Delta fields other than content: reasoning, refusal, tool calls."""
        text = self.text
        append_text(text, delta.get("reasoning_content"))
        append_text(text, delta.get("refusal"))
        append_tool_calls(text, delta.get("tool_calls"))
        append_function(text, delta.get("function_call"))

    def _on_other(self, data: bytes) -> None:
        if data == b"[DONE]":
            self.complete = True
        else:
            self.malformed += 1

    def _usage(self) -> Usage | None:
        return _usage(self._raw_usage)


FORMAT = ResponseFormat(
    "openai",
    parse_json,
    OpenAIStreamParser,
    usage_of=lambda obj: _usage(obj.get("usage")),
    usage_fields=(
        "usage.prompt_tokens",
        "usage.completion_tokens",
        "usage.total_tokens",
        "usage.prompt_tokens_details.cached_tokens",
        "usage.completion_tokens_details.reasoning_tokens",
    ),
)

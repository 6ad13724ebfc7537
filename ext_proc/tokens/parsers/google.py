"""Google Gemini (AI Studio and Vertex AI) ``generateContent`` responses, JSON and streamed.

Usage: ``usageMetadata``. ``prompt_tokens = promptTokenCount + toolUsePromptTokenCount``
(``promptTokenCount`` already includes ``cachedContentTokenCount``);
``completion_tokens = candidatesTokenCount + thoughtsTokenCount``: Gemini bills thinking
as output but reports it beside the candidates, and OpenAI's ``completion_tokens``
includes reasoning, so we add them (``reasoning_tokens = thoughtsTokenCount``).
Gemini writes proto3 JSON, which omits zero counts: a missing count in a reported
``usageMetadata`` is 0 (``cached_tokens`` / ``reasoning_tokens`` stay None, "not reported").

Streams (``streamGenerateContent?alt=sse``): every ``data:`` chunk is a whole
``GenerateContentResponse`` whose ``usageMetadata`` is cumulative, so the last one wins.
A candidate's ``finishReason`` ends the stream (there is no ``[DONE]``). Without
``alt=sse`` the stream is one JSON array of those responses: the stream parser then
buffers it and parses it whole at ``finish`` (a cut array yields nothing), and
``parse_json`` accepts such an array too.
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
    usage_has_completion,
)
from ext_proc.tokens.types import ResponseSummary, Usage


def _usage(raw: Any) -> Usage | None:
    if type(raw) is not dict:
        return None
    prompt = as_int(raw.get("promptTokenCount"))
    candidates = as_int(raw.get("candidatesTokenCount"))
    thoughts = as_int(raw.get("thoughtsTokenCount"))
    total = as_int(raw.get("totalTokenCount"))
    if prompt is None and candidates is None and total is None:
        return None
    prompt = (prompt or 0) + (as_int(raw.get("toolUsePromptTokenCount")) or 0)
    completion = (candidates or 0) + (thoughts or 0)
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=total if total is not None else prompt + completion,
        cached_tokens=as_int(raw.get("cachedContentTokenCount")),
        reasoning_tokens=thoughts,
    )


class GoogleStreamParser(SSEStreamParser):
    format_name = "google"

    def __init__(self) -> None:
        super().__init__()
        self._raw_usage: Any = None
        self._array: list[bytes] | None = None  # set when the body is a JSON array
        self._sniffed = False

    def feed(self, chunk: bytes) -> None:
        if not self._sniffed:
            stripped = chunk.lstrip()
            if not stripped:
                return  # leading whitespace only: decide on the next chunk
            self._sniffed = True
            if stripped[0] == 0x5B:  # "[": the non-SSE stream
                self._array = [stripped]
                return
            chunk = stripped
        if self._array is not None:
            self._array.append(chunk)
            return
        super().feed(chunk)

    def finish(self) -> ResponseSummary:
        if self._array is not None:
            items = load_json(b"".join(self._array))
            self._array = None
            if type(items) is list:
                self.add_all(items)
            else:
                self.failed = True
        return super().finish()

    def add_all(self, items: list[Any]) -> None:
        for item in items:
            self.events += 1
            if type(item) is dict:
                self.add(item)

    def _on(self, obj: dict[str, Any]) -> None:
        self.add(obj)

    def add(self, obj: dict[str, Any]) -> None:
        """One ``GenerateContentResponse`` (a stream chunk or a whole reply)."""
        usage = obj.get("usageMetadata")
        if type(usage) is dict:
            self._raw_usage = usage
        candidates = obj.get("candidates")
        if type(candidates) is list:
            append = self.text.append
            for candidate in candidates:
                if type(candidate) is not dict:
                    continue
                content = candidate.get("content")
                parts = content.get("parts") if type(content) is dict else None
                if type(parts) is list:
                    for part in parts:
                        if type(part) is not dict:
                            continue
                        text = part.get("text")
                        if text and type(text) is str:
                            append(text)
                        elif "functionCall" in part:
                            self._function_call(part["functionCall"])
                reason = candidate.get("finishReason")
                if type(reason) is str:
                    self.finish_reason = reason
                    self.complete = True
        if self.response_model is None:
            model = obj.get("modelVersion")
            if model and type(model) is str:
                self.response_model = model
        if "error" in obj:
            self.failed = True

    def _function_call(self, call: Any) -> None:
        if type(call) is dict:
            append_text(self.text, call.get("name"))
            if "args" in call:
                append_text(self.text, dumps_text(call["args"]))

    def _usage(self) -> Usage | None:
        return _usage(self._raw_usage)


def parse_json(body: bytes) -> ResponseSummary:
    obj = load_json(body)
    collector = GoogleStreamParser()
    if type(obj) is dict:
        collector.add(obj)
        # A whole reply is complete even when a blocked prompt left no finishReason.
        collector.complete = True
    elif type(obj) is list:
        collector.add_all(obj)
    else:
        return ResponseSummary()
    summary = collector.finish()
    summary.events = 0
    if usage_has_completion(summary.usage):
        summary.delivered_text = []
    return summary


FORMAT = ResponseFormat(
    "google",
    parse_json,
    GoogleStreamParser,
    usage_of=lambda obj: _usage(obj.get("usageMetadata")),
    usage_fields=tuple(
        f"usageMetadata.{name}"
        for name in (
            "promptTokenCount",
            "candidatesTokenCount",
            "thoughtsTokenCount",
            "totalTokenCount",
            "toolUsePromptTokenCount",
            "cachedContentTokenCount",
        )
    ),
    model_field="modelVersion",
)

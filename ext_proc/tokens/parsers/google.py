"""Google Gemini (AI Studio and Vertex AI) ``generateContent`` responses, JSON and streamed.

Usage: ``usageMetadata``. ``prompt_tokens = promptTokenCount + toolUsePromptTokenCount``
(``promptTokenCount`` already includes ``cachedContentTokenCount``);
``completion_tokens = candidatesTokenCount + thoughtsTokenCount``: Gemini bills thinking
as output but reports it beside the candidates, and OpenAI's ``completion_tokens``
includes reasoning, so we add them (``reasoning_tokens = thoughtsTokenCount``). Gemini
documents ``totalTokenCount`` as the sum of all four. Gemini writes proto3 JSON, which
omits zero counts: a missing count in a reported ``usageMetadata`` is 0
(``cached_tokens`` / ``reasoning_tokens`` stay None, "not reported"). ``batchEmbedContents``
answers carry no usage (the gateway estimates them); one that does is read the same way.

Streams (``streamGenerateContent?alt=sse``): every ``data:`` chunk is a whole
``GenerateContentResponse``; there is no ``[DONE]``. The stream is complete when every
candidate it showed has its ``finishReason`` (or when ``promptFeedback.blockReason`` says
the prompt was refused and nothing was generated). Each chunk carries a
``usageMetadata``, but before the end it is a running placeholder: the prompt count,
``totalTokenCount`` equal to it, sometimes a thinking count, never the final candidates
count (recorded streams show ``{"promptTokenCount": 9, "totalTokenCount": 9}`` on every
chunk but the last). So the completion count is final only when it comes with or after
the end; a stream cut or cancelled before it reports the provider's prompt count and
no completion count, and the completion is counted from the text delivered (thinking
done before the cut is not in that text). Without ``alt=sse`` the stream is one JSON
array of those responses: the stream parser then buffers it and parses it whole at
``finish`` (a cut array yields nothing), and ``parse_json`` accepts such an array too.

Delivered text: ``text`` parts (thought summaries included: billed output the app may
have received) and ``functionCall`` names and arguments. The served model is
``modelVersion``.
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


def usage_from_metadata(raw: Any, *, final: bool = True) -> Usage | None:
    """The ``Usage`` of a ``usageMetadata`` object, or None when it reports no count.

    ``final=False`` (a stream's running count, before its end): only the prompt side,
    which Gemini knows from the start; the completion count stays None ("not reported").
    Also used by ``ext_proc.routing.translate.openai_gemini``: one field mapping.
    """
    if type(raw) is not dict:
        return None
    prompt = as_int(raw.get("promptTokenCount"))
    candidates = as_int(raw.get("candidatesTokenCount"))
    thoughts = as_int(raw.get("thoughtsTokenCount"))
    total = as_int(raw.get("totalTokenCount"))
    if prompt is None and candidates is None and thoughts is None and total is None:
        return None  # e.g. {"trafficType": "ON_DEMAND"} alone
    tool_use = as_int(raw.get("toolUsePromptTokenCount")) or 0
    cached = as_int(raw.get("cachedContentTokenCount"))
    if not final:
        return Usage(
            prompt_tokens=prompt + tool_use if prompt is not None else None,
            cached_tokens=cached,
        )
    prompt_tokens = (prompt or 0) + tool_use
    completion = (candidates or 0) + (thoughts or 0)
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion,
        total_tokens=total if total is not None else prompt_tokens + completion,
        cached_tokens=cached,
        reasoning_tokens=thoughts,
    )


def candidate_index(candidate: dict[str, Any]) -> int:
    """A candidate's ``index`` (proto3 JSON omits it when 0)."""
    index = as_int(candidate.get("index"))
    return index if index is not None and index >= 0 else 0


def prompt_blocked(obj: dict[str, Any]) -> bool:
    """The prompt was refused: ``promptFeedback.blockReason``, and no candidate."""
    feedback = obj.get("promptFeedback")
    return type(feedback) is dict and bool(feedback.get("blockReason"))


class GoogleStreamParser(SSEStreamParser):
    format_name = "google"

    def __init__(self) -> None:
        super().__init__()
        self._raw_usage: Any = None
        self._usage_final = False  # the last usageMetadata came with or after the end
        self._seen: set[int] = set()  # candidate indexes the stream showed
        self._finished: set[int] = set()  # ... and those that have their finishReason
        self._blocked = False
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
        candidates = obj.get("candidates")
        if type(candidates) is list:
            for candidate in candidates:
                if type(candidate) is dict:
                    self._candidate(candidate)
        if prompt_blocked(obj):
            self._blocked = True
        self.complete = self._blocked or (bool(self._seen) and self._seen.issubset(self._finished))
        usage = obj.get("usageMetadata")
        if type(usage) is dict:
            self._raw_usage = usage
            self._usage_final = self.complete
        if self.response_model is None:
            model = obj.get("modelVersion")
            if model and type(model) is str:
                self.response_model = model
        if "error" in obj:
            self.failed = True

    def _candidate(self, candidate: dict[str, Any]) -> None:
        index = candidate_index(candidate)
        self._seen.add(index)
        content = candidate.get("content")
        parts = content.get("parts") if type(content) is dict else None
        if type(parts) is list:
            append = self.text.append
            for part in parts:
                if type(part) is not dict:
                    continue
                text = part.get("text")
                if text and type(text) is str:
                    append(text)
                elif "functionCall" in part:
                    self._function_call(part["functionCall"])
        reason = candidate.get("finishReason")
        if type(reason) is str and reason:
            self.finish_reason = reason
            self._finished.add(index)

    def _function_call(self, call: Any) -> None:
        if type(call) is dict:
            append_text(self.text, call.get("name"))
            if "args" in call:
                append_text(self.text, dumps_text(call["args"]))

    def _usage(self) -> Usage | None:
        return usage_from_metadata(self._raw_usage, final=self._usage_final)


def parse_json(body: bytes) -> ResponseSummary:
    obj = load_json(body)
    collector = GoogleStreamParser()
    if type(obj) is dict:
        collector.add(obj)
        # A whole reply is complete, and its usage final, even when a blocked prompt left
        # no finishReason.
        collector.complete = True
        collector._usage_final = True
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
    usage_of=lambda obj: usage_from_metadata(obj.get("usageMetadata")),
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

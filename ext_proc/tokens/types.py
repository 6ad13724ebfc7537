"""Token-accounting value types shared by the estimator, the response parsers and the caller.

``Usage`` is what a provider *reported*; ``ResponseSummary`` is everything the response
body told us (usage, served model, finish reason, whether it finished, and the text the
app received, so the caller can count completion tokens itself when usage is missing).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class Usage:
    """Token counts as reported by the provider, normalised to OpenAI's names.

    ``None`` means "not reported", never "zero". ``prompt_tokens`` includes cached and
    cache-creation tokens (see each parser for how a provider's fields map here).
    """

    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    cached_tokens: int | None = None  # prompt tokens read from the provider's cache
    cache_creation_tokens: int | None = None  # prompt tokens written to it (Anthropic)
    reasoning_tokens: int | None = None  # part of completion_tokens


@dataclass(slots=True)
class ResponseSummary:
    """What one response body (JSON or SSE stream) told us.

    ``complete``: the JSON body parsed as an object that is not an error body, or the
    stream reached its terminal event (OpenAI ``[DONE]`` or a usage/finish chunk,
    Anthropic ``message_stop``, Cohere ``message-end``, Gemini ``finishReason``) and
    carried no error event. False means the counts cover only what was delivered.
    ``delivered_text``: text the app received (content, refusals, reasoning, tool-call
    names and arguments), in order. Streams always fill it; JSON responses only when the
    provider reported no usage.
    """

    usage: Usage | None = None
    response_model: str | None = None
    finish_reason: str | None = None
    complete: bool = False
    events: int = 0
    delivered_text: list[str] = field(default_factory=list)

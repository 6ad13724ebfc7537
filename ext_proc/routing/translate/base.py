"""What the request processor needs from a translation between two API shapes.

A translation is used when the app speaks one provider's API (OpenAI Chat Completions,
say) and the model it named is served by a provider that speaks another (Anthropic
Messages). The adapter's ``call`` returns the translated request with the translation's
name; the request processor sends it upstream and records the name, and the response
processor (possibly in another process) builds the pair's ``ResponseTranslator`` from
that name (``ext_proc.routing.providers.RESPONSE_TRANSLATORS``) and passes the answer
through it before the app sees it. Usage accounting never reads the translation: it
parses the provider's own bytes with the provider's own format.

The pairs live in files named for them (``openai_anthropic.py``), like Envoy AI
Gateway's ``translator/openai_awsbedrock.go``.
"""

from __future__ import annotations

from typing import Protocol


class TranslationError(ValueError):
    """A request the target API cannot serve as asked: the processor answers 400.

    ``param`` names the app's field in its own API's terms (``messages[2].content``,
    ``n``), ``code`` is an OpenAI-style error code (``unsupported_parameter``,
    ``unsupported_value``, ``invalid_value``, ``invalid_type``,
    ``missing_required_parameter``).
    """

    def __init__(self, param: str, message: str, *, code: str = "invalid_value") -> None:
        super().__init__(message)
        self.param = param
        self.message = message
        self.code = code


class ResponseTranslator(Protocol):
    """Turns one response from the provider's shape into the app's. One per request.

    A response is either buffered (``translate_json`` once) or streamed (``feed`` per
    body chunk, then ``finish``), never both.
    """

    def translate_json(self, body: bytes, status: int) -> bytes:
        """The whole (buffered) body; an error status's body becomes the app's error shape."""
        ...

    def feed(self, chunk: bytes) -> bytes:
        """Streamed body bytes as they arrive, split anywhere: the translated bytes to send
        now (possibly ``b""``). A complete event is never held back."""
        ...

    def finish(self) -> bytes:
        """End of the stream: whatever is left to send (possibly ``b""``)."""
        ...

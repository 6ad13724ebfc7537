"""Provider response parsers, by format name: usage, served model and delivered text.

A format is one module exposing ``FORMAT`` (see ``base.ResponseFormat``); adding one is
that module plus its line in ``FORMATS``. ``"openai"`` also serves Azure OpenAI and
OpenAI-compatible upstreams (vLLM, Ollama, the mock).
"""

from __future__ import annotations

from types import MappingProxyType

from ext_proc.tokens.parsers import anthropic, cohere, google, openai
from ext_proc.tokens.parsers.base import ResponseFormat, StreamParser
from ext_proc.tokens.types import ResponseSummary

FORMATS: MappingProxyType[str, ResponseFormat] = MappingProxyType(
    {
        "openai": openai.FORMAT,
        "anthropic": anthropic.FORMAT,
        "cohere": cohere.FORMAT,
        "google": google.FORMAT,
    }
)

__all__ = ["FORMATS", "ResponseFormat", "StreamParser", "new_stream_parser", "parse_json"]


def _format(fmt: str) -> ResponseFormat:
    try:
        return FORMATS[fmt]
    except KeyError:
        raise KeyError(
            f"unknown response format {fmt!r}; known: {', '.join(sorted(FORMATS))}"
        ) from None


def parse_json(fmt: str, body: bytes) -> ResponseSummary:
    """Summary of a whole (buffered) JSON response body. Never raises on bad bytes."""
    return _format(fmt).parse_json(body)


def new_stream_parser(fmt: str) -> StreamParser:
    """A parser for one streamed (SSE) response body: ``feed`` chunks, then ``finish``."""
    return _format(fmt).new_stream_parser()

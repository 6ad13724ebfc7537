"""Provider response parsers, by format name: usage, served model and delivered text.

A format is one module exposing ``FORMAT`` (see ``base.ResponseFormat``), found in this
package by itself: adding one is adding its module. ``"openai"`` also serves Azure OpenAI and
OpenAI-compatible upstreams (vLLM, Ollama, the mock).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Mapping
from types import MappingProxyType

from ext_proc.tokens.parsers.base import ResponseFormat, StreamParser
from ext_proc.tokens.types import ResponseSummary


def _discover() -> Mapping[str, ResponseFormat]:
    found: dict[str, ResponseFormat] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name == "base":
            continue
        fmt = getattr(importlib.import_module(f"{__name__}.{info.name}"), "FORMAT", None)
        if isinstance(fmt, ResponseFormat):
            if fmt.name in found:
                raise RuntimeError(f"response format {fmt.name!r} is defined twice")
            found[fmt.name] = fmt
    return MappingProxyType(found)


FORMATS: Mapping[str, ResponseFormat] = _discover()

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

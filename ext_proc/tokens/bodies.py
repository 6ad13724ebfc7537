"""Response bodies as real providers send them: any content type spelling, compressed
or not, JSON or SSE, and what the gateway reads from them.

Providers differ from their documentation: ``application/json; charset=utf-8``,
``Application/JSON`` or no content type at all; ``Text/Event-Stream`` or an SSE body
with no content type; a gzip, deflate or brotli body the gateway never asked for (it
strips ``accept-encoding``). Everything here takes what came and decides by what it is,
with the declared content type as a hint only.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Protocol

from ext_proc.tokens.parsers import new_stream_parser, parse_json
from ext_proc.tokens.types import ResponseSummary

try:  # brotli is a declared dependency; a missing wheel must not break JSON answers
    import brotli as _brotli
except ImportError:  # pragma: no cover - the package is installed by make install
    _brotli = None

# Decompressed bodies above this are cut (a body that inflates without bound is hostile).
MAX_DECODED_BYTES = 64 * 1024 * 1024


def is_event_stream(content_type: str) -> bool:
    """``text/event-stream`` in any case, with or without parameters."""
    return content_type.split(";", 1)[0].strip().lower() == "text/event-stream"


def looks_like_sse(start: bytes) -> bool:
    """Whether a body's first bytes are SSE (``data:``, ``event:``, ``id:``, a comment)."""
    head = start.lstrip()[:6]
    return head.startswith((b"data:", b"event:", b"id:", b"retry:", b":"))


class Decoder(Protocol):
    def decode(self, chunk: bytes) -> bytes: ...

    def flush(self) -> bytes: ...


class _Identity:
    def decode(self, chunk: bytes) -> bytes:
        return chunk

    def flush(self) -> bytes:
        return b""


class _Zlib:
    """gzip and deflate (zlib-wrapped, or raw as some servers send it), incrementally,
    bounded by ``MAX_DECODED_BYTES`` in total."""

    def __init__(self, encoding: str) -> None:
        # 47: gzip or zlib header, detected; deflate tries zlib first, then raw.
        self._wbits = 47 if encoding == "gzip" else 15
        self._raw_fallback = encoding == "deflate"
        self._d: zlib._Decompress | None = None
        self._out = 0
        self.failed = False

    def decode(self, chunk: bytes) -> bytes:
        if self.failed or not chunk:
            return b""
        if self._d is None:
            self._d = zlib.decompressobj(self._wbits)
        try:
            data = self._d.decompress(chunk, max(1, MAX_DECODED_BYTES - self._out))
        except zlib.error:
            if self._raw_fallback and self._out == 0:
                self._raw_fallback = False
                self._d = zlib.decompressobj(-15)
                return self.decode(chunk)
            self.failed = True
            return b""
        self._out += len(data)
        return data

    def flush(self) -> bytes:
        if self.failed or self._d is None:
            return b""
        try:
            return self._d.flush()
        except zlib.error:
            self.failed = True
            return b""


class _Brotli:
    def __init__(self) -> None:
        self._d = _brotli.Decompressor() if _brotli is not None else None
        self._out = 0
        self.failed = self._d is None

    def decode(self, chunk: bytes) -> bytes:
        if self.failed or not chunk or self._d is None:
            return b""
        try:
            data: bytes = self._d.process(chunk)
        except Exception:  # brotli.error: the body is not what it says
            self.failed = True
            return b""
        self._out += len(data)
        if self._out > MAX_DECODED_BYTES:
            self.failed = True
            return b""
        return data

    def flush(self) -> bytes:
        return b""


_DECODERS: dict[str, Callable[[], Decoder]] = {
    "": _Identity,
    "identity": _Identity,
    "gzip": lambda: _Zlib("gzip"),
    "x-gzip": lambda: _Zlib("gzip"),
    "deflate": lambda: _Zlib("deflate"),
    "br": _Brotli,
}


def decoder_for(content_encoding: str) -> Decoder | None:
    """An incremental decoder for a ``content-encoding`` value, or None when unknown."""
    factory = _DECODERS.get(content_encoding.strip().lower())
    return factory() if factory is not None else None


def decode_body(body: bytes, content_encoding: str) -> bytes | None:
    """The whole body decoded, or None when its encoding is unknown or it does not decode."""
    decoder = decoder_for(content_encoding)
    if decoder is None:
        return None
    data = decoder.decode(body) + decoder.flush()
    if getattr(decoder, "failed", False):
        return None
    return data


def summarize(fmt: str, body: bytes, content_type: str, content_encoding: str) -> ResponseSummary:
    """What a whole response body says (usage, model, delivered text), whatever its
    content type and encoding: SSE when it is one, JSON otherwise. A body that cannot be
    decoded says nothing (``ResponseSummary()``)."""
    data = decode_body(body, content_encoding)
    if data is None:
        return ResponseSummary()
    if is_event_stream(content_type) or looks_like_sse(data[:64]):
        parser = new_stream_parser(fmt)
        parser.feed(data)
        return parser.finish()
    return parse_json(fmt, data)

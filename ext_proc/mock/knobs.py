"""The mock's behaviour knobs: process defaults (``MockOptions``) and per-request headers."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any


@dataclass(frozen=True, slots=True)
class MockOptions:
    """Defaults used when a request carries no knob header."""

    latency_ms: int = 0  # before the response headers
    ttft_ms: int = 0  # after the headers, before the first stream event
    chunk_delay_ms: int = 0  # between content chunks
    chunks: int | None = None  # content chunks per stream (None: one per token)
    completion_tokens: int | None = None  # None: a short sentence naming the model
    history: int = 1000  # requests kept for /_mock/requests

    def __post_init__(self) -> None:
        for name in ("latency_ms", "ttft_ms", "chunk_delay_ms", "completion_tokens"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must not be negative (got {value})")
        if self.chunks is not None and self.chunks < 1:
            raise ValueError(f"chunks must be at least 1 (got {self.chunks})")
        if self.history < 1:
            raise ValueError(f"history must be at least 1 (got {self.history})")


@dataclass(frozen=True, slots=True)
class Knobs:
    """What one request asks of the mock (headers over ``MockOptions``)."""

    latency_ms: int
    ttft_ms: int
    chunk_delay_ms: int
    chunks: int | None
    completion_tokens: int | None
    status: int | None  # answer this error status instead
    cut_after: int | None  # abort the connection after this many content chunks
    cached_tokens: int
    reasoning_tokens: int

    @classmethod
    def defaults(cls, options: MockOptions) -> Knobs:
        return cls(
            latency_ms=options.latency_ms,
            ttft_ms=options.ttft_ms,
            chunk_delay_ms=options.chunk_delay_ms,
            chunks=options.chunks,
            completion_tokens=options.completion_tokens,
            status=None,
            cut_after=None,
            cached_tokens=0,
            reasoning_tokens=0,
        )


class KnobError(ValueError):
    """A knob header holds a value we cannot use; the message names the header."""


# Header name -> Knobs field, minimum accepted value.
_HEADERS: tuple[tuple[str, str, int], ...] = (
    ("x-mock-latency-ms", "latency_ms", 0),
    ("x-mock-ttft-ms", "ttft_ms", 0),
    ("x-mock-chunk-delay-ms", "chunk_delay_ms", 0),
    ("x-mock-chunks", "chunks", 1),
    ("x-mock-completion-tokens", "completion_tokens", 0),
    ("x-mock-status", "status", 400),
    ("x-mock-cut-after", "cut_after", 0),
    ("x-mock-cached-tokens", "cached_tokens", 0),
    ("x-mock-reasoning-tokens", "reasoning_tokens", 0),
)


def read_knobs(headers: dict[str, str], defaults: Knobs) -> Knobs:
    """``defaults`` overridden by the request's ``x-mock-*`` headers."""
    changes: dict[str, Any] = {}
    for header, name, minimum in _HEADERS:
        raw = headers.get(header)
        if raw is None:
            continue
        try:
            value = int(raw.strip())
        except ValueError:
            raise KnobError(f"{header}: {raw!r} is not an integer") from None
        if value < minimum:
            raise KnobError(f"{header}: {value} is below {minimum}")
        if name == "status" and value > 599:
            raise KnobError(f"{header}: {value} is not an error status (400..599)")
        changes[name] = value
    return replace(defaults, **changes) if changes else defaults

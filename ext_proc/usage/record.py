"""The usage record: one per request that reached the gateway.

Field names are the ``usage_records`` column names (DESIGN.md "Usage records" fixes
the first group; the rest are ours). ``COLUMNS`` is the order the writer copies in.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from operator import attrgetter
from typing import Literal

Decision = Literal["allowed", "denied", "error"]


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(slots=True)
class UsageRecord:
    request_id: str
    created_at: datetime = field(default_factory=_now)
    org_id: str | None = None
    app_id: str | None = None
    key_id: str | None = None
    endpoint: str | None = None  # "/v1/chat/completions", "/v1/embeddings", ...
    model: str | None = None  # as the app asked for it
    response_model: str | None = None  # as the provider reported it
    provider: str | None = None
    deployment: str | None = None
    stream: bool = False
    status_code: int | None = None  # what the app received (499 if it went away first)
    decision: Decision = "allowed"
    policy: str | None = None  # the deciding policy, if any
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    tokens_estimated: bool = False  # True when counted by us, not reported by the provider
    latency_ms: float | None = None
    ttft_ms: float | None = None
    # --- beyond the contract's columns ---
    environment: str | None = None  # the key's application environment (dev, prod, ...)
    estimated_prompt_tokens: int | None = None  # our tiktoken estimate before the call
    cached_tokens: int | None = None  # prompt tokens served from the provider's cache
    cache_creation_tokens: int | None = None  # Anthropic: prompt tokens written to cache
    reasoning_tokens: int | None = None
    request_bytes: int | None = None
    response_bytes: int | None = None
    partial: bool = False  # stream cut or client cancelled: counts cover what was delivered
    error_code: str | None = None  # the OpenAI-style error.code we answered, if any
    error_message: str | None = None
    policy_violations: list[str] | None = None  # post-check policies that flagged this call
    # "request" | "response" | "access_log": which part of the gateway finished it
    recorded_by: str | None = None


COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(UsageRecord))
# One C-level getter for every column, built once: the writer calls it per record.
_ROW = attrgetter(*COLUMNS)


# When two parts of the gateway record the same request (a race at a reset upstream),
# the access log's record replaces the other: it is what Envoy actually sent the app.
PREFERRED_RECORDER = "access_log"


def record_row(record: UsageRecord) -> tuple[object, ...]:
    """The record as a tuple in ``COLUMNS`` order (for COPY)."""
    return _ROW(record)

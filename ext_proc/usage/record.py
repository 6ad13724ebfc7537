"""The usage record: one per request that reached the gateway.

Field names are the ``usage_records`` column names (DESIGN.md "Usage records" fixes
the first group; the rest are ours). ``COLUMNS`` is the order the writer copies in.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from decimal import Decimal
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
    # USD at the price in force when the request ran (ext_proc.usage.pricing), exact to
    # 1e-10; None only when the model has no price.
    cost_usd: Decimal | None = None
    attempts: int | None = None  # upstream tries (fallbacks and retries included)


COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(UsageRecord))
# One C-level getter for every column, built once: the writer calls it per record.
_ROW = attrgetter(*COLUMNS)


# When two records of one request reach the table, the higher rank wins (equal ranks:
# the first stays). The access log's record of a plain answer is Envoy's own account of
# what the app received; the request side's and the response processor's are exact for
# what they own; a fallback rebuilt from the usage log for a request another process
# owned (or lost in a crash) only stands in until the owner's record lands.
RECORDER_RANK: dict[str | None, int] = {
    "access_log_fallback": 0,
    None: 1,
    "request": 1,
    "response": 1,
    "access_log": 2,
}


def rank(record: UsageRecord) -> int:
    return RECORDER_RANK.get(record.recorded_by, 1)


def rank_sql(column: str) -> str:
    """The same ranking as a SQL expression over a ``recorded_by`` column."""
    cases = " ".join(
        f"WHEN '{name}' THEN {value}" for name, value in RECORDER_RANK.items() if name is not None
    )
    return f"(CASE {column} {cases} ELSE 1 END)"


def record_row(record: UsageRecord) -> tuple[object, ...]:
    """The record as a tuple in ``COLUMNS`` order (for COPY)."""
    return _ROW(record)

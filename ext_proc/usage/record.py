"""The usage record: one per request that reached the gateway.

Field names are the ``usage_records`` column names (DESIGN.md "Usage records" fixes
the first group; the rest are ours). ``COLUMNS`` is the order the writer copies in.

Text columns hold what Postgres ``text`` can: no NUL (U+0000, valid in JSON and in a
Python str, refused by Postgres), no lone surrogate (not UTF-8), and a bounded length.
Whoever fills a record from app input cleans it with ``clean_text`` at the source; the
writer's ``record_row`` checks every text field again, so a value that slipped through
costs its NUL, never the row.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from decimal import Decimal
from operator import attrgetter, itemgetter
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

# What stands for a character a text column cannot hold.
REPLACEMENT = "\ufffd"
# Longest text kept, in characters: at most 2,000 bytes of UTF-8, under Postgres's
# limit for a btree index entry (about 2,700 bytes; request_id, model and the ids are
# indexed). error_message is not indexed and may be longer.
MAX_TEXT = 500
MAX_MESSAGE = 2000
_SURROGATES = re.compile("[\ud800-\udfff]")


def _storable(value: str, limit: int) -> bool:
    return "\x00" not in value and len(value) <= limit and (value.isascii() or _utf8(value))


def clean_text(value: str, limit: int = MAX_TEXT) -> str:
    """``value`` as a text column holds it: NUL and lone surrogates replaced by U+FFFD,
    at most ``limit`` characters. The common case (nothing to change) allocates nothing."""
    if _storable(value, limit):
        return value
    value = _SURROGATES.sub(REPLACEMENT, value.replace("\x00", REPLACEMENT))
    return value[:limit]


# The text columns' positions in a row; error_message's limit is its own.
_TEXT_POSITIONS = tuple(
    i for i, f in enumerate(fields(UsageRecord)) if str(f.type).startswith(("str", "Decision"))
)
_TEXTS = itemgetter(*_TEXT_POSITIONS)
_MESSAGE = COLUMNS.index("error_message")
_VIOLATIONS = COLUMNS.index("policy_violations")


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
    """The record as a tuple in ``COLUMNS`` order (for COPY), every text value one
    Postgres stores (``clean_text``): a NUL must not cost the row. The check is one pass
    over the record's text joined; only a record that needs it is copied and cleaned."""
    row: tuple[object, ...] = _ROW(record)
    violations = row[_VIOLATIONS]
    try:
        joined = "".join(filter(None, _TEXTS(row)))
        if violations:
            joined += "".join(violations)  # type: ignore[arg-type]
    except TypeError:  # not text where text goes: kept as its str
        return _cleaned(row)
    if (
        "\x00" in joined
        or not (joined.isascii() or _utf8(joined))
        or (len(joined) > MAX_TEXT and _too_long(row))
    ):
        return _cleaned(row)
    return row


def _too_long(row: tuple[object, ...]) -> bool:
    message = row[_MESSAGE]
    if isinstance(message, str) and len(message) > MAX_MESSAGE:
        return True
    violations = row[_VIOLATIONS]
    values = [*_TEXTS(row), *(violations if isinstance(violations, list) else ())]
    return any(isinstance(v, str) and len(v) > MAX_TEXT and v is not message for v in values)


def _utf8(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _cleaned(row: tuple[object, ...]) -> tuple[object, ...]:
    values = list(row)
    for i in _TEXT_POSITIONS:
        value = values[i]
        if value is not None:
            values[i] = clean_text(str(value), MAX_MESSAGE if i == _MESSAGE else MAX_TEXT)
    violations = values[_VIOLATIONS]
    if isinstance(violations, list):
        values[_VIOLATIONS] = [clean_text(str(v)) for v in violations]
    return tuple(values)

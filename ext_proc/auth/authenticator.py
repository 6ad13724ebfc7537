"""Who is calling: the gateway API key in the request headers -> an ``Identity``.

The key is read from ``Authorization: Bearer <key>`` (OpenAI SDKs), else ``api-key``
(Azure SDK), else ``x-api-key`` (Anthropic style); header names in lower case, as Envoy
sends them. It is hashed (sha256, about a microsecond) and looked up in the key cache
(memory → Redis → Postgres). Failures raise ``AuthError`` with a reason the caller maps
to a 401; its message never holds more of the key than its visible prefix.

When the key is in no cache (nor a stale one: see ``ext_proc.auth.store`` for how
long a known key works while Postgres is down) and Postgres cannot answer within the
lookup deadline, ``authenticate`` raises ``ext_proc.stores.cache.CacheUnavailable``:
the caller answers 503, not 401.
Its time is part of ``ext_proc_phase_duration_seconds{phase="request_headers"}``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from ext_proc.auth.keys import KeyRecord, hash_key, key_prefix, looks_like_key
from ext_proc.stores.cache import TieredCache

# Where the key may be, in the order they are read. The caller strips all of them
# before the request goes upstream: the key must never reach a provider.
KEY_HEADERS: tuple[str, ...] = ("authorization", "api-key", "x-api-key")

AuthFailure = Literal["missing", "unknown", "expired", "revoked"]


class AuthError(Exception):
    """Authentication failed; ``reason`` is for metrics and codes, ``message`` for people."""

    def __init__(self, reason: AuthFailure, message: str, record: KeyRecord | None = None) -> None:
        super().__init__(message)
        self.reason: AuthFailure = reason
        self.message = message
        self.record = record  # the key's record when it exists (revoked / expired)


@dataclass(frozen=True, slots=True)
class Identity:
    key_id: str
    app: str
    org: str
    environment: str
    key_prefix: str


def _utc_now() -> datetime:
    return datetime.now(UTC)


def extract_key(headers: Mapping[str, str]) -> str | None:
    """The key sent, or None. An ``authorization`` header that is not ``Bearer`` is
    skipped (the other headers may still carry the key)."""
    authorization = headers.get("authorization")
    if authorization:
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    for name in KEY_HEADERS[1:]:
        value = headers.get(name)
        if value and value.strip():
            return value.strip()
    return None


class Authenticator:
    def __init__(
        self,
        cache: TieredCache[KeyRecord],
        clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        self._cache = cache
        self._clock = clock

    @property
    def cache(self) -> TieredCache[KeyRecord]:
        return self._cache

    async def authenticate(self, headers: Mapping[str, str]) -> Identity:
        """The caller's identity; raises ``AuthError`` (401) or ``CacheUnavailable`` (503)."""
        key = extract_key(headers)
        if key is None:
            raise AuthError(
                "missing",
                "missing API key: send it as 'Authorization: Bearer <key>', "
                "or in an 'api-key' or 'x-api-key' header",
            )
        if not looks_like_key(key):
            # Not even the shape of a gateway key (e.g. a provider's own key): answered
            # without a lookup, and without echoing any of it.
            raise AuthError(
                "unknown",
                "invalid API key: gateway keys start with 'gwk_' "
                "(create one with `ext-proc keys create --app NAME`)",
            )
        record = await self._cache.get(hash_key(key))
        prefix = key_prefix(key)
        if record is None:
            raise AuthError("unknown", f"invalid API key {prefix}...: no such key")
        status = record.status(self._clock())
        if status == "revoked":
            assert record.revoked_at is not None
            raise AuthError(
                "revoked",
                f"API key {prefix}... ({record.key_id}) was revoked at "
                f"{record.revoked_at.isoformat(timespec='seconds')}",
                record,
            )
        if status == "expired":
            assert record.expires_at is not None
            raise AuthError(
                "expired",
                f"API key {prefix}... ({record.key_id}) expired at "
                f"{record.expires_at.isoformat(timespec='seconds')}",
                record,
            )
        return Identity(
            key_id=record.key_id,
            app=record.app,
            org=record.org,
            environment=record.environment,
            key_prefix=record.prefix,
        )

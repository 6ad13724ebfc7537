"""Authentication: gateway API keys (format, store, CLI) and the per-request check.

``Authenticator(key_cache(pool, redis=..., prefix=...)).authenticate(headers)`` turns
the key in a request into an ``Identity`` (key id, app, org, environment, prefix) or
raises ``AuthError(reason, message)``.
"""

from __future__ import annotations

from ext_proc.auth.authenticator import (
    KEY_HEADERS,
    Authenticator,
    AuthError,
    AuthFailure,
    Identity,
    extract_key,
)
from ext_proc.auth.keys import KeyRecord, KeyRecordCodec, hash_key
from ext_proc.auth.store import KEY_CACHE_NAME, KEY_KIND, key_cache, lookup_key

__all__ = [
    "KEY_CACHE_NAME",
    "KEY_HEADERS",
    "KEY_KIND",
    "AuthError",
    "AuthFailure",
    "Authenticator",
    "Identity",
    "KeyRecord",
    "KeyRecordCodec",
    "extract_key",
    "hash_key",
    "key_cache",
    "lookup_key",
]

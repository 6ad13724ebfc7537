"""Gateway API keys: their format, hash, visible prefix and id; the cached key record.

A key is ``gwk_`` followed by 43 base62 characters drawn with ``secrets``: 62**43 is
just over 2**256, so a key carries 256 bits of randomness. Only its sha256 (hex) is
stored; a fast hash is right for values this random (see schema/0002_catalog.sql). The
first 12 characters (``gwk_`` + 8) are the visible prefix shown in listings and error
messages. Key ids (``key_`` + 12 hex characters) name keys in the CLI, the admin API and
usage records; they reveal nothing about the key.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

import orjson

KEY_SCHEME = "gwk_"
KEY_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
KEY_RANDOM_CHARS = 43  # 62**43 > 2**256
KEY_LENGTH = len(KEY_SCHEME) + KEY_RANDOM_CHARS
PREFIX_LENGTH = 12
KEY_PATTERN = re.compile(rf"{KEY_SCHEME}[0-9A-Za-z]{{{KEY_RANDOM_CHARS}}}")
KEY_ID_PATTERN = re.compile(r"key_[0-9a-f]{12}")

KeyStatus = Literal["active", "expired", "revoked"]


def generate_key() -> str:
    """A new key: ``gwk_`` + 43 base62 characters, uniform over 62**43 values."""
    number = secrets.randbelow(len(KEY_ALPHABET) ** KEY_RANDOM_CHARS)
    chars = []
    for _ in range(KEY_RANDOM_CHARS):
        number, digit = divmod(number, len(KEY_ALPHABET))
        chars.append(KEY_ALPHABET[digit])
    return KEY_SCHEME + "".join(chars)


def generate_key_id() -> str:
    return "key_" + secrets.token_hex(6)


def hash_key(key: str) -> str:
    """sha256 (hex) of the whole key: what the database stores and lookups use."""
    return hashlib.sha256(key.encode()).hexdigest()


def key_prefix(key: str) -> str:
    return key[:PREFIX_LENGTH]


def looks_like_key(text: str) -> bool:
    """Has the shape of a gateway key (cheap check before any lookup)."""
    return len(text) == KEY_LENGTH and KEY_PATTERN.fullmatch(text) is not None


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """What authentication needs to know about a key (cached in memory and Redis)."""

    key_id: str
    app: str
    org: str
    environment: str
    prefix: str
    expires_at: datetime | None
    revoked_at: datetime | None

    def status(self, now: datetime) -> KeyStatus:
        """Revoked wins over expired; a rotated key counts as expired after its grace."""
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= now:
            return "expired"
        return "active"


class KeyRecordCodec:
    """KeyRecord <-> orjson bytes, for the Redis tier of the key cache."""

    def encode(self, value: KeyRecord) -> bytes:
        return orjson.dumps(
            [
                value.key_id,
                value.app,
                value.org,
                value.environment,
                value.prefix,
                value.expires_at,
                value.revoked_at,
            ]
        )

    def decode(self, data: bytes) -> KeyRecord:
        key_id, app, org, environment, prefix, expires_at, revoked_at = orjson.loads(data)
        return KeyRecord(
            key_id=key_id,
            app=app,
            org=org,
            environment=environment,
            prefix=prefix,
            expires_at=_time(expires_at),
            revoked_at=_time(revoked_at),
        )


def _time(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)

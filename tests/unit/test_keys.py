"""Key format, hashing, statuses, the Redis codec, and the authenticator's answers
(a memory-only cache over a dict: no services)."""

from __future__ import annotations

import hashlib
import math
from datetime import UTC, datetime, timedelta

import pytest

from ext_proc.auth import Authenticator, AuthError, Identity, extract_key
from ext_proc.auth.keys import (
    KEY_ALPHABET,
    KEY_ID_PATTERN,
    KEY_LENGTH,
    KeyRecord,
    KeyRecordCodec,
    generate_key,
    generate_key_id,
    hash_key,
    key_prefix,
    looks_like_key,
)
from ext_proc.auth.store import KeyInfo
from ext_proc.stores.cache import TieredCache

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)


def record(**changes: object) -> KeyRecord:
    fields: dict[str, object] = {
        "key_id": "key_0123456789ab",
        "app": "support-bot",
        "org": "acme",
        "environment": "prod",
        "prefix": "gwk_AbCdEfGh",
        "expires_at": None,
        "revoked_at": None,
    }
    fields.update(changes)
    return KeyRecord(**fields)  # type: ignore[arg-type]


def test_keys_carry_256_bits_in_a_fixed_shape() -> None:
    assert math.log2(len(KEY_ALPHABET) ** 43) >= 256
    keys = {generate_key() for _ in range(2000)}
    assert len(keys) == 2000
    for key in keys:
        assert key.startswith("gwk_") and len(key) == KEY_LENGTH == 47
        assert set(key[4:]) <= set(KEY_ALPHABET)
        assert looks_like_key(key)
    # Every position varies (no fixed padding from the base62 encoding).
    for position in range(4, KEY_LENGTH):
        assert len({key[position] for key in keys}) > 40


def test_prefix_id_and_hash() -> None:
    key = generate_key()
    assert key_prefix(key) == key[:12]
    assert hash_key(key) == hashlib.sha256(key.encode()).hexdigest()
    ids = {generate_key_id() for _ in range(1000)}
    assert len(ids) == 1000 and all(KEY_ID_PATTERN.fullmatch(i) for i in ids)
    for text in ("", "gwk_short", "sk-" + "a" * 44, "gwk_" + "!" * 43, generate_key() + "x"):
        assert not looks_like_key(text)


def test_record_status() -> None:
    assert record().status(NOW) == "active"
    assert record(expires_at=NOW + timedelta(seconds=1)).status(NOW) == "active"
    assert record(expires_at=NOW).status(NOW) == "expired"
    assert record(revoked_at=NOW - timedelta(days=1)).status(NOW) == "revoked"
    both = record(revoked_at=NOW, expires_at=NOW - timedelta(days=1))
    assert both.status(NOW) == "revoked"


def test_listing_status_shows_rotation() -> None:
    info = KeyInfo(
        key_id="key_0123456789ab",
        app="a",
        org="o",
        environment="default",
        prefix="gwk_AbCdEfGh",
        description=None,
        created_at=NOW,
        expires_at=NOW + timedelta(hours=1),
        revoked_at=None,
        rotated_from=None,
        replaced_by="key_ba9876543210",
        last_used_at=None,
    )
    assert info.status(NOW) == "rotating"
    assert info.status(NOW + timedelta(hours=2)) == "expired"


def test_codec_round_trip() -> None:
    codec = KeyRecordCodec()
    for value in (record(), record(expires_at=NOW, revoked_at=NOW + timedelta(microseconds=5))):
        assert codec.decode(codec.encode(value)) == value


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"authorization": "Bearer K1", "api-key": "K2", "x-api-key": "K3"}, "K1"),
        ({"authorization": "bearer   K1 "}, "K1"),
        ({"authorization": "Basic dXNlcg==", "api-key": "K2"}, "K2"),
        ({"authorization": "Bearer ", "x-api-key": "K3"}, "K3"),
        ({"api-key": "K2", "x-api-key": "K3"}, "K2"),
        ({"x-api-key": " K3 "}, "K3"),
        ({"content-type": "application/json"}, None),
    ],
)
def test_where_the_key_is_read(headers: dict[str, str], expected: str | None) -> None:
    assert extract_key(headers) == expected


class Keys:
    """A key store in a dict, behind a memory-only cache."""

    def __init__(self) -> None:
        self.records: dict[str, KeyRecord] = {}
        self.loads = 0

    async def load(self, key_hash: str) -> KeyRecord | None:
        self.loads += 1
        return self.records.get(key_hash)

    def add(self, **changes: object) -> str:
        key = generate_key()
        self.records[hash_key(key)] = record(prefix=key_prefix(key), **changes)
        return key

    def authenticator(self) -> Authenticator:
        cache = TieredCache("keys", self.load, codec=KeyRecordCodec())
        return Authenticator(cache, clock=lambda: NOW)


async def test_an_active_key_gives_its_identity() -> None:
    keys = Keys()
    key = keys.add()
    auth = keys.authenticator()
    identity = await auth.authenticate({"authorization": f"Bearer {key}"})
    assert identity == Identity("key_0123456789ab", "support-bot", "acme", "prod", key[:12])
    await auth.authenticate({"api-key": key})
    assert keys.loads == 1  # the second lookup came from memory


@pytest.mark.parametrize(
    ("changes", "reason", "words"),
    [
        ({"revoked_at": NOW - timedelta(minutes=1)}, "revoked", "was revoked at 2025-06-01T11:59"),
        ({"expires_at": NOW - timedelta(minutes=1)}, "expired", "expired at 2025-06-01T11:59"),
    ],
)
async def test_revoked_and_expired_keys(
    changes: dict[str, object], reason: str, words: str
) -> None:
    keys = Keys()
    key = keys.add(**changes)
    with pytest.raises(AuthError) as info:
        await keys.authenticator().authenticate({"x-api-key": key})
    assert info.value.reason == reason
    assert words in info.value.message
    assert key[:12] in info.value.message and key not in info.value.message
    assert key[12:20] not in info.value.message


async def test_missing_malformed_and_unknown_keys() -> None:
    keys = Keys()
    auth = keys.authenticator()
    with pytest.raises(AuthError) as info:
        await auth.authenticate({})
    assert info.value.reason == "missing"
    assert "Authorization: Bearer <key>" in info.value.message

    provider_key = "sk-proj-" + "x" * 40
    with pytest.raises(AuthError) as info:
        await auth.authenticate({"authorization": f"Bearer {provider_key}"})
    assert info.value.reason == "unknown" and "sk-proj" not in info.value.message
    assert keys.loads == 0  # malformed keys never reach the store

    unknown = generate_key()
    with pytest.raises(AuthError) as info:
        await auth.authenticate({"authorization": f"Bearer {unknown}"})
    assert info.value.reason == "unknown"
    assert unknown[:12] in info.value.message and unknown not in info.value.message
    with pytest.raises(AuthError):
        await auth.authenticate({"authorization": f"Bearer {unknown}"})
    assert keys.loads == 1  # the unknown key was cached as unknown

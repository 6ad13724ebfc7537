"""``ext-proc keys`` and the key store against the real Postgres and Redis: the key is
printed once and stored nowhere, listing, revocation, rotation with a grace period, and
what authentication answers for each state."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
import redis.asyncio as aioredis

from ext_proc.auth import Authenticator, AuthError, Identity, key_cache
from ext_proc.auth.keys import KEY_ID_PATTERN, KEY_PATTERN, hash_key
from ext_proc.auth.store import (
    KeyNotActive,
    UnknownApplication,
    UnknownEnvironment,
    UnknownKey,
    create_key,
    list_keys,
    lookup_key,
    revoke_key,
    rotate_key,
)
from ext_proc.stores.cache import redis_key
from tests.integration.conftest import Cli

pytestmark = pytest.mark.integration


GATEWAY = """\
providers:
  mock: {type: openai, base_url: "http://127.0.0.1:8001"}
models:
  gpt-4o-mini: {provider: mock}
policies:
  small: {type: request_size, max_bytes: 1000}
applications:
  support-bot: {org: acme, environments: {prod: {policies: [small]}}}
  batch-jobs: {org: globex}
"""


@pytest.fixture
def gateway_yaml() -> str:
    """What the shared ``pool`` fixture applies."""
    return GATEWAY


@pytest.fixture
def cli(pool: asyncpg.Pool, cli: Cli) -> Cli:
    """The shared CLI fixture, once this module's catalog is applied (``pool``)."""
    return cli


def authenticator(
    pool: asyncpg.Pool, redis: aioredis.Redis | None = None, prefix: str = "gw:"
) -> Authenticator:
    return Authenticator(key_cache(pool, redis=redis, prefix=prefix))


async def test_create_prints_the_key_last_and_stores_only_its_hash(
    cli: Cli, pool: asyncpg.Pool
) -> None:
    code, out, err = await cli(
        "keys", "create", "--app", "support-bot", "--env", "prod", "--description", "ci bot"
    )
    assert code == 0, err
    lines = out.splitlines()
    key = lines[-1]
    assert KEY_PATTERN.fullmatch(key)
    assert all(key not in line for line in lines[:-1])
    assert "for application support-bot (org acme), environment prod" in lines[0]
    key_id = lines[0].split()[2]
    assert KEY_ID_PATTERN.fullmatch(key_id)

    row = await pool.fetchrow("SELECT * FROM api_keys WHERE id = $1", key_id)
    assert row is not None
    assert row["key_hash"] == hashlib.sha256(key.encode()).hexdigest()
    assert row["prefix"] == key[:12] and row["description"] == "ci bot"
    assert row["expires_at"] is None and row["revoked_at"] is None
    # The plaintext (or its secret part) is in no column of any table.
    secret = key.removeprefix("gwk_")[8:]
    tables = await pool.fetch(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
    )
    for table in tables:
        rows = await pool.fetch(f'SELECT t::text AS row FROM "{table["table_name"]}" t')
        assert not [r for r in rows if key in r["row"] or secret in r["row"]], table

    identity = await authenticator(pool).authenticate({"authorization": f"Bearer {key}"})
    assert identity == Identity(key_id, "support-bot", "acme", "prod", key[:12])


async def test_create_with_expiry_and_unknown_names(cli: Cli, pool: asyncpg.Pool) -> None:
    code, out, _ = await cli("keys", "create", "--app", "batch-jobs", "--expires-in", "30d")
    assert code == 0
    record = await lookup_key(pool, hash_key(out.splitlines()[-1]))
    assert record is not None and record.expires_at is not None
    assert abs(record.expires_at - datetime.now(UTC) - timedelta(days=30)) < timedelta(minutes=1)

    code, out, err = await cli("keys", "create", "--app", "nope")
    assert (code, out) == (2, "")
    assert "unknown application 'nope' (known: batch-jobs, support-bot)" in err
    code, out, err = await cli("keys", "create", "--app", "support-bot", "--env", "staging")
    assert (code, out) == (2, "")
    assert (
        "application 'support-bot' has no environment 'staging' (environments: default, prod)"
        in err
    )
    code, _, err = await cli("keys", "create", "--app", "batch-jobs", "--expires-in", "soon")
    assert code == 2 and "invalid duration 'soon'" in err
    assert await pool.fetchval("SELECT count(*) FROM api_keys") == 1


async def test_list_revoke_and_rotate_from_the_cli(
    cli: Cli, pool: asyncpg.Pool, redis: aioredis.Redis, redis_prefix: str
) -> None:
    keys = {}
    for app in ("support-bot", "support-bot", "batch-jobs"):
        code, out, _ = await cli("keys", "create", "--app", app)
        assert code == 0
        key = out.splitlines()[-1]
        keys[(await lookup_key(pool, hash_key(key))).key_id] = key  # type: ignore[union-attr]
    first, second, third = keys

    code, out, _ = await cli("keys", "list")
    assert code == 0
    header, *rows = out.splitlines()
    assert header.split() == ["ID", "APP", "ENV", "PREFIX", "CREATED", "EXPIRES", "STATUS"]
    assert [row.split()[0] for row in rows] == [third, first, second]  # by app, then age
    assert all(row.split()[-1] == "active" for row in rows)
    assert all(key not in out for key in keys.values())
    assert keys[first][:12] in out

    # A replica has the key cached (memory and Redis) before the revocation.
    auth = authenticator(pool, redis, redis_prefix)
    await auth.authenticate({"api-key": keys[first]})
    code, out, err = await cli("keys", "revoke", first)
    assert code == 0, err
    assert out.startswith(f"revoked key {first} ({keys[first][:12]}) of application support-bot")
    tombstone = await redis.get(redis_key(redis_prefix, "keys", hash_key(keys[first])))
    assert tombstone == b"x"
    fresh = authenticator(pool, redis, redis_prefix)  # a replica that heard the message
    with pytest.raises(AuthError) as info:
        await fresh.authenticate({"api-key": keys[first]})
    assert info.value.reason == "revoked"
    code, out, _ = await cli("keys", "revoke", first)
    assert code == 0 and "was already revoked" in out
    code, _, err = await cli("keys", "revoke", "key_000000000000")
    assert code == 2 and "no key with id 'key_000000000000'" in err

    code, out, _ = await cli("keys", "list", "--app", "support-bot")
    assert [row.split()[0] for row in out.splitlines()[1:]] == [second]
    code, out, _ = await cli("keys", "list", "--app", "support-bot", "--all")
    statuses = {row.split()[0]: row.split()[-1] for row in out.splitlines()[1:]}
    assert statuses == {first: "revoked", second: "active"}

    code, out, err = await cli("keys", "rotate", second, "--grace", "1h")
    assert code == 0, err
    new_key = out.splitlines()[-1]
    assert KEY_PATTERN.fullmatch(new_key) and new_key not in keys.values()
    assert out.splitlines()[0].startswith(f"rotated key {second} -> key_")
    new_id = out.splitlines()[0].split()[4]
    code, out, _ = await cli("keys", "list", "--app", "support-bot")
    rows = {row.split()[0]: row for row in out.splitlines()[1:]}
    assert rows[second].endswith(f"rotating -> {new_id}")
    assert rows[new_id].endswith("active")
    code, _, err = await cli("keys", "rotate", first)
    assert code == 2 and f"key {first} is revoked" in err


async def test_rotation_keeps_the_old_key_valid_until_the_grace_ends(
    pool: asyncpg.Pool, redis: aioredis.Redis, redis_prefix: str
) -> None:
    old = await create_key(pool, "support-bot", environment="prod", description="web")
    rotated = await rotate_key(pool, old.info.key_id, grace=3600, redis=redis, prefix=redis_prefix)
    assert rotated.published
    assert rotated.replaced is not None and rotated.replaced.key_id == old.info.key_id
    assert rotated.info.rotated_from == old.info.key_id
    assert (rotated.info.app, rotated.info.environment) == ("support-bot", "prod")
    assert rotated.info.description == "web"
    grace_end = rotated.replaced.expires_at
    assert grace_end is not None
    assert abs(grace_end - datetime.now(UTC) - timedelta(hours=1)) < timedelta(minutes=1)

    auth = authenticator(pool)
    assert (await auth.authenticate({"x-api-key": old.key})).key_id == old.info.key_id
    assert (await auth.authenticate({"x-api-key": rotated.key})).key_id == rotated.info.key_id
    # The same record, seen after the grace ends, counts as expired.
    late = Authenticator(key_cache(pool), clock=lambda: grace_end + timedelta(seconds=1))
    with pytest.raises(AuthError) as info:
        await late.authenticate({"x-api-key": old.key})
    assert info.value.reason == "expired"
    # And once the grace end is in the past in the database.
    await pool.execute(
        "UPDATE api_keys SET expires_at = now() - interval '1 second' WHERE id = $1",
        old.info.key_id,
    )
    with pytest.raises(AuthError) as info:
        await authenticator(pool).authenticate({"x-api-key": old.key})
    assert info.value.reason == "expired"
    assert old.key not in info.value.message and old.key[:12] in info.value.message

    with pytest.raises(KeyNotActive, match="expired"):
        await rotate_key(pool, old.info.key_id)
    again = await rotate_key(pool, rotated.info.key_id, grace=60)
    with pytest.raises(KeyNotActive, match=f"already rotated to {again.info.key_id}"):
        await rotate_key(pool, rotated.info.key_id)
    await rotate_key(pool, again.info.key_id, grace=0)
    with pytest.raises(AuthError) as info:  # grace 0: the old key stops at once
        await authenticator(pool).authenticate({"x-api-key": again.key})
    assert info.value.reason == "expired"


async def test_authentication_reasons(pool: asyncpg.Pool) -> None:
    auth = authenticator(pool)
    with pytest.raises(AuthError) as info:
        await auth.authenticate({"content-type": "application/json"})
    assert info.value.reason == "missing"

    unknown = "gwk_" + "A" * 43
    with pytest.raises(AuthError) as info:
        await auth.authenticate({"authorization": f"Bearer {unknown}"})
    assert info.value.reason == "unknown"
    assert unknown not in info.value.message and "gwk_AAAAAAAA..." in info.value.message

    revoked = await create_key(pool, "batch-jobs")
    await revoke_key(pool, revoked.info.key_id)
    with pytest.raises(AuthError) as info:
        await auth.authenticate({"authorization": f"Bearer {revoked.key}"})
    assert info.value.reason == "revoked"
    assert revoked.key not in info.value.message

    expired = await create_key(pool, "batch-jobs", expires_in=3600)
    await pool.execute(
        "UPDATE api_keys SET expires_at = now() - interval '1 minute' WHERE id = $1",
        expired.info.key_id,
    )
    with pytest.raises(AuthError) as info:
        await auth.authenticate({"api-key": expired.key})
    assert info.value.reason == "expired"

    valid = await create_key(pool, "batch-jobs")
    identity = await auth.authenticate({"x-api-key": valid.key})
    assert (identity.app, identity.org, identity.environment) == ("batch-jobs", "globex", "default")


async def test_store_errors(pool: asyncpg.Pool) -> None:
    with pytest.raises(UnknownApplication):
        await create_key(pool, "nope")
    with pytest.raises(UnknownEnvironment):
        await create_key(pool, "batch-jobs", environment="prod")
    with pytest.raises(UnknownKey):
        await revoke_key(pool, "key_000000000000")
    with pytest.raises(UnknownKey):
        await rotate_key(pool, "key_000000000000")
    with pytest.raises(UnknownApplication):
        await list_keys(pool, app="nope")


async def test_keys_on_an_unmigrated_database(unmigrated_cli: Cli) -> None:
    code, out, err = await unmigrated_cli("keys", "create", "--app", "x")
    assert code == 2
    assert out == "" and "run `ext-proc migrate` first" in err

"""Admin API tokens besides ``EXT_PROC_ADMIN_TOKEN``: create, list, revoke, look up.

A token is ``gwa_`` + 43 base62 characters (256 random bits, like API keys); only its
sha256 and a 12-character prefix are stored (schema/0006_control_plane.sql). Each has a
name (unique among usable tokens), a role (``admin`` reads and writes, ``viewer`` reads)
and optionally an organization: an org-scoped token sees and changes only that
organization's objects, usage and activity.

Tokens are looked up on every admin request (no cache): a revocation is effective on
every replica at once, and admin traffic is small.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

import asyncpg

TOKEN_SCHEME = "gwa_"
_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_RANDOM_CHARS = 43  # 62**43 > 2**256
TOKEN_PATTERN = re.compile(rf"{TOKEN_SCHEME}[0-9A-Za-z]{{{_RANDOM_CHARS}}}")
PREFIX_LENGTH = 12

Role = Literal["admin", "viewer"]
ROLES: tuple[Role, ...] = ("admin", "viewer")


class TokenError(Exception):
    """A token operation cannot be done as asked; the message says why."""


class UnknownOrganization(TokenError):
    pass


class TokenExists(TokenError):
    pass


class UnknownToken(TokenError):
    pass


@dataclass(frozen=True, slots=True)
class TokenInfo:
    """A token as listed (never the token itself)."""

    id: str
    name: str
    role: Role
    org: str | None
    prefix: str
    created_by: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None

    def as_dict(self) -> dict[str, object]:
        return {
            "id": self.id,
            "name": self.name,
            "role": self.role,
            "org": self.org,
            "prefix": self.prefix,
            "created_by": self.created_by,
            "created_at": self.created_at.isoformat(),
            "expires_at": self.expires_at.isoformat() if self.expires_at else None,
            "revoked_at": self.revoked_at.isoformat() if self.revoked_at else None,
        }


def generate_token() -> str:
    number = secrets.randbelow(len(_ALPHABET) ** _RANDOM_CHARS)
    chars = []
    for _ in range(_RANDOM_CHARS):
        number, digit = divmod(number, len(_ALPHABET))
        chars.append(_ALPHABET[digit])
    return TOKEN_SCHEME + "".join(chars)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def looks_like_token(text: str) -> bool:
    return TOKEN_PATTERN.fullmatch(text) is not None


_INFO = """
SELECT t.id, t.name, t.role, o.name AS org, t.prefix, t.created_by, t.created_at,
       t.expires_at, t.revoked_at, t.last_used_at
  FROM admin_tokens t LEFT JOIN organizations o ON o.id = t.organization_id
"""


def _info(row: asyncpg.Record) -> TokenInfo:
    return TokenInfo(
        id=row["id"],
        name=row["name"],
        role=row["role"],
        org=row["org"],
        prefix=row["prefix"],
        created_by=row["created_by"],
        created_at=row["created_at"],
        expires_at=row["expires_at"],
        revoked_at=row["revoked_at"],
        last_used_at=row["last_used_at"],
    )


async def create_token(
    conn: asyncpg.Connection,
    name: str,
    role: Role,
    *,
    org: str | None,
    created_by: str,
    expires_at: datetime | None = None,
) -> tuple[str, TokenInfo]:
    """A new token (its plaintext is returned here only). Raises ``UnknownOrganization``
    and ``TokenExists`` (a usable token already has this name)."""
    org_id = None
    if org is not None:
        org_id = await conn.fetchval("SELECT id FROM organizations WHERE name = $1", org)
        if org_id is None:
            raise UnknownOrganization(f"unknown organization '{org}'")
    token = generate_token()
    token_id = "tok_" + secrets.token_hex(6)
    try:
        async with conn.transaction():
            await conn.execute(
                "INSERT INTO admin_tokens (id, name, role, organization_id, token_hash, prefix,"
                " created_by, expires_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                token_id,
                name,
                role,
                org_id,
                hash_token(token),
                token[:PREFIX_LENGTH],
                created_by,
                expires_at,
            )
    except asyncpg.UniqueViolationError:
        raise TokenExists(
            f"a usable token named '{name}' exists already: revoke it first, or pick another name"
        ) from None
    row = await conn.fetchrow(_INFO + " WHERE t.id = $1", token_id)
    assert row is not None
    return token, _info(row)


async def list_tokens(
    conn: asyncpg.Connection | asyncpg.Pool,
    *,
    org: str | None = None,
    include_revoked: bool = False,
) -> list[TokenInfo]:
    conditions, args = [], []
    if org is not None:
        args.append(org)
        conditions.append(f"o.name = ${len(args)}")
    if not include_revoked:
        conditions.append("t.revoked_at IS NULL")
    where = f" WHERE {' AND '.join(conditions)}" if conditions else ""
    rows = await conn.fetch(_INFO + where + " ORDER BY t.created_at, t.id", *args)
    return [_info(row) for row in rows]


async def get_active_token(conn: asyncpg.Connection | asyncpg.Pool, name: str) -> TokenInfo | None:
    row = await conn.fetchrow(_INFO + " WHERE t.name = $1 AND t.revoked_at IS NULL", name)
    return None if row is None else _info(row)


async def revoke_token(conn: asyncpg.Connection | asyncpg.Pool, name: str) -> TokenInfo:
    """Revoke the usable token named ``name`` (effective on the next request)."""
    token_id = await conn.fetchval(
        "UPDATE admin_tokens SET revoked_at = now() WHERE name = $1 AND revoked_at IS NULL "
        "RETURNING id",
        name,
    )
    if token_id is None:
        raise UnknownToken(f"no usable admin token named '{name}'")
    row = await conn.fetchrow(_INFO + " WHERE t.id = $1", token_id)
    assert row is not None
    return _info(row)


async def lookup_token(
    conn: asyncpg.Connection | asyncpg.Pool, token: str, *, timeout: float | None = None
) -> TokenInfo | None:
    """The usable (not revoked, not expired) token, None if there is none."""
    row = await conn.fetchrow(
        _INFO + " WHERE t.token_hash = $1 AND t.revoked_at IS NULL "
        "AND (t.expires_at IS NULL OR t.expires_at > now())",
        hash_token(token),
        timeout=timeout,
    )
    return None if row is None else _info(row)

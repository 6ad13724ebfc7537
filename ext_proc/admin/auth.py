"""Who calls the admin API: ``Authorization: Bearer <token>`` -> a ``Principal``.

``EXT_PROC_ADMIN_TOKEN`` is an ``admin`` token (named ``admin``, no organization); more
come from ``POST /v1/tokens`` (``ext_proc.auth.admin_tokens``). No or unknown token:
401. A ``viewer`` writing, or an org-scoped token touching another organization's
objects (or the objects every organization shares: providers, models, policies): 403.
"""

from __future__ import annotations

import asyncio
import hmac
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from ext_proc.admin.errors import QUERY_TIMEOUT, ApiError, unavailable
from ext_proc.auth.admin_tokens import Role, looks_like_token, lookup_token
from ext_proc.stores.postgres import DATABASE_ERRORS

if TYPE_CHECKING:
    from ext_proc.admin.app import Backend

ENV_TOKEN_NAME = "admin"  # how EXT_PROC_ADMIN_TOKEN is named in the audit log

bearer = HTTPBearer(
    auto_error=False,
    description="EXT_PROC_ADMIN_TOKEN, or a token from POST /v1/tokens",
)


@dataclass(frozen=True, slots=True)
class Principal:
    name: str  # the token's name (the audit log's actor)
    role: Role
    org: str | None  # None: every organization

    @property
    def label(self) -> str:
        return self.name if self.org is None else f"{self.name} (org {self.org})"

    def sees(self, org: str | None) -> bool:
        return self.org is None or org == self.org

    def require_org(self, org: str | None, what: str) -> None:
        """403 unless this token may touch ``what``, which belongs to ``org``."""
        if not self.sees(org):
            raise ApiError(
                403,
                f"token {self.name} is scoped to organization {self.org}; {what} belongs to "
                f"{'organization ' + org if org else 'no organization'}",
                "forbidden_organization",
            )

    def require_unscoped(self, what: str) -> None:
        if self.org is not None:
            raise ApiError(
                403,
                f"token {self.name} is scoped to organization {self.org}; {what} is shared "
                "by every organization and needs a token without one",
                "forbidden_organization",
            )


def _backend(request: Request) -> Backend:
    backend: Backend = request.app.state.backend
    return backend


async def reader(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> Principal:
    """Any valid token (reads)."""
    if credentials is None or credentials.scheme.lower() != "bearer" or not credentials.credentials:
        raise ApiError(
            401,
            "missing admin token: send Authorization: Bearer <token>",
            "missing_admin_token",
            headers={"www-authenticate": "Bearer"},
        )
    given = credentials.credentials.strip()
    backend = _backend(request)
    expected = backend.settings.admin_token
    if expected and hmac.compare_digest(given.encode(), expected.encode()):
        return Principal(ENV_TOKEN_NAME, "admin", None)
    if looks_like_token(given):
        pool = backend.pool
        if pool is None:
            raise unavailable("checking this token", None)
        try:
            info = await asyncio.wait_for(lookup_token(pool, given), QUERY_TIMEOUT)
        except DATABASE_ERRORS as exc:
            raise unavailable("checking this token", exc) from None
        if info is not None:
            return Principal(info.name, info.role, info.org)
    raise ApiError(
        401,
        "unknown, revoked or expired admin token",
        "invalid_admin_token",
        headers={"www-authenticate": "Bearer"},
    )


async def writer(principal: Annotated[Principal, Depends(reader)]) -> Principal:
    """An admin token (writes)."""
    if principal.role != "admin":
        raise ApiError(
            403, f"token {principal.name} is a viewer: it can read, not change", "forbidden_role"
        )
    return principal


Reader = Annotated[Principal, Depends(reader)]
Writer = Annotated[Principal, Depends(writer)]

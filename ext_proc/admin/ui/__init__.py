"""The web console: static files served by the admin API at ``/ui/``.

The console is a small static app (plain ES modules, no build step) in ``static/``: it
asks for an admin API token once (kept in the browser's ``sessionStorage``) and calls
the same ``/v1/...`` endpoints as any client, with ``Authorization: Bearer``. Its files
are open like ``/healthz``: they hold no data, every call they make carries the token.

Third-party code is vendored from npm with its licence, under ``static/vendor/``
(``vendor/README.md`` says which versions and how to update them); nothing is loaded
from another origin. The answers carry a strict Content-Security-Policy: scripts and
styles from this origin only, no inline script, no ``eval``.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import RedirectResponse
from starlette.responses import Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

STATIC_DIR = Path(__file__).parent / "static"
PREFIX = "/ui"

CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    )
)
_HEADERS = {
    "content-security-policy": CONTENT_SECURITY_POLICY,
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    # Revalidate every time (ETag / Last-Modified): a new release is seen at once.
    "cache-control": "no-cache",
}


class ConsoleFiles(StaticFiles):
    """The console's files with the security headers above."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(_HEADERS)
        return response


def mount(app: FastAPI) -> None:
    """Serve the console at ``/ui/`` (``/ui`` redirects there); not in the OpenAPI
    document, which describes the API."""

    @app.get(PREFIX, include_in_schema=False)
    async def console_root() -> RedirectResponse:
        return RedirectResponse(f"{PREFIX}/", status_code=308)

    app.mount(PREFIX, ConsoleFiles(directory=STATIC_DIR, html=True), name="console")

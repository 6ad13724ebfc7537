"""``POST /v1/providers/{name}/test``: reach a provider with its credential.

The probe is one cheap authenticated read of each provider type's own API (its model
list: no tokens are spent), sent directly from this process (not through Envoy). It says
whether the provider answered, its status, the latency and, when it failed, why — never
the credential, which is also scrubbed from any error text. A type this table does not
know is probed with a plain ``GET`` of its ``base_url`` (reachability only).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx

from ext_proc.config.model import Provider
from ext_proc.routing.providers.base import api_root

DEFAULT_TIMEOUT = 5.0


def _openai(provider: Provider, credential: str | None) -> tuple[str, dict[str, str]]:
    headers = {"authorization": f"Bearer {credential}"} if credential else {}
    return f"{api_root(provider)}/v1/models", headers


def _azure(provider: Provider, credential: str | None) -> tuple[str, dict[str, str]]:
    version = quote(str(provider.options.get("api_version") or ""), safe="")
    headers = {"api-key": credential} if credential else {}
    prefix = provider.path_prefix.rstrip("/")
    return f"{prefix}/openai/models?api-version={version}", headers


def _anthropic(provider: Provider, credential: str | None) -> tuple[str, dict[str, str]]:
    headers = {"anthropic-version": str(provider.options.get("anthropic_version") or "2023-06-01")}
    if credential:
        headers["x-api-key"] = credential
    return f"{api_root(provider)}/v1/models", headers


def _gemini(provider: Provider, credential: str | None) -> tuple[str, dict[str, str]]:
    root = provider.path_prefix.rstrip("/")
    if not root.endswith("/v1beta"):
        root += "/v1beta"
    headers = {"x-goog-api-key": credential} if credential else {}
    return f"{root}/models", headers


# Type -> (path, auth headers) of its probe.
PROBES: dict[str, Callable[[Provider, str | None], tuple[str, dict[str, str]]]] = {
    "openai": _openai,
    "cohere": _openai,
    "azure_openai": _azure,
    "anthropic": _anthropic,
    "gemini": _gemini,
}


@dataclass(frozen=True, slots=True)
class ProbeResult:
    ok: bool
    status: int | None
    latency_ms: float | None
    error: str | None
    url: str  # scheme, host and path probed (no credential is ever in a URL)
    has_credential: bool

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "status": self.status,
            "latency_ms": self.latency_ms,
            "error": self.error,
            "url": self.url,
            "has_credential": self.has_credential,
        }


async def probe(
    provider: Provider,
    credential: str | None,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    transport: httpx.AsyncBaseTransport | None = None,
) -> ProbeResult:
    build = PROBES.get(provider.type)
    headers: dict[str, str]
    if build is None:
        path, headers = provider.path_prefix or "/", {}
    else:
        path, headers = build(provider, credential)
    headers = {**dict(provider.headers), **headers}
    origin = provider.base_url[: len(provider.base_url) - len(provider.path_prefix)]
    url = origin + (path if path.startswith("/") else "/" + path)
    shown = url.split("?", 1)[0]
    if provider.has_credential and not credential:
        where = provider.api_key_env or provider.api_key_file
        return ProbeResult(
            False,
            None,
            None,
            f"the credential is not configured in this process ({where} is unset or unreadable)",
            shown,
            False,
        )
    started = time.perf_counter()
    try:
        async with httpx.AsyncClient(
            timeout=timeout, transport=transport, follow_redirects=False
        ) as client:
            response = await client.get(url, headers=headers)
    except (httpx.HTTPError, httpx.InvalidURL, UnicodeError, ValueError) as exc:
        # InvalidURL and the IDNA codec's errors are not HTTPErrors: a host that cannot
        # even be addressed is a failed probe too, not a failure of the API.
        return ProbeResult(
            False, None, None, _scrub(f"{type(exc).__name__}: {exc}", credential), shown, True
        )
    latency = round((time.perf_counter() - started) * 1000, 1)
    ok = 200 <= response.status_code < 300
    error = None
    if not ok:
        error = _scrub(_reason(response), credential)
    return ProbeResult(ok, response.status_code, latency, error, shown, credential is not None)


def _reason(response: httpx.Response) -> str:
    text = response.text[:300]
    try:
        body = response.json()
    except ValueError:
        return f"HTTP {response.status_code}: {text}".strip()
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and error.get("message"):
        return f"HTTP {response.status_code}: {error['message']}"[:300]
    return f"HTTP {response.status_code}: {text}".strip()


def _scrub(text: str, credential: str | None) -> str:
    if credential:
        text = text.replace(credential, "[credential]")
    return text[:500]

"""What every provider adapter offers the request processor."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from ext_proc.config.model import Provider
from ext_proc.routing.endpoints import Endpoint, Operation
from ext_proc.routing.translate.base import TranslatedRequest

Headers = tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class UpstreamCall:
    path: str  # the :path sent upstream (with query string)
    headers: Headers  # credential and static headers to set
    body: bytes | None  # replacement body, or None to send the app's body untouched


class ProviderAdapter(Protocol):
    response_format: str  # the usage parser format (ext_proc.tokens.parsers)
    has_credential: bool  # a key is configured and loaded (or none is needed)

    def supports(self, operation: Operation) -> bool: ...

    def translates(self, operation: Operation) -> bool:
        """True when the app's API differs from the provider's for this operation: the
        processor then calls ``translate`` instead of ``prepare``."""
        ...

    def prepare(self, endpoint: Endpoint, deployment: str, body: dict[str, Any]) -> UpstreamCall:
        """Path, headers and (if changed) body for this call; may modify ``body``."""
        ...

    def translate(
        self, endpoint: Endpoint, deployment: str, body: dict[str, Any]
    ) -> TranslatedRequest:
        """The request in the provider's API, and the translator for its response."""
        ...


def api_root(provider: Provider) -> str:
    """The provider's path prefix without a trailing ``/v1``: base_url may be given with
    or without it (SDK defaults differ), and the adapters add ``/v1/...`` themselves."""
    prefix = provider.path_prefix.rstrip("/")
    return prefix[: -len("/v1")] if prefix.endswith("/v1") else prefix


def add_stream_usage(body: dict[str, Any]) -> bool:
    """Ask for a stream's final usage chunk when the app did not; True if ``body`` changed."""
    if body.get("stream") is not True:
        return False
    options = body.get("stream_options")
    if isinstance(options, dict):
        if options.get("include_usage") is True:
            return False
        options["include_usage"] = True
    else:
        body["stream_options"] = {"include_usage": True}
    return True

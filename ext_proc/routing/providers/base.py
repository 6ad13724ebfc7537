"""What a provider type is, and what its adapter offers the request processor.

A provider type is one module in this package exporting ``PROVIDER_TYPE`` (a
``ProviderType``); the package finds them by itself, so adding a type is adding its
module (with its translation pair and usage format where it needs them, each in the
file named for it). The type owns everything that differs between providers:

- its own gateway.yaml fields: ``spec``, a ``ProviderSpec`` subclass (the declared schema
  the file loader, the catalog and the admin API validate with, and the JSON Schema and
  OpenAPI document are generated from); their values become ``Provider.options``;
- the adapter: upstream addressing (paths, api-version, deployment), credential
  injection, which app operations it serves natively or by translation (``call``);
- its usage format (``ext_proc.tokens.parsers``: JSON, SSE, and the fields Envoy reads
  from a JSON answer), and whether a stream's usage can be requested
  (``stream_usage_injectable``);
- the response translators its adapter's calls name (``translations``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Protocol

from ext_proc.config.specs import ProviderSpec
from ext_proc.routing.endpoints import Endpoint, Operation

if TYPE_CHECKING:
    from ext_proc.config.model import Provider
    from ext_proc.routing.translate.base import ResponseTranslator

Headers = tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class UpstreamCall:
    """What the upstream receives for one app request."""

    path: str  # the :path sent upstream (with query string)
    headers: Headers  # credential and static headers to set
    body: bytes | None  # replacement body, or None to send the app's body untouched
    # The answer comes back in another API's shape: the name of the translator
    # (``ProviderType.translations``) that turns it into the app's, "" when none.
    translation: str = ""
    include_usage: bool = False  # a translated stream: the app asked for a usage chunk
    # The usage format of this call's answer when it is not the adapter's own (the
    # Responses API answers in its own shape): "" = ``ProviderAdapter.response_format``.
    response_format: str = ""


class ProviderAdapter(Protocol):
    """One provider (with its credential), built once per config version."""

    response_format: str  # the usage parser format (ext_proc.tokens.parsers)
    has_credential: bool  # a key is configured and loaded (or none is needed)

    def supports(self, operation: Operation) -> bool:
        """The provider serves this app operation (natively or by translation)."""
        ...

    def call(self, endpoint: Endpoint, deployment: str, body: dict[str, Any]) -> UpstreamCall:
        """Path, headers and (when changed) body for this request. A native call may
        modify ``body``; a translated one leaves it as the app sent it (the processor
        estimates tokens from it). Raises ``TranslationError`` for a request the
        provider cannot serve as asked (answered 400)."""
        ...


def _no_translations() -> Mapping[str, Callable[[bool], ResponseTranslator]]:
    return MappingProxyType({})


@dataclass(frozen=True, slots=True)
class ProviderType:
    name: str  # the `type:` in gateway.yaml
    adapter: Callable[[Provider, str | None], ProviderAdapter]
    usage_format: str  # the name of its ext_proc.tokens.parsers format
    # Its gateway.yaml fields: the common ones and its own (``type`` is its name).
    spec: type[ProviderSpec]
    # Its streams report usage only when asked (OpenAI's stream_options.include_usage):
    # the gateway asks unless the provider says `inject_stream_usage: false`.
    stream_usage_injectable: bool = False
    # The response translators its calls may name, by name: factory(include_usage).
    translations: Mapping[str, Callable[[bool], ResponseTranslator]] = field(
        default_factory=_no_translations
    )
    # Its list in the public price table (genai-prices' provider id), for models the
    # file gives no price; None: none (self-hosted), such models have no cost.
    price_list: str | None = None
    about: str = ""  # one line for error messages and docs

    @property
    def options(self) -> tuple[str, ...]:
        """Its own gateway.yaml fields beside the common ones (``Provider.options``)."""
        return self.spec.own_fields()


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

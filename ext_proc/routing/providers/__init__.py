"""Provider types, one module per type, found in this package by themselves.

Each module exports ``PROVIDER_TYPE`` (see ``base.ProviderType``): adding a provider
type is adding its module. An adapter is built once per (provider, credential) at config
load, so per request it only formats a path and, when it must, serialises a body.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING

from ext_proc.routing.providers.base import (
    ProviderAdapter,
    ProviderType,
    UpstreamCall,
)

if TYPE_CHECKING:
    from ext_proc.config.model import Provider
    from ext_proc.routing.translate.base import ResponseTranslator


def _discover() -> Mapping[str, ProviderType]:
    found: dict[str, ProviderType] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name == "base":
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        provider_type = getattr(module, "PROVIDER_TYPE", None)
        if not isinstance(provider_type, ProviderType):
            continue
        if provider_type.name in found:
            raise RuntimeError(f"provider type {provider_type.name!r} is defined twice")
        found[provider_type.name] = provider_type
    return MappingProxyType(found)


PROVIDER_TYPES: Mapping[str, ProviderType] = _discover()

# Every translator any provider's calls may name: the response processor (possibly in
# another process than the request side) rebuilds it from the name in the facts.
RESPONSE_TRANSLATORS: Mapping[str, Callable[[bool], ResponseTranslator]] = MappingProxyType(
    {name: factory for t in PROVIDER_TYPES.values() for name, factory in t.translations.items()}
)


def adapter_for(provider: Provider, credential: str | None) -> ProviderAdapter:
    try:
        provider_type = PROVIDER_TYPES[provider.type]
    except KeyError:
        raise ValueError(
            f"provider {provider.name!r}: unknown type {provider.type!r} "
            f"(known: {', '.join(sorted(PROVIDER_TYPES))})"
        ) from None
    return provider_type.adapter(provider, credential)


__all__ = [
    "PROVIDER_TYPES",
    "RESPONSE_TRANSLATORS",
    "ProviderAdapter",
    "ProviderType",
    "UpstreamCall",
    "adapter_for",
]

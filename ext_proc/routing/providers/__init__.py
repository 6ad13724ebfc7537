"""Provider adapters, one module per provider type, registered by type name.

An adapter turns "this app request goes to this model" into what the upstream must
receive: the path, the credential headers, and a body replacement when one is needed.
It is built once per (provider, credential) at config load, so per request it only
formats a path and, when it must, re-serialises the already parsed body.
"""

from __future__ import annotations

from collections.abc import Callable

from ext_proc.config.model import Provider
from ext_proc.routing.providers.anthropic import AnthropicAdapter
from ext_proc.routing.providers.azure_openai import AzureOpenAIAdapter
from ext_proc.routing.providers.base import ProviderAdapter, UpstreamCall
from ext_proc.routing.providers.openai import OpenAIAdapter

AdapterFactory = Callable[[Provider, "str | None"], ProviderAdapter]

ADAPTERS: dict[str, AdapterFactory] = {
    "openai": OpenAIAdapter,
    "azure_openai": AzureOpenAIAdapter,
    "anthropic": AnthropicAdapter,
}


def adapter_for(provider: Provider, credential: str | None) -> ProviderAdapter:
    try:
        factory = ADAPTERS[provider.type]
    except KeyError:
        raise ValueError(
            f"provider {provider.name!r}: type {provider.type!r} has no adapter yet "
            f"(available: {', '.join(sorted(ADAPTERS))})"
        ) from None
    return factory(provider, credential)


__all__ = ["ADAPTERS", "ProviderAdapter", "UpstreamCall", "adapter_for"]

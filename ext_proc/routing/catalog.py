"""The model catalog: app-facing model name (or Azure deployment) → where it is served.

Built once per config version (and credentials reload); lookups are dict gets. Each
route's price is resolved here too, once: the model's ``price:`` from the file, else the
public table (``ext_proc.usage.pricing``), else none.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ext_proc.config.model import GatewayConfig, Model, Provider
from ext_proc.routing.providers import PROVIDER_TYPES, ProviderAdapter, adapter_for
from ext_proc.usage.pricing import Price, table_price


@dataclass(frozen=True, slots=True)
class Route:
    model: Model
    provider: Provider
    adapter: ProviderAdapter
    encoding_name: str
    price: Price | None = None  # None: no price known (usage rows get cost_usd NULL)
    price_code: str = ""  # ``price.encode()``, computed once: what requests carry
    # Every app-facing name of the model served (its name, then its aliases): what a
    # model allowlist judges, whatever name or Azure deployment the app used.
    names: tuple[str, ...] = ()

    @classmethod
    def of(cls, model: Model, provider: Provider, adapter: ProviderAdapter) -> Route:
        price = resolve_price(model, provider)
        return cls(
            model,
            provider,
            adapter,
            model.encoding_name,
            price,
            price.encode() if price is not None else "",
            (model.name, *model.aliases),
        )

    @property
    def deployment(self) -> str:
        return self.model.deployment


class Catalog:
    def __init__(self, routes: Mapping[str, Route], by_deployment: Mapping[str, Route]) -> None:
        self._routes = dict(routes)
        self._by_deployment = dict(by_deployment)
        self.model_names: tuple[str, ...] = tuple(sorted({r.model.name for r in routes.values()}))

    @classmethod
    def build(cls, config: GatewayConfig, credentials: Mapping[str, str | None]) -> Catalog:
        adapters = {
            name: adapter_for(provider, credentials.get(name))
            for name, provider in config.providers.items()
        }
        routes: dict[str, Route] = {}
        by_deployment: dict[str, Route] = {}
        for model in config.models.values():
            provider = config.providers[model.provider]
            route = Route.of(model, provider, adapters[model.provider])
            for name in (model.name, *model.aliases):
                routes[name] = route
            if provider.type == "azure_openai":
                by_deployment.setdefault(model.deployment, route)
        # An Azure-SDK app names a deployment; a catalog model name works there too.
        for name, route in routes.items():
            by_deployment.setdefault(name, route)
        return cls(routes, by_deployment)

    def resolve(self, model: str) -> Route | None:
        return self._routes.get(model)

    def resolve_deployment(self, deployment: str) -> Route | None:
        return self._by_deployment.get(deployment)


def resolve_price(model: Model, provider: Provider) -> Price | None:
    """The file's price, else the table's for the model served (``deployment``), else
    for the name apps send, in the provider type's price list."""
    if model.price is not None:
        return model.price
    price_list = (
        PROVIDER_TYPES[provider.type].price_list if provider.type in PROVIDER_TYPES else None
    )
    return table_price(price_list, model.deployment, model.name)

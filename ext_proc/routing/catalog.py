"""The model catalog: app-facing model name (or Azure deployment) → where it is served.

Built once per config version (and credentials reload); lookups are dict gets. Each
route's price is resolved here too, once: the model's ``price:`` from the file, else the
public table (``ext_proc.usage.pricing``), else none.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from ext_proc.config.model import GatewayConfig, Model, Provider, Target
from ext_proc.routing.endpoints import Operation
from ext_proc.routing.fallback import chains_of
from ext_proc.routing.providers import PROVIDER_TYPES, ProviderAdapter, adapter_for
from ext_proc.usage.pricing import Price, table_price

_NO_CHAINS: Mapping[Operation, tuple[int, ...]] = MappingProxyType({})


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
    deployment: str = ""  # what the provider is asked for (Azure deployment, model name)
    index: int = 0  # this target's index in ``model.targets``
    # A model with fallbacks: every target's route (by index, this one among them), and
    # per operation the indices of those that serve it (``ext_proc.routing.fallback``).
    targets: tuple[Route, ...] = ()
    chains: Mapping[Operation, tuple[int, ...]] = field(default_factory=lambda: _NO_CHAINS)

    @classmethod
    def of(
        cls,
        model: Model,
        provider: Provider,
        adapter: ProviderAdapter,
        target: Target | None = None,
    ) -> Route:
        target = target or model.targets[0]
        price = resolve_price(model, provider, target)
        return cls(
            model,
            provider,
            adapter,
            model.encoding_name,
            price,
            price.encode() if price is not None else "",
            (model.name, *model.aliases),
            target.deployment,
            model.targets.index(target),
        )


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
            if model.fallbacks:
                targets = tuple(
                    Route.of(
                        model,
                        config.providers[target.provider],
                        adapters[target.provider],
                        target,
                    )
                    for target in model.targets
                )
                chains = MappingProxyType(dict(chains_of(model, config)))
                targets = tuple(
                    dataclasses.replace(t, targets=targets, chains=chains) for t in targets
                )
                # Each target knows the others (the processor picks a chain from any).
                route = targets[0]
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


def resolve_price(model: Model, provider: Provider, target: Target | None = None) -> Price | None:
    """The file's price (the target's, for a fallback), else the table's for the model
    served (its ``deployment``), else for the name apps send, in the provider type's
    price list."""
    target = target or model.targets[0]
    if target.price is not None:
        return target.price
    price_list = (
        PROVIDER_TYPES[provider.type].price_list if provider.type in PROVIDER_TYPES else None
    )
    return table_price(price_list, target.deployment, model.name)

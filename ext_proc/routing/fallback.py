"""Upstream fallback: which targets of a model Envoy may try, and what names them.

A model with ``fallbacks:`` is served by several targets (``Model.targets``). Envoy
tries them in one cluster of its own, the targets as endpoints by priority and weight,
retrying the next on 429, 5xx, a refused connection or a timeout before the answer's
first byte (see ``ext_proc.envoy_fallback``). Not every target serves every operation
(Anthropic has no embeddings), so a model has one such chain per distinct set of
targets its operations can use; the request processor picks the chain of the request's
operation and names it in the route header. Both sides name chains with the functions
here, so what the processor asks for is what Envoy was rendered with.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping

from ext_proc.config.model import GatewayConfig, Model, Provider
from ext_proc.envoy_contract import ROUTE_CLEAR, ROUTE_TARGETS
from ext_proc.routing.endpoints import Operation
from ext_proc.routing.providers import PROVIDER_TYPES

# The route header value of a chain starts with this (a provider's is its bare name,
# which cannot contain ':').
CHAIN_PREFIX = "chain:"
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")
# In the routing metadata (``gw_route``) of a chained request: every target's path,
# host, headers and (when its own) body, by target index; and every header name any
# target sets, which each attempt clears before setting its own (headers an attempt
# set are still there on the next one).
TARGETS_FIELD = ROUTE_TARGETS
# The endpoint metadata naming a target in Envoy's chain cluster: namespace and key, its
# value the target's index in ``Model.targets`` (read per attempt and by the finishers).
CLEAR_FIELD = ROUTE_CLEAR


def authority(provider: Provider) -> str:
    """The Host a provider is asked with (the port only when not the scheme's own)."""
    if provider.port in (80, 443):
        return provider.host
    return f"{provider.host}:{provider.port}"


def chains_of(model: Model, config: GatewayConfig) -> Mapping[Operation, tuple[int, ...]]:
    """For each operation, the indices (in ``model.targets``) of the targets that serve
    it, in the order they are declared: one or none means no chain (a single target is
    routed as a model without fallbacks)."""
    targets = model.targets
    supports = []
    for target in targets:
        provider = config.providers[target.provider]
        provider_type = PROVIDER_TYPES.get(provider.type)
        adapter = provider_type.adapter(provider, None) if provider_type is not None else None
        supports.append(adapter)
    return {
        operation: tuple(
            index
            for index, adapter in enumerate(supports)
            if adapter is not None and adapter.supports(operation)
        )
        for operation in Operation
    }


def chain_key(model: str, indices: tuple[int, ...]) -> str:
    """The route header value naming a model's chain of these targets."""
    return f"{CHAIN_PREFIX}{model}#{'.'.join(map(str, indices))}"


def chain_cluster(model: str, indices: tuple[int, ...]) -> str:
    """The Envoy cluster of a model's chain: readable in Envoy's stats, and unique even
    where two model names differ only in characters stats names cannot hold."""
    digest = hashlib.sha256(model.encode()).hexdigest()[:8]
    return f"chain_{_UNSAFE.sub('_', model)[:60]}_{digest}_{'_'.join(map(str, indices))}"


def distinct_chains(model: Model, config: GatewayConfig) -> list[tuple[int, ...]]:
    """Every chain (two targets or more) some operation of the model uses, once each."""
    seen: dict[tuple[int, ...], None] = {}
    for indices in chains_of(model, config).values():
        if len(indices) >= 2:
            seen.setdefault(indices, None)
    return list(seen)


def endpoint_hostname(provider: str, index: int) -> str:
    """The ``hostname`` of a chain's endpoint in Envoy (its admin ``/clusters`` names
    hosts by it): the provider and the target's index."""
    return f"{provider}#{index}"

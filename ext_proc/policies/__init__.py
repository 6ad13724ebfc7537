"""Policies: one module per policy type, looked up by the ``type:`` name in gateway.yaml.

To add a type, write its module (params model, params dataclass, ``POLICY_TYPE``) and
list it below. Enforcement lives in the same modules, beside the config it reads.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from ext_proc.policies import (
    budget,
    custom_cel,
    model_allowlist,
    rate_limit,
    request_size,
    token_limit,
)
from ext_proc.policies.base import (
    COMMON_FIELDS,
    SCOPES,
    PolicyParams,
    PolicySpec,
    PolicyType,
    Scope,
)

POLICY_TYPES: Mapping[str, PolicyType[Any]] = MappingProxyType(
    {
        module.POLICY_TYPE.name: module.POLICY_TYPE
        for module in (rate_limit, token_limit, budget, model_allowlist, request_size, custom_cel)
    }
)

__all__ = [
    "COMMON_FIELDS",
    "POLICY_TYPES",
    "SCOPES",
    "PolicyParams",
    "PolicySpec",
    "PolicyType",
    "Scope",
]

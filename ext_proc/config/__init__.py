"""The gateway config (gateway.yaml): typed, immutable, validated as a whole.

``load_config(path)`` / ``parse_config(text)`` return a ``GatewayConfig`` or raise
``ConfigError`` listing every problem as ``FILE:LINE:COL: field.path: message``.

The names below are imported on first use: the policy and provider modules import the
schema's building blocks (``ext_proc.config.fields``) while this package's loader
imports them, and a lazy package keeps that from being a cycle.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ext_proc.config.durations import DurationError, parse_duration
    from ext_proc.config.errors import ConfigError, ConfigIssue
    from ext_proc.config.loader import load_config, parse_config
    from ext_proc.config.model import (
        DEFAULT_ENVIRONMENT,
        Application,
        Environment,
        GatewayConfig,
        Model,
        OnError,
        Organization,
        Policy,
        Provider,
        ProviderType,
        RetryPolicy,
        Target,
    )

_WHERE = {
    "DurationError": "durations",
    "parse_duration": "durations",
    "ConfigError": "errors",
    "ConfigIssue": "errors",
    "load_config": "loader",
    "parse_config": "loader",
    **dict.fromkeys(
        (
            "DEFAULT_ENVIRONMENT",
            "Application",
            "Environment",
            "GatewayConfig",
            "Model",
            "OnError",
            "Organization",
            "Policy",
            "Provider",
            "ProviderType",
            "RetryPolicy",
            "Target",
        ),
        "model",
    ),
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


__all__ = [
    "DEFAULT_ENVIRONMENT",
    "Application",
    "ConfigError",
    "ConfigIssue",
    "DurationError",
    "Environment",
    "GatewayConfig",
    "Model",
    "OnError",
    "Organization",
    "Policy",
    "Provider",
    "ProviderType",
    "RetryPolicy",
    "Target",
    "load_config",
    "parse_config",
    "parse_duration",
]

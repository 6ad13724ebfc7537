"""The gateway config (gateway.yaml): typed, immutable, validated as a whole.

``load_config(path)`` / ``parse_config(text)`` return a ``GatewayConfig`` or raise
``ConfigError`` listing every problem as ``FILE:LINE:COL: field.path: message``.
"""

from __future__ import annotations

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
    Policy,
    Provider,
    ProviderType,
    RetryPolicy,
    Target,
)

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
    "Policy",
    "Provider",
    "ProviderType",
    "RetryPolicy",
    "Target",
    "load_config",
    "parse_config",
    "parse_duration",
]

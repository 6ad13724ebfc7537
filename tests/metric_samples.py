"""Single samples of an in-process ``Metrics`` registry that several test modules read:
the Redis circuit breaker's state and dependency gauge, and the policy fallback counter."""

from __future__ import annotations

from ext_proc.metrics import Metrics


def circuit_state(metrics: Metrics, dependency: str = "redis") -> float | None:
    return metrics.registry.get_sample_value("ext_proc_circuit_state", {"dependency": dependency})


def dependency_up(metrics: Metrics, dependency: str = "redis") -> float | None:
    """None until a call to the dependency has ended."""
    return metrics.registry.get_sample_value("ext_proc_dependency_up", {"dependency": dependency})


def fallbacks(metrics: Metrics, policy: str, action: str) -> float:
    value = metrics.registry.get_sample_value(
        "ext_proc_policy_fallback_total", {"policy": policy, "action": action}
    )
    return 0.0 if value is None else value

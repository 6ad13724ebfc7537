"""``rate_limit``: at most ``requests`` requests per ``window``, counted per app, key or org."""

from __future__ import annotations

from dataclasses import dataclass

from ext_proc.policies.base import (
    SCOPES,
    Enforcer,
    ParamReader,
    PolicyParams,
    PolicyType,
    RequestFacts,
    Scope,
)


@dataclass(frozen=True, slots=True)
class RateLimitParams(PolicyParams):
    requests: int
    window: float  # seconds
    scope: Scope = "app"


def parse_params(reader: ParamReader) -> RateLimitParams | None:
    requests = reader.get_int("requests", required=True, minimum=1)
    window = reader.get_duration("window", required=True)
    scope = reader.get_choice("scope", SCOPES) or "app"
    if requests is None or window is None:
        return None
    return RateLimitParams(requests=requests, window=window, scope=scope)


class RateLimitEnforcer(Enforcer):
    """Counts requests in the headers phase: a flood is refused before its body is read."""

    phase = "headers"
    is_limit = True

    def __init__(self, name: str, params: RateLimitParams, on_error: str) -> None:
        super().__init__(name, on_error)
        self.params = params

    def limit_cost(self, facts: RequestFacts) -> int:
        return 1

    def limit_params(self) -> tuple[int, float, Scope, str]:
        return self.params.requests, self.params.window, self.params.scope, "requests"


POLICY_TYPE = PolicyType(
    name="rate_limit",
    params_type=RateLimitParams,
    fields=("requests", "window", "scope"),
    parse=parse_params,
    enforcer=RateLimitEnforcer,
)

"""``rate_limit``: at most ``requests`` requests per ``window``, counted per app, key or org."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import Field

from ext_proc.config.fields import IntRange, IsDuration, OneOf
from ext_proc.policies.base import (
    SCOPES,
    Enforcer,
    PolicyParams,
    PolicySpec,
    PolicyType,
    RequestFacts,
    Scope,
)


@dataclass(frozen=True, slots=True)
class RateLimitParams(PolicyParams):
    requests: int
    window: float  # seconds
    scope: Scope = "app"


class RateLimitSpec(PolicySpec):
    """``{type: rate_limit, requests: 60, window: 60s, scope: app}``"""

    type: Literal["rate_limit"]
    requests: Annotated[int, IntRange(1)] = Field(description="requests allowed per window")
    window: Annotated[float, IsDuration()]
    scope: Annotated[str, OneOf(SCOPES)] = Field(
        "app", description="whose counter: app, key or org"
    )

    def params(self, name: str) -> RateLimitParams:
        return RateLimitParams(requests=self.requests, window=self.window, scope=self.scope)  # type: ignore[arg-type]


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
    spec=RateLimitSpec,
    enforcer=RateLimitEnforcer,
)

"""``token_limit``: at most ``tokens`` tokens per ``window``, counted per app, key or org.

Before the call the request reserves its estimate: the tiktoken count of the prompt plus
the completion it may produce, which is its ``max_tokens`` (or ``max_completion_tokens``)
when set and ``default_max_tokens`` when not. After the call the reservation is settled to
the real total the provider reported (or that we counted).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import Field

from ext_proc.config.fields import IntRange, IsDuration, OneOf
from ext_proc.policies.base import (
    SCOPES,
    Enforcer,
    Outcome,
    PolicyParams,
    PolicySpec,
    PolicyType,
    RequestFacts,
    Scope,
)

DEFAULT_MAX_TOKENS = 4096


@dataclass(frozen=True, slots=True)
class TokenLimitParams(PolicyParams):
    tokens: int
    window: float  # seconds
    scope: Scope = "app"
    # Completion tokens reserved for a request that sets no max_tokens.
    default_max_tokens: int = DEFAULT_MAX_TOKENS


class TokenLimitSpec(PolicySpec):
    """``{type: token_limit, tokens: 100000, window: 60s, scope: app, default_max_tokens: 4096}``"""

    type: Literal["token_limit"]
    tokens: Annotated[int, IntRange(1)] = Field(
        description="tokens (prompt + completion) allowed per window"
    )
    window: Annotated[float, IsDuration()]
    scope: Annotated[str, OneOf(SCOPES)] = Field(
        "app", description="whose counter: app, key or org"
    )
    default_max_tokens: Annotated[int, IntRange(1)] = Field(
        DEFAULT_MAX_TOKENS,
        description="completion tokens reserved for a request that sets no max_tokens",
    )

    def params(self, name: str) -> TokenLimitParams:
        return TokenLimitParams(
            tokens=self.tokens,
            window=self.window,
            scope=self.scope,  # type: ignore[arg-type]
            default_max_tokens=self.default_max_tokens,
        )


class TokenLimitEnforcer(Enforcer):
    """Reserve before the call, settle after: concurrent requests cannot overshoot."""

    phase = "body"
    is_limit = True
    needs_estimate = True

    def __init__(self, name: str, params: TokenLimitParams, on_error: str) -> None:
        super().__init__(name, on_error)
        self.params = params

    def limit_cost(self, facts: RequestFacts) -> int:
        completion = 0
        if facts.generates:
            completion = facts.max_tokens or self.params.default_max_tokens
        return max(1, facts.estimated_tokens + completion)

    def limit_params(self) -> tuple[int, float, Scope, str]:
        return self.params.tokens, self.params.window, self.params.scope, "tokens"

    def settle_delta(self, reserved: int, outcome: Outcome) -> int:
        # A failed call gives everything back; otherwise the real total replaces the
        # reservation (more when the completion ran past the estimate, less usually).
        if outcome.failed:
            return -reserved
        return outcome.total_tokens - reserved


POLICY_TYPE = PolicyType(
    name="token_limit",
    params_type=TokenLimitParams,
    spec=TokenLimitSpec,
    enforcer=TokenLimitEnforcer,
)

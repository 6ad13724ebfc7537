"""``token_limit``: at most ``tokens`` tokens per ``window``, counted per app, key or org.

Before the call the request reserves its estimate: the tiktoken count of the prompt plus
the completion it may produce, which is its ``max_tokens`` (or ``max_completion_tokens``)
when set and ``default_max_tokens`` when not. After the call the reservation is settled to
the real total the provider reported (or that we counted).
"""

from __future__ import annotations

from dataclasses import dataclass

from ext_proc.policies.base import (
    SCOPES,
    Enforcer,
    Outcome,
    ParamReader,
    PolicyParams,
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


def parse_params(reader: ParamReader) -> TokenLimitParams | None:
    tokens = reader.get_int("tokens", required=True, minimum=1)
    window = reader.get_duration("window", required=True)
    scope = reader.get_choice("scope", SCOPES) or "app"
    default_max_tokens = reader.get_int("default_max_tokens", minimum=1) or DEFAULT_MAX_TOKENS
    if tokens is None or window is None:
        return None
    return TokenLimitParams(
        tokens=tokens, window=window, scope=scope, default_max_tokens=default_max_tokens
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
    fields=("tokens", "window", "scope", "default_max_tokens"),
    parse=parse_params,
    enforcer=TokenLimitEnforcer,
)

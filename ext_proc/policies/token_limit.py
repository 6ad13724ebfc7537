"""``token_limit``: at most ``tokens`` tokens per ``window``, counted per app, key or org.

Before the call the request reserves its estimate: the tiktoken count of the prompt plus
the completion it may produce, which is its ``max_tokens`` (or ``max_completion_tokens``)
when set and ``default_max_tokens`` when not. After the call the reservation is settled to
the real total the provider reported (or that we counted).
"""

from __future__ import annotations

from dataclasses import dataclass

from ext_proc.policies.base import SCOPES, ParamReader, PolicyParams, PolicyType, Scope

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


POLICY_TYPE = PolicyType(
    name="token_limit",
    params_type=TokenLimitParams,
    fields=("tokens", "window", "scope", "default_max_tokens"),
    parse=parse_params,
)

"""``rate_limit``: at most ``requests`` requests per ``window``, counted per app, key or org."""

from __future__ import annotations

from dataclasses import dataclass

from ext_proc.policies.base import SCOPES, ParamReader, PolicyParams, PolicyType, Scope


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


POLICY_TYPE = PolicyType(
    name="rate_limit",
    params_type=RateLimitParams,
    fields=("requests", "window", "scope"),
    parse=parse_params,
)

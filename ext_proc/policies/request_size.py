"""``request_size``: caps on the request body's bytes and on its number of messages."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import Field, model_validator

from ext_proc.config.fields import IntRange, fail_at
from ext_proc.policies.base import (
    Denial,
    Enforcer,
    PolicyParams,
    PolicySpec,
    PolicyType,
    RequestFacts,
)


@dataclass(frozen=True, slots=True)
class RequestSizeParams(PolicyParams):
    max_bytes: int | None = None
    max_messages: int | None = None


class RequestSizeSpec(PolicySpec):
    """``{type: request_size, max_bytes: 262144, max_messages: 64}`` (one or both)"""

    type: Literal["request_size"]
    max_bytes: Annotated[int, IntRange(1)] | None = Field(
        None, description="largest request body, in bytes"
    )
    max_messages: Annotated[int, IntRange(1)] | None = Field(
        None, description="most messages in one request"
    )

    @model_validator(mode="after")
    def _a_limit(self) -> RequestSizeSpec:
        if self.max_bytes is None and self.max_messages is None:
            fail_at(None, "set max_bytes, max_messages or both")
        return self

    def params(self, name: str) -> RequestSizeParams:
        return RequestSizeParams(max_bytes=self.max_bytes, max_messages=self.max_messages)


class RequestSizeEnforcer(Enforcer):
    def __init__(self, name: str, params: RequestSizeParams, on_error: str) -> None:
        super().__init__(name, on_error)
        self.params = params

    def check(self, facts: RequestFacts) -> Denial | None:
        max_bytes, max_messages = self.params.max_bytes, self.params.max_messages
        if max_bytes is not None and facts.request_size_bytes > max_bytes:
            return Denial(
                self.name,
                413,
                "request_too_large",
                f"Request body is {facts.request_size_bytes} bytes; policy {self.name} "
                f"allows {max_bytes}.",
            )
        if max_messages is not None and facts.message_count > max_messages:
            return Denial(
                self.name,
                413,
                "too_many_messages",
                f"Request has {facts.message_count} messages; policy {self.name} "
                f"allows {max_messages}.",
            )
        return None


POLICY_TYPE = PolicyType(
    name="request_size",
    params_type=RequestSizeParams,
    spec=RequestSizeSpec,
    enforcer=RequestSizeEnforcer,
)

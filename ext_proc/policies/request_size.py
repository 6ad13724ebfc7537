"""``request_size``: caps on the request body's bytes and on its number of messages."""

from __future__ import annotations

from dataclasses import dataclass

from ext_proc.policies.base import (
    Denial,
    Enforcer,
    ParamReader,
    PolicyParams,
    PolicyType,
    RequestFacts,
)


@dataclass(frozen=True, slots=True)
class RequestSizeParams(PolicyParams):
    max_bytes: int | None = None
    max_messages: int | None = None


def parse_params(reader: ParamReader) -> RequestSizeParams | None:
    max_bytes = reader.get_int("max_bytes", minimum=1)
    max_messages = reader.get_int("max_messages", minimum=1)
    if not reader.has("max_bytes") and not reader.has("max_messages"):
        reader.error(None, "set max_bytes, max_messages or both")
        return None
    return RequestSizeParams(max_bytes=max_bytes, max_messages=max_messages)


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
    fields=("max_bytes", "max_messages"),
    parse=parse_params,
    enforcer=RequestSizeEnforcer,
)

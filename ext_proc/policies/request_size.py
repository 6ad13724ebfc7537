"""``request_size``: caps on the request body's bytes and on its number of messages."""

from __future__ import annotations

from dataclasses import dataclass

from ext_proc.policies.base import ParamReader, PolicyParams, PolicyType


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


POLICY_TYPE = PolicyType(
    name="request_size",
    params_type=RequestSizeParams,
    fields=("max_bytes", "max_messages"),
    parse=parse_params,
)

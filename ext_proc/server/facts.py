"""What the request side decided, carried to whoever finishes the request.

The request processor (one ext_proc message per request) decides; the usage record is
written later by the access-log handler (plain responses) or by the response processor
(streams and translated answers), possibly in another process. Everything they need
travels in Envoy's dynamic metadata, namespace ``gw``: a flat Struct with short keys
(it is forwarded with every response-body message, so it stays small). Provider
credentials never go here: they travel in ``gw_route``, which the Lua filter scrubs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from google.protobuf import struct_pb2

from ext_proc.policies.base import RequestFacts

NAMESPACE = "gw"  # request facts: read by the access log and the response processor
ROUTE_NAMESPACE = "gw_route"  # routing + credentials for the Lua filter (scrubbed after use)
RESPONSE_NAMESPACE = "gw_response"  # set by the response processor: "it wrote the record"
USAGE_NAMESPACE = "gw_usage"  # set by Envoy's json_to_metadata from a JSON response body


@dataclass(slots=True)
class Facts:
    """One request, as the request side saw it."""

    request_id: str
    started: float  # epoch seconds when the request side handled it
    endpoint: str
    operation: str  # OTel operation name (chat, embeddings, ...)
    key_id: str = ""
    app_id: str = ""
    org_id: str = ""
    environment: str = ""
    model: str = ""  # as requested
    catalog_model: str = ""
    provider: str = ""
    deployment: str = ""
    stream: bool = False
    request_bytes: int = 0
    message_count: int = 0
    max_tokens: int = 0
    estimated_tokens: int | None = None
    response_format: str = "openai"  # usage parser of the provider's answer
    translation: str = ""  # "openai_anthropic" when the answer is translated
    include_usage: bool = False  # translated streams: did the app ask for the usage chunk
    # The answer goes through the response processor (streams, translations), which then
    # owns the record.
    response_processor: bool = False
    reservations: dict[str, int] = field(default_factory=dict)  # token limit -> units taken

    def policy_facts(self) -> RequestFacts:
        return RequestFacts(
            request_id=self.request_id,
            key_id=self.key_id,
            app_id=self.app_id,
            org_id=self.org_id,
            environment=self.environment,
            endpoint=self.endpoint,
            model=self.model,
            catalog_model=self.catalog_model,
            stream=self.stream,
            request_size_bytes=self.request_bytes,
            message_count=self.message_count,
            max_tokens=self.max_tokens,
            estimated_tokens=self.estimated_tokens or 0,
            generates=self.operation != "embeddings",
        )

    # The metadata form: short keys, strings and numbers only (Struct numbers are doubles).
    def to_struct_fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.request_id,
            "t0": self.started,
            "ep": self.endpoint,
            "op": self.operation,
            "key": self.key_id,
            "app": self.app_id,
            "org": self.org_id,
            "env": self.environment,
            "m": self.model,
            "cm": self.catalog_model,
            "prov": self.provider,
            "dep": self.deployment,
            "s": 1 if self.stream else 0,
            "rb": self.request_bytes,
            "mc": self.message_count,
            "mt": self.max_tokens,
            "fmt": self.response_format,
        }
        if self.estimated_tokens is not None:
            out["est"] = self.estimated_tokens
        if self.translation:
            out["tr"] = self.translation
            out["iu"] = 1 if self.include_usage else 0
        if self.response_processor:
            out["rp"] = 1
        if self.reservations:
            out["res"] = ",".join(f"{k}={v}" for k, v in self.reservations.items())
        return out

    @classmethod
    def from_struct(cls, struct: struct_pb2.Struct) -> Facts | None:
        fields = struct.fields
        if "id" not in fields:
            return None

        def text(key: str) -> str:
            value = fields.get(key)
            return value.string_value if value is not None else ""

        def number(key: str) -> int:
            value = fields.get(key)
            return int(value.number_value) if value is not None else 0

        reservations: dict[str, int] = {}
        for item in text("res").split(","):
            name, _, units = item.partition("=")
            if name and units.isdigit():
                reservations[name] = int(units)
        estimate = fields.get("est")
        started = fields.get("t0")
        return cls(
            request_id=text("id"),
            started=started.number_value if started is not None else 0.0,
            endpoint=text("ep"),
            operation=text("op"),
            key_id=text("key"),
            app_id=text("app"),
            org_id=text("org"),
            environment=text("env"),
            model=text("m"),
            catalog_model=text("cm"),
            provider=text("prov"),
            deployment=text("dep"),
            stream=number("s") == 1,
            request_bytes=number("rb"),
            message_count=number("mc"),
            max_tokens=number("mt"),
            estimated_tokens=int(estimate.number_value) if estimate is not None else None,
            response_format=text("fmt") or "openai",
            translation=text("tr"),
            include_usage=number("iu") == 1,
            reservations=reservations,
            response_processor=number("rp") == 1,
        )

"""What the request side decided, carried to whoever finishes the request.

The request processor (one ext_proc message per request) decides; the usage record is
written later by the usage-log reader (plain responses) or by the response processor
(streams and translated answers), possibly in another process. Everything they need
travels in Envoy's dynamic metadata, namespace ``gw``: one string of compact JSON with
short keys (it is forwarded with every response-body message, so it stays small). Provider
credentials never go here: they travel in ``gw_route``, which the Lua filter scrubs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson
from google.protobuf import struct_pb2

# The metadata names are the wire contract's (ext_proc/envoy_contract.py), re-exported
# for the modules that read facts.
from ext_proc.envoy_contract import (
    ATTEMPTS_NAMESPACE,
    DENIAL_FIELD,
    MODEL_NAMESPACE,
    NAMESPACE,
    RESPONSE_NAMESPACE,
    ROUTE_NAMESPACE,
    TRAIL_FIELD,
    USAGE_NAMESPACE,
)
from ext_proc.envoy_contract import FACTS_FIELD as FIELD
from ext_proc.policies.base import RequestFacts
from ext_proc.usage.pricing import Price

__all__ = [
    "ATTEMPTS_NAMESPACE",
    "DENIAL_FIELD",
    "FIELD",
    "MODEL_NAMESPACE",
    "NAMESPACE",
    "RESPONSE_NAMESPACE",
    "ROUTE_NAMESPACE",
    "TRAIL_FIELD",
    "USAGE_NAMESPACE",
    "Facts",
    "TargetFacts",
]


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
    price: str = ""  # the served model's price, ``Price.encode()``d ("" = none known)
    # A model with fallbacks: every target the request may be served by, by its index
    # in ``Model.targets`` (the serving one is known only when the answer comes back:
    # ``select_target``). Empty for the common single-target request.
    targets: list[TargetFacts] = field(default_factory=list)
    # Tracing on: the W3C traceparent of the request side's span, so whoever finishes
    # the request (maybe another process, later) parents its span there.
    trace_parent: str = ""

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
            price=Price.decode(self.price) if self.price else None,
            started=self.started,
        )

    # The metadata form: one string field holding compact JSON with short keys (one
    # field to build, forward and read; orjson is far cheaper than Struct conversion).
    def to_json(self) -> str:
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
            "s": self.stream,
            "rb": self.request_bytes,
            "mc": self.message_count,
            "mt": self.max_tokens,
            "fmt": self.response_format,
        }
        if self.estimated_tokens is not None:
            out["est"] = self.estimated_tokens
        if self.translation:
            out["tr"] = self.translation
            out["iu"] = self.include_usage
        if self.response_processor:
            out["rp"] = True
        if self.reservations:
            out["res"] = self.reservations
        if self.price:
            out["pr"] = self.price
        if self.targets:
            out["tg"] = [t.to_list() for t in self.targets]
        if self.trace_parent:
            out["tp"] = self.trace_parent
        return orjson.dumps(out).decode()

    def select_target(self, index: Any) -> bool:
        """The answer came from target ``index`` (its ``Model.targets`` index, as Envoy's
        endpoint metadata says it, a string): it is the provider, deployment, price and
        answer format of the record from now on. False when ``index`` names none of the
        request's targets (the facts are left as they were: the first target's)."""
        key = str(index)
        for target in self.targets:
            if target.index == key:
                self.provider = target.provider
                self.deployment = target.deployment
                self.response_format = target.response_format
                self.translation = target.translation
                self.include_usage = target.include_usage
                self.price = target.price
                return True
        return False

    def write_to(self, struct: struct_pb2.Struct) -> None:
        """Put these facts in a metadata namespace's Struct."""
        struct.fields[FIELD].string_value = self.to_json()

    @classmethod
    def from_struct(cls, struct: struct_pb2.Struct) -> Facts | None:
        """The facts in a namespace's Struct, or None when it holds none (or junk)."""
        value = struct.fields.get(FIELD)
        if value is None:
            return None
        return cls.from_json(value.string_value)

    @classmethod
    def from_json(cls, text: str | bytes) -> Facts | None:
        """The facts from their metadata form (``to_json``), or None when it is junk."""
        try:
            d = orjson.loads(text)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(d, dict) or "id" not in d:
            return None
        res = d.get("res")
        return cls(
            request_id=str(d["id"]),
            started=float(d.get("t0") or 0.0),
            endpoint=d.get("ep", ""),
            operation=d.get("op", ""),
            key_id=d.get("key", ""),
            app_id=d.get("app", ""),
            org_id=d.get("org", ""),
            environment=d.get("env", ""),
            model=d.get("m", ""),
            catalog_model=d.get("cm", ""),
            provider=d.get("prov", ""),
            deployment=d.get("dep", ""),
            stream=bool(d.get("s")),
            request_bytes=int(d.get("rb") or 0),
            message_count=int(d.get("mc") or 0),
            max_tokens=int(d.get("mt") or 0),
            estimated_tokens=d.get("est"),
            response_format=d.get("fmt") or "openai",
            translation=d.get("tr", ""),
            include_usage=bool(d.get("iu")),
            response_processor=bool(d.get("rp")),
            reservations={str(k): int(v) for k, v in res.items()} if isinstance(res, dict) else {},
            price=d["pr"] if isinstance(d.get("pr"), str) else "",
            targets=TargetFacts.list_from(d.get("tg")),
            trace_parent=d["tp"] if isinstance(d.get("tp"), str) else "",
        )


@dataclass(frozen=True, slots=True)
class TargetFacts:
    """One target of a request to a model with fallbacks: what its answer is billed and
    read as, should it serve."""

    index: str  # its index in Model.targets, as a string (Envoy's endpoint metadata)
    provider: str
    deployment: str
    response_format: str
    translation: str = ""
    include_usage: bool = False
    price: str = ""

    def to_list(self) -> list[Any]:
        return [
            self.index,
            self.provider,
            self.deployment,
            self.response_format,
            self.translation,
            self.include_usage,
            self.price,
        ]

    @classmethod
    def list_from(cls, value: Any) -> list[TargetFacts]:
        if not isinstance(value, list):
            return []
        out = []
        for item in value:
            if isinstance(item, list) and len(item) == 7:
                index, provider, deployment, fmt, translation, usage, price = item
                out.append(
                    cls(
                        str(index),
                        str(provider),
                        str(deployment),
                        str(fmt) or "openai",
                        str(translation or ""),
                        bool(usage),
                        price if isinstance(price, str) else "",
                    )
                )
        return out

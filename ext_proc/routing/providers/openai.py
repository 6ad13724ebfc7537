"""OpenAI (and any OpenAI-compatible server: vLLM, Ollama, the mock): Bearer key."""

from __future__ import annotations

from typing import Any, Literal

import orjson

from ext_proc.config.model import Provider
from ext_proc.config.specs import ProviderSpec
from ext_proc.routing.endpoints import OPENAI_SUFFIX, RESPONSES_FORMAT, Endpoint, Operation
from ext_proc.routing.providers.base import (
    ProviderType,
    UpstreamCall,
    add_stream_usage,
    api_root,
)


class OpenAIAdapter:
    response_format = "openai"

    def __init__(self, provider: Provider, credential: str | None) -> None:
        prefix = api_root(provider)
        self._paths = {op: f"{prefix}/v1/{suffix}" for op, suffix in OPENAI_SUFFIX.items()}
        self._paths[Operation.RESPONSES] = f"{prefix}/v1/responses"
        auth = (("authorization", f"Bearer {credential}"),) if credential else ()
        self._headers = auth + tuple(provider.headers.items())
        self._inject_usage = provider.inject_stream_usage
        self.has_credential = credential is not None or not provider.has_credential

    def supports(self, operation: Operation) -> bool:
        return operation in self._paths

    def call(self, endpoint: Endpoint, deployment: str, body: dict[str, Any]) -> UpstreamCall:
        changed = False
        if body.get("model") != deployment:
            body["model"] = deployment
            changed = True
        if (
            self._inject_usage
            and endpoint.operation in _STREAMS_WITH_USAGE_OPTION
            and add_stream_usage(body)
        ):
            changed = True
        return UpstreamCall(
            self._paths[endpoint.operation],
            self._headers,
            orjson.dumps(body) if changed else None,
            response_format=RESPONSES_FORMAT if endpoint.operation is Operation.RESPONSES else "",
        )


# Operations whose streams report usage only when stream_options.include_usage asks (a
# Responses API stream always ends with response.completed and its usage).
_STREAMS_WITH_USAGE_OPTION = frozenset({Operation.CHAT, Operation.TEXT_COMPLETION})


class OpenAIProviderSpec(ProviderSpec):
    """``{type: openai, base_url: "https://api.openai.com", api_key_env: OPENAI_API_KEY}``"""

    type: Literal["openai"]


PROVIDER_TYPE = ProviderType(
    name="openai",
    adapter=OpenAIAdapter,
    usage_format="openai",
    spec=OpenAIProviderSpec,
    stream_usage_injectable=True,
    price_list="openai",
    about="OpenAI or an OpenAI-compatible server (vLLM, Ollama, ...)",
)

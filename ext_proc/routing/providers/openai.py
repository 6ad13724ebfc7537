"""OpenAI (and any OpenAI-compatible server: vLLM, Ollama, the mock): Bearer key."""

from __future__ import annotations

from typing import Any

import orjson

from ext_proc.config.model import Provider
from ext_proc.routing.endpoints import OPENAI_SUFFIX, Endpoint, Operation
from ext_proc.routing.providers.base import UpstreamCall, add_stream_usage, api_root
from ext_proc.routing.translate.base import TranslatedRequest


class OpenAIAdapter:
    response_format = "openai"

    def __init__(self, provider: Provider, credential: str | None) -> None:
        prefix = api_root(provider)
        self._paths = {op: f"{prefix}/v1/{suffix}" for op, suffix in OPENAI_SUFFIX.items()}
        auth = (("authorization", f"Bearer {credential}"),) if credential else ()
        self._headers = auth + tuple(provider.headers.items())
        self._inject_usage = provider.inject_stream_usage
        self.has_credential = credential is not None or not provider.has_credential

    def supports(self, operation: Operation) -> bool:
        return operation in self._paths

    def translates(self, operation: Operation) -> bool:
        return False

    def translate(
        self, endpoint: Endpoint, deployment: str, body: dict[str, Any]
    ) -> TranslatedRequest:
        raise NotImplementedError(f"{type(self).__name__} speaks the app's API: use prepare()")

    def prepare(self, endpoint: Endpoint, deployment: str, body: dict[str, Any]) -> UpstreamCall:
        changed = False
        if body.get("model") != deployment:
            body["model"] = deployment
            changed = True
        if (
            self._inject_usage
            and endpoint.operation is not Operation.EMBEDDINGS
            and add_stream_usage(body)
        ):
            changed = True
        return UpstreamCall(
            self._paths[endpoint.operation], self._headers, orjson.dumps(body) if changed else None
        )

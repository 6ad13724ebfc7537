"""Azure OpenAI: deployment in the path, ``api-version`` query, ``api-key`` header."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import orjson

from ext_proc.config.model import Provider
from ext_proc.routing.endpoints import OPENAI_SUFFIX, Endpoint, Operation
from ext_proc.routing.providers.base import UpstreamCall, add_stream_usage
from ext_proc.routing.translate.base import TranslatedRequest


class AzureOpenAIAdapter:
    response_format = "openai"

    def __init__(self, provider: Provider, credential: str | None) -> None:
        self._prefix = provider.path_prefix.rstrip("/")
        self._api_version = quote(provider.api_version or "", safe="")
        auth = (("api-key", credential),) if credential else ()
        self._headers = auth + tuple(provider.headers.items())
        self._inject_usage = provider.inject_stream_usage
        self.has_credential = credential is not None or not provider.has_credential

    def supports(self, operation: Operation) -> bool:
        return operation in OPENAI_SUFFIX

    def translates(self, operation: Operation) -> bool:
        return False

    def translate(
        self, endpoint: Endpoint, deployment: str, body: dict[str, Any]
    ) -> TranslatedRequest:
        raise NotImplementedError(f"{type(self).__name__} speaks the app's API: use prepare()")

    def prepare(self, endpoint: Endpoint, deployment: str, body: dict[str, Any]) -> UpstreamCall:
        path = (
            f"{self._prefix}/openai/deployments/{quote(deployment, safe='')}/"
            f"{OPENAI_SUFFIX[endpoint.operation]}?api-version={self._api_version}"
        )
        body_out = None
        if (
            self._inject_usage
            and endpoint.operation is not Operation.EMBEDDINGS
            and add_stream_usage(body)
        ):
            body_out = orjson.dumps(body)
        return UpstreamCall(path, self._headers, body_out)

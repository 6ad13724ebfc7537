"""Azure OpenAI: deployment in the path, ``api-version`` query, ``api-key`` header."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal
from urllib.parse import quote

import orjson
from pydantic import BeforeValidator, Field

from ext_proc.config.fields import fail, read_text
from ext_proc.config.model import Provider
from ext_proc.config.specs import ProviderSpec
from ext_proc.routing.endpoints import OPENAI_SUFFIX, RESPONSES_FORMAT, Endpoint, Operation
from ext_proc.routing.providers.base import (
    ProviderType,
    UpstreamCall,
    add_stream_usage,
)

_API_VERSION = re.compile(r"\d{4}-\d{2}-\d{2}(-[a-z]+)?|v1|preview|latest")


class AzureOpenAIAdapter:
    response_format = "openai"

    def __init__(self, provider: Provider, credential: str | None) -> None:
        self._prefix = provider.path_prefix.rstrip("/")
        self._api_version = quote(provider.options.get("api_version") or "", safe="")
        auth = (("api-key", credential),) if credential else ()
        self._headers = auth + tuple(provider.headers.items())
        self._inject_usage = provider.inject_stream_usage
        self.has_credential = credential is not None or not provider.has_credential

    def supports(self, operation: Operation) -> bool:
        return operation in OPENAI_SUFFIX or operation is Operation.RESPONSES

    def call(self, endpoint: Endpoint, deployment: str, body: dict[str, Any]) -> UpstreamCall:
        if endpoint.operation is Operation.RESPONSES:
            # Azure's Responses API names the deployment in the body, not the path.
            changed = body.get("model") != deployment
            if changed:
                body["model"] = deployment
            return UpstreamCall(
                f"{self._prefix}/openai/responses?api-version={self._api_version}",
                self._headers,
                orjson.dumps(body) if changed else None,
                response_format=RESPONSES_FORMAT,
            )
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


def _api_version(value: Any) -> str:
    version = read_text(value)
    if not _API_VERSION.fullmatch(version):
        fail(f"'{version}' is not an Azure api-version like 2024-10-21")
    return version


class AzureOpenAIProviderSpec(ProviderSpec):
    """``{type: azure_openai, base_url: "https://contoso.openai.azure.com",
    api_version: "2024-10-21", api_key_env: AZURE_OPENAI_API_KEY}``"""

    type: Literal["azure_openai"]
    api_version: Annotated[
        str, Field(pattern=f"^({_API_VERSION.pattern})$"), BeforeValidator(_api_version)
    ] = Field(description="the api-version query parameter, e.g. 2024-10-21")


PROVIDER_TYPE = ProviderType(
    name="azure_openai",
    adapter=AzureOpenAIAdapter,
    usage_format="openai",
    spec=AzureOpenAIProviderSpec,
    stream_usage_injectable=True,
    price_list="azure",  # genai-prices falls back to OpenAI's list for Azure
    about="Azure OpenAI (deployments, api-version)",
)

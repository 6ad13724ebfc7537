"""Google Gemini API (AI Studio, v1beta): ``x-goog-api-key`` header, ``models/{model}:...``.

Apps reach Gemini-served models with the OpenAI SDK: ``/v1/chat/completions``
(Operation.CHAT) becomes ``POST /v1beta/models/{deployment}:generateContent``, or
``:streamGenerateContent?alt=sse`` for a stream, and ``/v1/embeddings``
(Operation.EMBEDDINGS) becomes ``:batchEmbedContents``; the request and the answer are
translated (``ext_proc.routing.translate.openai_gemini``). Gemini has no legacy
completions, and no API of its own is exposed to apps here, so ``supports`` refuses the
other operations and the processor answers 400.

``base_url`` is ``https://generativelanguage.googleapis.com`` (a trailing ``/v1beta`` is
fine); a deployment is a model name (``gemini-2.5-flash``) or a resource name
(``models/...``, ``tunedModels/...``). Usage is always parsed from Gemini's own format
(``response_format`` "google"), before any translation; embeddings answers carry none,
so their rows are estimated from the input.
"""

from __future__ import annotations

from typing import Any, Literal
from urllib.parse import quote

import orjson

from ext_proc.config.model import Provider
from ext_proc.config.specs import ProviderSpec
from ext_proc.routing.endpoints import Endpoint, Operation
from ext_proc.routing.providers.base import ProviderType, UpstreamCall
from ext_proc.routing.translate.openai_gemini import (
    EMBEDDINGS_BASE64_TRANSLATION,
    EMBEDDINGS_TRANSLATION,
    TRANSLATION,
    EmbeddingsToOpenAI,
    GenerateContentToChatCompletion,
    model_resource,
    to_gemini_embeddings_request,
    to_gemini_request,
    wants_usage_chunk,
)

API_VERSION = "v1beta"
_SUPPORTED = frozenset({Operation.CHAT, Operation.EMBEDDINGS})


def gemini_root(provider: Provider) -> str:
    """The path prefix up to and including ``/v1beta``: base_url may be given with or
    without it (the SDKs' defaults differ)."""
    prefix = provider.path_prefix.rstrip("/")
    for suffix in (f"/{API_VERSION}", "/v1"):
        if prefix.endswith(suffix):
            prefix = prefix[: -len(suffix)]
            break
    return f"{prefix}/{API_VERSION}"


class GeminiAdapter:
    response_format = "google"

    def __init__(self, provider: Provider, credential: str | None) -> None:
        self._root = gemini_root(provider)
        auth = (("x-goog-api-key", credential),) if credential else ()
        self._headers = (*auth, *provider.headers.items())
        self.has_credential = credential is not None or not provider.has_credential

    def supports(self, operation: Operation) -> bool:
        return operation in _SUPPORTED

    def _path(self, deployment: str, method: str) -> str:
        return f"{self._root}/{quote(model_resource(deployment), safe='/')}:{method}"

    def call(self, endpoint: Endpoint, deployment: str, body: dict[str, Any]) -> UpstreamCall:
        operation = endpoint.operation
        if operation is Operation.CHAT:
            request = to_gemini_request(body, deployment)
            stream = body.get("stream") is True
            method = "streamGenerateContent?alt=sse" if stream else "generateContent"
            return UpstreamCall(
                self._path(deployment, method),
                self._headers,
                orjson.dumps(request),
                translation=TRANSLATION,
                include_usage=stream and wants_usage_chunk(body),
            )
        if operation is Operation.EMBEDDINGS:
            request, as_base64 = to_gemini_embeddings_request(body, deployment)
            return UpstreamCall(
                self._path(deployment, "batchEmbedContents"),
                self._headers,
                orjson.dumps(request),
                translation=EMBEDDINGS_BASE64_TRANSLATION if as_base64 else EMBEDDINGS_TRANSLATION,
            )
        raise ValueError(f"Gemini serves {endpoint.path}? supports() said no")


class GeminiProviderSpec(ProviderSpec):
    """``{type: gemini, base_url: "https://generativelanguage.googleapis.com",
    api_key_env: GEMINI_API_KEY}``"""

    type: Literal["gemini"]


PROVIDER_TYPE = ProviderType(
    name="gemini",
    spec=GeminiProviderSpec,
    adapter=GeminiAdapter,
    usage_format="google",
    translations={
        TRANSLATION: lambda include_usage: GenerateContentToChatCompletion(
            include_usage=include_usage
        ),
        EMBEDDINGS_TRANSLATION: lambda include_usage: EmbeddingsToOpenAI(),
        EMBEDDINGS_BASE64_TRANSLATION: lambda include_usage: EmbeddingsToOpenAI(base64=True),
    },
    price_list="google",
    about="Google Gemini API (apps on the OpenAI SDK are translated)",
)

"""Cohere: ``Authorization: Bearer`` key, v2 ``/v2/chat`` and ``/v2/embed``.

Apps reach Cohere-served models with the stock OpenAI SDK: ``/v1/chat/completions``
(Operation.CHAT) is translated to Cohere's v2 Chat API and ``/v1/embeddings``
(Operation.EMBEDDINGS) to its v2 Embed API, and the answers (JSON, SSE streams, errors)
back (see ``ext_proc.routing.translate.openai_cohere``). Cohere has no legacy
completions in OpenAI's shape (nor Anthropic's Messages), so ``supports`` refuses those
and the processor answers 400.

Usage is always parsed from Cohere's own format (``response_format``: its billed
tokens), before any translation. Cohere's answers do not name the model that served
them: the row's ``deployment`` does.
"""

from __future__ import annotations

from typing import Any, Literal

import orjson

from ext_proc.config.model import Provider
from ext_proc.config.specs import ProviderSpec
from ext_proc.routing.endpoints import Endpoint, Operation
from ext_proc.routing.providers.base import ProviderType, UpstreamCall
from ext_proc.routing.translate.openai_cohere import (
    EMBED_BASE64_TRANSLATION,
    EMBED_TRANSLATION,
    TRANSLATION,
    CohereChatToChatCompletion,
    CohereEmbedToEmbeddings,
    to_cohere_chat_request,
    to_cohere_embed_request,
    wants_usage_chunk,
)

_SUPPORTED = frozenset({Operation.CHAT, Operation.EMBEDDINGS})


def _api_root(provider: Provider) -> str:
    """The path prefix without a trailing API version: base_url may be given as
    ``https://api.cohere.com``, ``.../v1`` or ``.../v2``; the adapter adds ``/v2/...``."""
    prefix = provider.path_prefix.rstrip("/")
    for version in ("/v1", "/v2"):
        if prefix.endswith(version):
            return prefix[: -len(version)]
    return prefix


class CohereAdapter:
    response_format = "cohere"

    def __init__(self, provider: Provider, credential: str | None) -> None:
        root = _api_root(provider)
        self._chat_path = f"{root}/v2/chat"
        self._embed_path = f"{root}/v2/embed"
        auth = (("authorization", f"Bearer {credential}"),) if credential else ()
        self._headers = auth + tuple(provider.headers.items())
        self.has_credential = credential is not None or not provider.has_credential

    def supports(self, operation: Operation) -> bool:
        return operation in _SUPPORTED

    def call(self, endpoint: Endpoint, deployment: str, body: dict[str, Any]) -> UpstreamCall:
        operation = endpoint.operation
        if operation is Operation.CHAT:
            request = to_cohere_chat_request(body, deployment)
            return UpstreamCall(
                self._chat_path,
                self._headers,
                orjson.dumps(request),
                translation=TRANSLATION,
                include_usage=wants_usage_chunk(body),
            )
        if operation is Operation.EMBEDDINGS:
            request, base64 = to_cohere_embed_request(body, deployment)
            return UpstreamCall(
                self._embed_path,
                self._headers,
                orjson.dumps(request),
                translation=EMBED_BASE64_TRANSLATION if base64 else EMBED_TRANSLATION,
            )
        raise ValueError(f"Cohere serves {endpoint.path}? supports() said no")


class CohereProviderSpec(ProviderSpec):
    """``{type: cohere, base_url: "https://api.cohere.com", api_key_env: CO_API_KEY}``"""

    type: Literal["cohere"]


PROVIDER_TYPE = ProviderType(
    name="cohere",
    spec=CohereProviderSpec,
    adapter=CohereAdapter,
    usage_format="cohere",
    translations={
        TRANSLATION: lambda include_usage: CohereChatToChatCompletion(include_usage=include_usage),
        EMBED_TRANSLATION: lambda _: CohereEmbedToEmbeddings(base64=False),
        EMBED_BASE64_TRANSLATION: lambda _: CohereEmbedToEmbeddings(base64=True),
    },
    price_list="cohere",
    about="Cohere v2 Chat and Embed (apps on the OpenAI SDK are translated)",
)

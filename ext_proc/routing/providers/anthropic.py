"""Anthropic: ``x-api-key`` and ``anthropic-version`` headers, ``/v1/messages``.

Two ways in. An app using the Anthropic SDK calls ``/v1/messages`` (Operation.MESSAGES):
its body goes upstream as is, with ``model`` set to the deployment (``prepare``). An app
using the OpenAI SDK calls ``/v1/chat/completions`` (Operation.CHAT) for a model Anthropic
serves: the request and its response are translated (``translate``, see
``ext_proc.routing.translate.openai_anthropic``). Anthropic has no embeddings or legacy
completions, so ``supports`` refuses those and the processor answers 400.

Usage is always parsed from Anthropic's own format (``response_format``), before any
translation.
"""

from __future__ import annotations

from typing import Any

import orjson

from ext_proc.config.model import DEFAULT_ANTHROPIC_VERSION, Provider
from ext_proc.routing.endpoints import Endpoint, Operation
from ext_proc.routing.providers.base import UpstreamCall, api_root
from ext_proc.routing.translate.base import TranslatedRequest
from ext_proc.routing.translate.openai_anthropic import (
    TRANSLATION,
    to_anthropic_request,
    wants_usage_chunk,
)

_SUPPORTED = frozenset({Operation.MESSAGES, Operation.CHAT})


class AnthropicAdapter:
    response_format = "anthropic"

    def __init__(self, provider: Provider, credential: str | None) -> None:
        self._path = f"{api_root(provider)}/v1/messages"
        auth = (("x-api-key", credential),) if credential else ()
        version = provider.anthropic_version or DEFAULT_ANTHROPIC_VERSION
        # The version is the provider's, whatever the app's SDK sent: the gateway's
        # translation and usage parsing are written against it. Static provider headers
        # come last (an `anthropic-beta` for every call, say).
        self._headers = (*auth, ("anthropic-version", version), *provider.headers.items())
        self.has_credential = credential is not None or not provider.has_credential

    def supports(self, operation: Operation) -> bool:
        return operation in _SUPPORTED

    def translates(self, operation: Operation) -> bool:
        return operation is Operation.CHAT

    def prepare(self, endpoint: Endpoint, deployment: str, body: dict[str, Any]) -> UpstreamCall:
        """The native call (``/v1/messages``); may set ``body["model"]``."""
        if endpoint.operation is not Operation.MESSAGES:
            raise ValueError(
                f"AnthropicAdapter.prepare serves /v1/messages only; "
                f"{endpoint.path} goes through translate()"
            )
        body_out = None
        if body.get("model") != deployment:
            body["model"] = deployment
            body_out = orjson.dumps(body)
        return UpstreamCall(self._path, self._headers, body_out)

    def translate(
        self, endpoint: Endpoint, deployment: str, body: dict[str, Any]
    ) -> TranslatedRequest:
        """An OpenAI chat request as a Messages call, and the translator for its answer.

        ``body`` is left as the app sent it (the processor estimates tokens from it).
        Raises ``TranslationError`` for what Anthropic cannot serve as asked.
        """
        if endpoint.operation is not Operation.CHAT:
            raise ValueError(f"AnthropicAdapter.translate serves chat only, not {endpoint.path}")
        request = to_anthropic_request(body, deployment)
        return TranslatedRequest(
            self._path,
            self._headers,
            orjson.dumps(request),
            TRANSLATION,
            include_usage=wants_usage_chunk(body),
        )

"""Anthropic: ``x-api-key`` and ``anthropic-version`` headers, ``/v1/messages``.

Two ways in. An app using the Anthropic SDK calls ``/v1/messages`` (Operation.MESSAGES):
its body goes upstream as is, with ``model`` set to the deployment. An app using the
OpenAI SDK calls ``/v1/chat/completions`` (Operation.CHAT) for a model Anthropic serves:
the request and its response are translated (see
``ext_proc.routing.translate.openai_anthropic``). Anthropic has no embeddings or legacy
completions, so ``supports`` refuses those and the processor answers 400.

Usage is always parsed from Anthropic's own format (``response_format``), before any
translation.
"""

from __future__ import annotations

from typing import Any, Literal

import orjson
from pydantic import Field

from ext_proc.config.fields import Text
from ext_proc.config.model import Provider
from ext_proc.config.specs import ProviderSpec
from ext_proc.routing.endpoints import Endpoint, Operation
from ext_proc.routing.providers.base import ProviderType, UpstreamCall, api_root
from ext_proc.routing.translate.openai_anthropic import (
    TRANSLATION,
    MessagesToChatCompletion,
    to_anthropic_request,
    wants_usage_chunk,
)

DEFAULT_ANTHROPIC_VERSION = "2023-06-01"
_SUPPORTED = frozenset({Operation.MESSAGES, Operation.CHAT})


class AnthropicAdapter:
    response_format = "anthropic"

    def __init__(self, provider: Provider, credential: str | None) -> None:
        self._path = f"{api_root(provider)}/v1/messages"
        auth = (("x-api-key", credential),) if credential else ()
        version = provider.options.get("anthropic_version") or DEFAULT_ANTHROPIC_VERSION
        # The version is the provider's, whatever the app's SDK sent: the gateway's
        # translation and usage parsing are written against it. Static provider headers
        # come last (an `anthropic-beta` for every call, say).
        self._headers = (*auth, ("anthropic-version", version), *provider.headers.items())
        self.has_credential = credential is not None or not provider.has_credential

    def supports(self, operation: Operation) -> bool:
        return operation in _SUPPORTED

    def call(self, endpoint: Endpoint, deployment: str, body: dict[str, Any]) -> UpstreamCall:
        if endpoint.operation is Operation.MESSAGES:
            # Native: the app's body as is, with `model` set to the deployment.
            body_out = None
            if body.get("model") != deployment:
                body["model"] = deployment
                body_out = orjson.dumps(body)
            return UpstreamCall(self._path, self._headers, body_out)
        if endpoint.operation is not Operation.CHAT:
            raise ValueError(f"Anthropic serves {endpoint.path}? supports() said no")
        # An OpenAI chat request as a Messages call; the answer is translated back.
        request = to_anthropic_request(body, deployment)
        return UpstreamCall(
            self._path,
            self._headers,
            orjson.dumps(request),
            translation=TRANSLATION,
            include_usage=wants_usage_chunk(body),
        )


class AnthropicProviderSpec(ProviderSpec):
    """``{type: anthropic, base_url: "https://api.anthropic.com",
    api_key_env: ANTHROPIC_API_KEY}``"""

    type: Literal["anthropic"]
    anthropic_version: Text = Field(
        DEFAULT_ANTHROPIC_VERSION, description="the anthropic-version header sent upstream"
    )


PROVIDER_TYPE = ProviderType(
    name="anthropic",
    adapter=AnthropicAdapter,
    usage_format="anthropic",
    spec=AnthropicProviderSpec,
    translations={
        TRANSLATION: lambda include_usage: MessagesToChatCompletion(include_usage=include_usage)
    },
    price_list="anthropic",
    about="Anthropic Messages (apps on the OpenAI SDK are translated)",
)

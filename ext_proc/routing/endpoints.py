"""The app-facing HTTP endpoints the gateway understands, classified from ``:path``.

Classification is a dict lookup for the fixed OpenAI paths and one split for the
Azure deployment paths; nothing here allocates per request beyond the path split.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from urllib.parse import parse_qsl


class Operation(enum.Enum):
    """What the app asked for; values are OTel ``gen_ai.operation.name`` values."""

    CHAT = "chat"
    TEXT_COMPLETION = "text_completion"
    EMBEDDINGS = "embeddings"
    MESSAGES = "messages"  # Anthropic /v1/messages (a chat, in Anthropic's shape)
    RESPONSES = "responses"  # OpenAI's Responses API (/v1/responses)
    LIST_MODELS = "list_models"


# The upstream path suffix for each operation, shared by the OpenAI-style adapters.
OPENAI_SUFFIX = {
    Operation.CHAT: "chat/completions",
    Operation.TEXT_COMPLETION: "completions",
    Operation.EMBEDDINGS: "embeddings",
}
# The usage format of a Responses API answer (ext_proc.tokens.parsers.openai_responses).
RESPONSES_FORMAT = "openai_responses"


@dataclass(frozen=True, slots=True)
class Endpoint:
    operation: Operation
    path: str  # the canonical path template, recorded as usage_records.endpoint
    style: str  # "openai" | "azure" | "anthropic": how the app addressed us
    deployment: str | None = None  # Azure style: the deployment named in the path
    api_version: str | None = None  # Azure style: the api-version query parameter

    @property
    def needs_body(self) -> bool:
        return self.operation is not Operation.LIST_MODELS


_FIXED: dict[str, Endpoint] = {
    "/v1/chat/completions": Endpoint(Operation.CHAT, "/v1/chat/completions", "openai"),
    "/v1/completions": Endpoint(Operation.TEXT_COMPLETION, "/v1/completions", "openai"),
    "/v1/embeddings": Endpoint(Operation.EMBEDDINGS, "/v1/embeddings", "openai"),
    "/v1/models": Endpoint(Operation.LIST_MODELS, "/v1/models", "openai"),
    "/v1/messages": Endpoint(Operation.MESSAGES, "/v1/messages", "anthropic"),
    "/v1/responses": Endpoint(Operation.RESPONSES, "/v1/responses", "openai"),
    "/openai/models": Endpoint(Operation.LIST_MODELS, "/openai/models", "azure"),
    # Azure's Responses API: the AzureOpenAI SDK's path, and its "v1" API's (the OpenAI
    # SDK pointed at {endpoint}/openai/v1/); the model (deployment) is in the body.
    "/openai/responses": Endpoint(Operation.RESPONSES, "/openai/responses", "azure"),
    "/openai/v1/responses": Endpoint(Operation.RESPONSES, "/openai/v1/responses", "azure"),
}

# Azure's operation path suffixes are OpenAI's.
_AZURE_OPS = {suffix: operation for operation, suffix in OPENAI_SUFFIX.items()}

SUPPORTED_PATHS = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/models",
    "/v1/messages",
    "/v1/responses",
    "/openai/responses",
    "/openai/deployments/{deployment}/chat/completions",
    "/openai/deployments/{deployment}/completions",
    "/openai/deployments/{deployment}/embeddings",
)


def classify(raw_path: str) -> Endpoint | None:
    """The endpoint for a request ``:path`` (with query string), or None if unsupported."""
    path, _, query = raw_path.partition("?")
    if len(path) > 1 and path.endswith("/"):
        path = path[:-1]
    fixed = _FIXED.get(path)
    if fixed is not None:
        return fixed
    if path.startswith("/openai/deployments/"):
        deployment, _, rest = path[len("/openai/deployments/") :].partition("/")
        operation = _AZURE_OPS.get(rest)
        if deployment and operation is not None:
            api_version = None
            if query:
                for key, value in parse_qsl(query):
                    if key == "api-version":
                        api_version = value
            return Endpoint(
                operation,
                f"/openai/deployments/{{deployment}}/{rest}",
                "azure",
                deployment=deployment,
                api_version=api_version,
            )
    return None

"""Translations between provider API shapes, one module per pair (``openai_anthropic``).

``RESPONSE_TRANSLATORS`` builds the response side by the pair's name: the request side
records the name in the request's facts, and the response processor (possibly another
process) rebuilds the translator from it.
"""

from collections.abc import Callable

from ext_proc.routing.translate import openai_anthropic
from ext_proc.routing.translate.base import (
    ResponseTranslator,
    TranslatedRequest,
    TranslatingAdapter,
    TranslationError,
)

# name -> factory(include_usage) for the response translator
RESPONSE_TRANSLATORS: dict[str, Callable[[bool], ResponseTranslator]] = {
    openai_anthropic.TRANSLATION: lambda include_usage: openai_anthropic.MessagesToChatCompletion(
        include_usage=include_usage
    ),
}

__all__ = [
    "RESPONSE_TRANSLATORS",
    "ResponseTranslator",
    "TranslatedRequest",
    "TranslatingAdapter",
    "TranslationError",
]

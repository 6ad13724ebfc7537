"""Translations between provider API shapes, one module per pair (``openai_anthropic``)."""

from ext_proc.routing.translate.base import (
    ResponseTranslator,
    TranslatedRequest,
    TranslatingAdapter,
    TranslationError,
)

__all__ = ["ResponseTranslator", "TranslatedRequest", "TranslatingAdapter", "TranslationError"]

"""Translations between provider API shapes, one module per pair (``openai_anthropic``).

A provider type names the translators its calls use (``ProviderType.translations``);
``ext_proc.routing.providers.RESPONSE_TRANSLATORS`` collects them, so the response
processor can rebuild one from the name the request side recorded.
"""

from ext_proc.routing.translate.base import ResponseTranslator, TranslationError

__all__ = ["ResponseTranslator", "TranslationError"]

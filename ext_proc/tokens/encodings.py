"""tiktoken encodings: which one a model uses, loaded once, offline.

The BPE files live in ``_tiktoken_cache`` (filled by ``make install``, see
``fetch.py``). tiktoken looks in ``TIKTOKEN_CACHE_DIR``; we point it at the bundled
folder unless the operator set it.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import tiktoken

BUNDLED_CACHE_DIR = Path(__file__).parent / "_tiktoken_cache"


@dataclass(frozen=True, slots=True)
class EncodingFile:
    cache_name: str  # sha1 of tiktoken's download URL: the name its cache uses
    sha256: str  # what tiktoken_ext.openai_public expects


ENCODING_FILES: dict[str, EncodingFile] = {
    "o200k_base": EncodingFile(
        "fb374d419588a4632f3f557e76b4b70aebbca790",
        "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
    ),
    "cl100k_base": EncodingFile(
        "9b5ad71b2ce5302211f9c61530b329a4922fc6a4",
        "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
    ),
}

# A model we cannot place gets the encoding of current OpenAI models.
DEFAULT_ENCODING = "o200k_base"

# Prefix → encoding, longest prefix first. Names follow OpenAI's model families;
# A catalog model is placed by its upstream name (deployment), else by its app-facing
# name (an Azure deployment is often named freely): config.model.Model.encoding_name.
_PREFIXES: tuple[tuple[str, str], ...] = (
    ("gpt-4o", "o200k_base"),
    ("gpt-4.1", "o200k_base"),
    ("gpt-4.5", "o200k_base"),
    ("gpt-5", "o200k_base"),
    ("chatgpt-4o", "o200k_base"),
    ("o1", "o200k_base"),
    ("o3", "o200k_base"),
    ("o4", "o200k_base"),
    ("gpt-oss", "o200k_base"),
    ("gpt-4", "cl100k_base"),
    ("gpt-3.5", "cl100k_base"),
    ("gpt-35", "cl100k_base"),
    ("text-embedding-3", "cl100k_base"),
    ("text-embedding-ada-002", "cl100k_base"),
)

_env_lock = threading.Lock()


def known_encoding_name(model: str | None) -> str | None:
    """The encoding of ``model``'s family, or None for a name no prefix places."""
    if model:
        name = model.lower()
        for prefix, encoding in _PREFIXES:
            if name.startswith(prefix):
                return encoding
    return None


def encoding_name_for_model(model: str | None) -> str:
    return known_encoding_name(model) or DEFAULT_ENCODING


def _point_tiktoken_at_bundle() -> None:
    with _env_lock:
        if "TIKTOKEN_CACHE_DIR" not in os.environ and BUNDLED_CACHE_DIR.is_dir():
            os.environ["TIKTOKEN_CACHE_DIR"] = str(BUNDLED_CACHE_DIR)


@lru_cache(maxsize=8)
def get_encoding(name: str) -> tiktoken.Encoding:
    """The named encoding, loaded once per process (a few hundred ms the first time)."""
    if name not in ENCODING_FILES:
        raise KeyError(f"unsupported encoding {name!r}; known: {', '.join(ENCODING_FILES)}")
    _point_tiktoken_at_bundle()
    return tiktoken.get_encoding(name)


def encoding_for_model(model: str | None) -> tiktoken.Encoding:
    return get_encoding(encoding_name_for_model(model))

"""What the mock "generates": deterministic completion text, split into token pieces.

A completion is a tuple of pieces, one per token as a provider streams them, plus its
honest token count. Two kinds:

- the default: a short sentence naming the model, tokenized once per (model, cap);
- ``exactly(n)``: n tokens of filler words. Each word (with its leading space) is one
  token in the encoding and tiktoken's pre-tokenizer splits text at those spaces, so the
  text is exactly n tokens by construction, and no text is encoded per request.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from ext_proc.mock.counting import TokenCounter
from ext_proc.mock.knobs import Knobs

# Common English words, each checked to be a single token (with a leading space) in the
# encoding before use.
_FILLER = (
    *("the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "and", "then"),
    *("runs", "far", "away", "into", "green", "hills", "where", "small", "birds", "sing"),
    *("every", "morning", "under", "bright", "blue", "sky", "while", "old", "trees"),
    *("stand", "tall", "near", "quiet", "river", "banks"),
)
_FIRST_WORD = "The"


@dataclass(frozen=True, slots=True)
class Completion:
    pieces: tuple[str, ...]  # one per token (a character split over tokens stays whole)
    tokens: int
    truncated: bool  # cut short by max_tokens
    text: str  # the pieces joined

    @classmethod
    def of(cls, pieces: tuple[str, ...], tokens: int, truncated: bool) -> Completion:
        return cls(pieces, tokens, truncated, "".join(pieces))

    def chunk_count(self, chunks: int | None) -> int:
        """How many content chunks ``split_chunks`` makes of this completion."""
        return len(self.pieces) if chunks is None else min(chunks, len(self.pieces))

    def generation_ms(self, knobs: Knobs) -> int:
        """How long a stream of this completion would take: a plain answer waits as long."""
        gaps = max(self.chunk_count(knobs.chunks) - 1, 0)
        return knobs.ttft_ms + knobs.chunk_delay_ms * gaps


def default_text(model: str) -> str:
    return f"This is a mock response from {model}."


def split_chunks(pieces: tuple[str, ...], chunks: int | None) -> list[str]:
    """The content of each stream chunk: one per piece, or ``chunks`` near-equal groups."""
    if chunks is None or chunks >= len(pieces):
        return list(pieces)
    if chunks <= 1:
        return ["".join(pieces)] if pieces else []
    size, extra = divmod(len(pieces), chunks)
    out: list[str] = []
    start = 0
    for i in range(chunks):
        end = start + size + (1 if i < extra else 0)
        out.append("".join(pieces[start:end]))
        start = end
    return out


class CompletionWriter:
    """Builds completions for one encoding; results are memoised (they are immutable)."""

    def __init__(self, counter: TokenCounter) -> None:
        self.counter = counter
        encoding = counter.encoding
        words = [w for w in _FILLER if len(encoding.encode_ordinary(" " + w)) == 1]
        if len(words) < 4 or len(encoding.encode_ordinary(_FIRST_WORD)) != 1:
            raise RuntimeError(f"no single-token filler words in encoding {encoding.name}")
        self._words = tuple(" " + w for w in words)
        # Keyed by request values (model name, caps): bounded, never stale.
        self.default = lru_cache(maxsize=1024)(self._default)
        self.exactly = lru_cache(maxsize=64)(self._exactly)

    def for_request(self, model: str, knobs: Knobs, cap: int | None) -> Completion:
        """``knobs.completion_tokens`` filler tokens when set, else the default sentence."""
        if knobs.completion_tokens is not None:
            return self.exactly(knobs.completion_tokens, cap)
        return self.default(model, cap)

    def _default(self, model: str, cap: int | None) -> Completion:
        encoding = self.counter.encoding
        tokens = encoding.encode_ordinary(default_text(model))
        truncated = cap is not None and cap < len(tokens)
        if truncated:
            tokens = tokens[:cap]
        pieces = _pieces(encoding.decode_tokens_bytes(tokens))
        count = self.counter.text("".join(pieces)) if truncated else len(tokens)
        return Completion.of(pieces, count, truncated)

    def _exactly(self, n: int, cap: int | None) -> Completion:
        count = n if cap is None else min(n, cap)
        if count <= 0:
            return Completion.of((), 0, n > 0)
        words = self._words
        pieces = (_FIRST_WORD, *(words[i % len(words)] for i in range(count - 1)))
        return Completion.of(pieces, count, count < n)


def _pieces(token_bytes: list[bytes]) -> tuple[str, ...]:
    """Decode token by token, holding bytes back while a character is incomplete."""
    out: list[str] = []
    pending = b""
    for chunk in token_bytes:
        pending += chunk
        try:
            out.append(pending.decode("utf-8"))
        except UnicodeDecodeError:
            continue
        pending = b""
    if pending:
        out.append(pending.decode("utf-8", errors="replace"))
    return tuple(out)

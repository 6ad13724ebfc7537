"""The app's request body as the gateway reads it: one JSON object, strictly.

Strict because the gateway and the provider must read the same request: a body the
gateway accepts is forwarded (often as sent), so anything two JSON parsers may read
differently is refused with 400 here instead of being interpreted twice:

- not UTF-8, or a lone surrogate escape (``"\\ud800"``): ``invalid_encoding``;
- not JSON, NaN / Infinity, not an object: ``invalid_json``;
- a key repeated in one object (``{"model": "a", "model": "b"}``: this parser would take
  the last, a provider may take the first): ``invalid_json``, naming the key;
- nested deeper than ``MAX_NESTING`` levels (deeper bodies break re-serialisation and
  are never a real request): ``invalid_json``.

orjson parses (fast and strict); repeated keys, which it accepts silently, are found by
the standard library's C scanner with a pairs hook (about 4 µs for a typical 500-byte
chat body). Nesting is measured only when the body has more brackets than the limit.
"""

from __future__ import annotations

import json
from typing import Any

import orjson

MAX_NESTING = 128


class BodyError(ValueError):
    """A body the gateway refuses; ``code`` is the OpenAI-style error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class _RepeatedKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _RepeatedKey(key)
            seen.add(key)
    return obj


_PAIRS_DECODER = json.JSONDecoder(object_pairs_hook=_pairs)


def parse_request_json(raw: bytes) -> dict[str, Any]:
    """The body as a dict, or ``BodyError`` saying what is wrong with it."""
    if not raw:
        raise BodyError("invalid_json", "The request body is empty; send a JSON object.")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        message = str(exc)
        if "utf-8" in message.lower() or "surrogate" in message.lower():
            raise BodyError("invalid_encoding", "The request body is not valid UTF-8.") from None
        raise BodyError("invalid_json", f"The request body is not valid JSON: {message}") from None
    if not isinstance(body, dict):
        raise BodyError("invalid_json", "The request body must be a JSON object.")
    if raw.count(b"{") + raw.count(b"[") > MAX_NESTING and _depth(body) > MAX_NESTING:
        raise BodyError(
            "invalid_json", f"The request body is nested deeper than {MAX_NESTING} levels."
        )
    try:
        # Valid JSON and valid UTF-8 here (orjson said so): only repeated keys can fail.
        _PAIRS_DECODER.decode(raw.decode("utf-8"))
    except _RepeatedKey as exc:
        raise BodyError(
            "invalid_json",
            f"The request body repeats the key {exc.key!r} in one object; send each once.",
        ) from None
    return body


def _depth(value: Any) -> int:
    """How deeply ``value`` nests objects and arrays (iterative: no recursion limit)."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > deepest:
            deepest = depth
            if deepest > MAX_NESTING:
                return deepest
        if type(node) is dict:
            stack.extend((child, depth + 1) for child in node.values() if type(child) in _NESTS)
        elif type(node) is list:
            stack.extend((child, depth + 1) for child in node if type(child) in _NESTS)
    return deepest


_NESTS = (dict, list)

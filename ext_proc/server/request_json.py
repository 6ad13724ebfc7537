"""The app's request body as the gateway reads it: one JSON object, strictly.

Strict because the gateway and the provider must read the same request: a body the
gateway accepts is forwarded (often as sent, sometimes re-serialized), so anything two
JSON parsers may read differently is refused with 400 here instead of being interpreted
twice:

- not UTF-8, or a lone surrogate escape (``"\\ud800"``): ``invalid_encoding``;
- not JSON, NaN / Infinity, not an object: ``invalid_json``;
- a key repeated in one object (``{"model": "a", "model": "b"}``: this parser would take
  the last, a provider may take the first): ``invalid_json``, naming the key;
- nested deeper than ``MAX_NESTING`` levels (deeper bodies break re-serialisation and
  are never a real request): ``invalid_json``;
- an integer outside -2^63 .. 2^64-1 (orjson reads it as a float, Python's and Go's
  exact-number parsers as the integer: ``"seed": 18446744073709551616`` would reach the
  provider as ``1.8446744073709552e+19`` once the body is rewritten): ``invalid_json``,
  with ``param`` naming where it is.

orjson parses (fast and strict). Repeated keys, which it accepts silently, are found by
the standard library's C scanner with a pairs hook (about 4 µs for a typical 500-byte
chat body); the same pass sees every integer literal's text (``parse_int``), so an
integer past 64 bits costs nothing measurable to find in a chat body (a handful of
integer literals; the hook returns at once for any shorter than 19 characters). A large
body dense with integers (token ids: ``"input": [[9906, 1917, ...]]``) would pay ~30 ns
per integer for that hook: for it a scan of the bytes for 19 digits in a row decides
instead (any integer outside the range has them), and the pass reads integers in C.
Only a body that has one is decoded again, exactly, to say where it is. Nesting is
measured only when the body has more brackets than the limit.
"""

from __future__ import annotations

import json
import re
from typing import Any

import orjson

MAX_NESTING = 128
# The integers orjson keeps as integers (i64 and u64); outside it reads a float.
MIN_INTEGER = -(2**63)
MAX_INTEGER = 2**64 - 1
# Any integer literal outside that range has at least this many characters (19 digits
# for 2^64 and beyond; a sign and 19 digits below -2^63): shorter ones need no look.
_SHORTEST_OUTSIDE = 19
_MAX_PARAM = 200


class BodyError(ValueError):
    """A body the gateway refuses; ``code`` is the OpenAI-style error code, ``param``
    where in the body the problem is (when one place is to blame)."""

    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param


class _RepeatedKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


class _OutOfRange(ValueError):
    """An integer literal orjson would have read as a float."""


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _RepeatedKey(key)
            seen.add(key)
    return obj


def _integer(text: str) -> int:
    """``parse_int`` of the checking pass. Its tree is thrown away, so a 0 stands for
    every integer (cheaper than building it)."""
    if len(text) < _SHORTEST_OUTSIDE:
        return 0
    if MIN_INTEGER <= int(text) <= MAX_INTEGER:
        return 0
    raise _OutOfRange(text)


_CHECKING_DECODER = json.JSONDecoder(object_pairs_hook=_pairs, parse_int=_integer)
# For bodies with no run of 19 digits: no integer is out of range; ``len`` stands for
# each (C, and cheaper than building the int).
_KEYS_DECODER = json.JSONDecoder(object_pairs_hook=_pairs, parse_int=len)
# "Dense with integers": this large, and this many commas in the first bytes (token ids
# have one every 6 or 7 bytes; prose one every 50 or more). Only speed depends on it:
# both ways find every integer out of range.
_DENSE_BYTES = 16 * 1024
_DENSE_SAMPLE = 4096
_DENSE_COMMAS = 400
_DIGITS = bytes(0x30 if 0x30 <= b <= 0x39 else 0x20 for b in range(256))
_LONG_RUN = b"0" * _SHORTEST_OUTSIDE


def _checking_decoder(raw: bytes) -> json.JSONDecoder:
    if (
        len(raw) >= _DENSE_BYTES
        and raw.count(b",", 0, _DENSE_SAMPLE) > _DENSE_COMMAS
        and _LONG_RUN not in raw.translate(_DIGITS)
    ):
        return _KEYS_DECODER
    return _CHECKING_DECODER


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
    text = raw.decode("utf-8")
    try:
        # Valid JSON and valid UTF-8 here (orjson said so): only a repeated key or an
        # integer past 64 bits can fail.
        _checking_decoder(raw).decode(text)
    except _RepeatedKey as exc:
        raise BodyError(
            "invalid_json",
            f"The request body repeats the key {exc.key!r} in one object; send each once.",
        ) from None
    except _OutOfRange as exc:
        raise _out_of_range(text, str(exc)) from None
    return body


def _out_of_range(text: str, literal: str) -> BodyError:
    """The refusal of a body with an integer past 64 bits, naming the first such field
    (the rare path: the body is decoded once more, with exact integers)."""
    path = _integer_path(json.loads(text)) or "(body)"
    shown = literal if len(literal) <= 40 else f"{literal[:20]}...{literal[-8:]}"
    return BodyError(
        "invalid_json",
        f"The integer {shown} at '{path}' is outside the 64-bit range "
        f"({MIN_INTEGER} to {MAX_INTEGER}): JSON parsers read such numbers differently "
        "(some exactly, some as a rounded float), so the gateway refuses them. "
        "Send it as a string, or within that range.",
        param=path,
    )


def _integer_path(value: Any) -> str | None:
    """Where the first integer outside the 64-bit range is, as ``a.b[2].c``."""
    stack: list[tuple[Any, str]] = [(value, "")]
    while stack:
        node, path = stack.pop()
        if type(node) is dict:
            # Reversed onto the stack: the first member is looked at first.
            stack.extend(
                (node[key], f"{path}.{key}" if path else key) for key in reversed(list(node))
            )
        elif type(node) is list:
            stack.extend((node[i], f"{path}[{i}]") for i in range(len(node) - 1, -1, -1))
        elif type(node) is int and not MIN_INTEGER <= node <= MAX_INTEGER:
            return path[:_MAX_PARAM]
    return None


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


# ------------------------------------------------------------------ the content type

# What SDKs send, as sent: accepted without parsing. Anything else is parsed by RFC 9110
# (media-type = type "/" subtype *( OWS ";" OWS [ name "=" ( token / quoted-string ) ] )).
_COMMON_JSON_TYPES = frozenset(
    {
        "application/json",
        "application/json; charset=utf-8",
        "application/json;charset=utf-8",
        "application/json; charset=UTF-8",
        "application/json;charset=UTF-8",
    }
)
_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_MEDIA_TYPE = re.compile(rf"[ \t]*({_TOKEN})/({_TOKEN})[ \t]*")
# One parameter (possibly empty, as in "application/json;") with the whitespace around.
_QUOTED = r'"(?:[\t \x21\x23-\x5b\x5d-\x7e]|\\[\t\x20-\x7e])*"'
_PARAMETER = re.compile(rf"[ \t]*;[ \t]*(?:({_TOKEN})=({_TOKEN}|{_QUOTED}))?[ \t]*")
_QUOTED_PAIR = re.compile(r"\\(.)")


def content_type_problem(value: str) -> str | None:
    """What is wrong with a request's Content-Type, or None when it is JSON the gateway
    reads: ``application/json`` (any case), parameters well formed, and a ``charset``,
    if given (once), ``utf-8`` in any case, quoted or not. ``value`` is the header as
    decoded from Envoy (bytes that were not UTF-8 are U+FFFD: ``wire.REPLACEMENT``)."""
    if value in _COMMON_JSON_TYPES:
        return None
    if "\ufffd" in value:
        return f"The Content-Type header is not valid UTF-8: {value!r}."
    if not value.isascii():
        return f"The Content-Type header must be ASCII: {value!r}."
    media = _MEDIA_TYPE.match(value)
    if media is None or f"{media[1]}/{media[2]}".lower() != "application/json":
        return f"Content-Type must be application/json, got {value!r}."
    charset: str | None = None
    at = media.end()
    while at < len(value):
        parameter = _PARAMETER.match(value, at)
        if parameter is None or parameter.end() == at:
            return (
                f"The Content-Type header's parameters are malformed at {value[at:]!r}: "
                "each must be ';' name=value, the value a token or a quoted string."
            )
        at = parameter.end()
        if parameter[1] is not None and parameter[1].lower() == "charset":
            if charset is not None:
                return f"The Content-Type header gives its charset twice: {value!r}."
            charset = parameter[2]
            if charset.startswith('"'):
                charset = _QUOTED_PAIR.sub(r"\1", charset[1:-1])
            if charset.lower() != "utf-8":
                return f"The body must be UTF-8 JSON; the Content-Type says charset {charset!r}."
    return None

"""The interface every provider response parser implements, and what they share.

A format module (``openai.py``, ``anthropic.py``, ...) exposes ``FORMAT``: a
``ResponseFormat`` holding its JSON-body parser and its stream-parser factory.
``parsers/__init__.py`` registers it under the format's name.

Parsers see bodies from outside: they never raise on bad bytes. A body that is not the
JSON they expect yields a summary with ``usage=None`` and ``complete=False``; a stream
event that does not parse is skipped (counted, and logged once at ``finish``).
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from ext_proc.tokens.sse import SSEDecoder
from ext_proc.tokens.types import ResponseSummary, Usage

logger = logging.getLogger(__name__)

_loads = orjson.loads
_JSONDecodeError = orjson.JSONDecodeError


class StreamParser(Protocol):
    def feed(self, chunk: bytes) -> None:
        """Raw response body bytes, as they arrive (any split)."""

    def finish(self) -> ResponseSummary:
        """At end of stream or on cancel: what the stream delivered so far."""


@dataclass(frozen=True, slots=True)
class ResponseFormat:
    name: str
    parse_json: Callable[[bytes], ResponseSummary]
    new_stream_parser: Callable[[], StreamParser]
    # For answers Python never sees: Envoy reads these fields (dotted JSON paths) from a
    # JSON answer, and ``usage_from_fields`` rebuilds the usage from what it found, with
    # the same code that reads a whole answer (``usage_of``).
    usage_of: Callable[[dict[str, Any]], Usage | None] = lambda obj: None
    usage_fields: tuple[str, ...] = ()
    model_field: str | None = "model"  # where the answer names the model that served

    def usage_from_fields(self, values: Any) -> Usage | None:
        """The usage in ``values`` ({dotted path: number}, as Envoy's json_to_metadata
        read the ``usage_fields``), or None when it holds none of them."""
        if type(values) is not dict or not values:
            return None
        return self.usage_of(unflatten(values))


def unflatten(values: dict[str, Any]) -> dict[str, Any]:
    """``{"usage.prompt_tokens": 3}`` -> ``{"usage": {"prompt_tokens": 3}}``."""
    root: dict[str, Any] = {}
    for path, value in values.items():
        node = root
        *parents, leaf = path.split(".")
        for part in parents:
            child = node.get(part)
            if type(child) is not dict:
                child = node[part] = {}
            node = child
        node[leaf] = value
    return root


def as_int(value: Any) -> int | None:
    """A token count from a provider field: an int (not a bool), else None."""
    if type(value) is int:
        return value
    if type(value) is float and value.is_integer():
        return int(value)
    return None


def load_json(body: bytes | str) -> Any:
    """The parsed body, or None when it is not JSON."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return None


def sum_known(*values: int | None) -> int | None:
    """Sum of the values, or None when any is unknown."""
    total = 0
    for value in values:
        if value is None:
            return None
        total += value
    return total


def dumps_text(value: Any) -> str:
    """Compact JSON of a structured value the app received (tool-call input), for counting."""
    if type(value) is str:
        return value
    try:
        return orjson.dumps(value).decode()
    except TypeError:  # orjson's error for what it cannot serialise (huge ints, ...)
        return ""


def append_text(text: list[str], value: Any) -> None:
    """Keep ``value`` as delivered text if it is a non-empty string (else it is junk)."""
    if type(value) is str and value:
        text.append(value)


def append_function(text: list[str], function: Any) -> None:
    """A function call's name and arguments, as the app received them."""
    if type(function) is dict:
        append_text(text, function.get("name"))
        append_text(text, function.get("arguments"))


def append_tool_calls(text: list[str], tool_calls: Any) -> None:
    """Each OpenAI-shaped tool call's function (``[{"function": {name, arguments}}]``)."""
    if type(tool_calls) is list:
        for call in tool_calls:
            if type(call) is dict:
                append_function(text, call.get("function"))


def usage_has_completion(usage: Usage | None) -> bool:
    return usage is not None and usage.completion_tokens is not None


class SSEStreamParser(ABC):
    """Base for SSE formats: decodes events, hands each parsed JSON object to ``_on``.

    Subclasses set ``complete`` / ``failed`` and fill ``text``, ``finish_reason``,
    ``response_model``; ``_usage`` builds the final ``Usage`` (or None).
    """

    format_name = "sse"

    def __init__(self) -> None:
        self._decoder = SSEDecoder()
        self.events = 0
        self.malformed = 0
        self.complete = False
        self.failed = False  # an error event arrived: never complete
        self.text: list[str] = []
        self.finish_reason: str | None = None
        self.response_model: str | None = None

    def feed(self, chunk: bytes) -> None:
        for _, data in self._decoder.feed_bytes(chunk):
            self._data(data)

    def finish(self) -> ResponseSummary:
        for _, data in self._decoder.flush_bytes():
            self._data(data)
        if self.malformed:
            logger.warning(
                "%s stream: skipped %d event(s) whose data was not JSON",
                self.format_name,
                self.malformed,
            )
            self.malformed = 0
        return ResponseSummary(
            usage=self._usage(),
            response_model=self.response_model,
            finish_reason=self.finish_reason,
            complete=self.complete and not self.failed,
            events=self.events,
            delivered_text=self.text,
        )

    def _data(self, data: bytes) -> None:
        # Every format we parse names its events inside the JSON ("type"), so the SSE
        # ``event:`` field is not needed.
        self.events += 1
        try:
            obj = _loads(data)
        except _JSONDecodeError:
            obj = None
        if type(obj) is dict:
            self._on(obj)
        else:
            self._on_other(data)

    @abstractmethod
    def _on(self, obj: dict[str, Any]) -> None:
        """One event whose data is a JSON object."""

    def _on_other(self, data: bytes) -> None:
        """Data that is not a JSON object (``[DONE]`` for OpenAI)."""
        self.malformed += 1

    @abstractmethod
    def _usage(self) -> Usage | None:
        """The usage the stream reported, or None when it reported none."""

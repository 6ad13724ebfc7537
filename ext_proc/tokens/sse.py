"""Incremental Server-Sent Events decoder (the WHATWG "event stream" parsing rules we need).

Fed raw body chunks as Envoy streams them, it returns the events each chunk completes.
A chunk may end anywhere: inside a line, between ``\\r`` and ``\\n``, or inside a
multi-byte UTF-8 character. The decoder works on bytes (one ``split`` per chunk) and
keeps only the unfinished last line between chunks, so UTF-8 is only decoded for whole
lines. ``feed`` decodes each event once, when it is dispatched; ``feed_bytes`` skips even
that, for the response parsers, which hand the data bytes straight to orjson.

Spec points kept: one leading UTF-8 BOM is ignored; lines end with ``\\r\\n``, ``\\n``
or ``\\r``; a blank line dispatches; ``:`` lines are comments; ``field:value`` with one
optional space after the colon; a line without a colon is a field with an empty value;
several ``data`` lines join with ``\\n``; an event with no ``data`` line is not
dispatched; ``event:`` sets the type for one event (empty means unset). ``id`` and
``retry`` are ignored: we never reconnect. Invalid UTF-8 decodes to U+FFFD.

End of stream (``flush``): the spec discards an event whose blank line never came. We
dispatch it when all of its lines were terminated, because a server that ends the body
right after its last ``data:`` line still sent that line whole (and it may be the one
carrying usage). An unterminated trailing line is dropped: it may have been cut by a
dropped connection, so its content cannot be trusted.
"""

from __future__ import annotations

from dataclasses import dataclass

_BOM = b"\xef\xbb\xbf"
_LF = 0x0A
_CR = 0x0D
_COLON = 0x3A

# An event before decoding: (the ``event`` field or None, the joined ``data`` lines).
RawEvent = tuple[bytes | None, bytes]


@dataclass(slots=True)
class SSEEvent:
    event: str | None  # the ``event:`` field, None when absent or empty
    data: str  # the ``data:`` lines joined with "\n"


def _decode(raw: RawEvent) -> SSEEvent:
    event, data = raw
    return SSEEvent(
        None if event is None else event.decode("utf-8", "replace"),
        data.decode("utf-8", "replace"),
    )


class SSEDecoder:
    """One per stream. ``feed`` each body chunk, then ``flush`` at end of stream."""

    __slots__ = ("_data", "_event", "_head", "_pending", "_skip_lf", "_started")

    def __init__(self) -> None:
        # Pieces of an unterminated line (never containing \r). Kept as a list so a
        # long line arriving in many chunks is joined once, not re-copied per chunk.
        self._pending: list[bytes] = []
        self._data: list[bytes] = []  # the current event's data lines
        self._event: bytes | None = None
        self._skip_lf = False  # the last chunk ended with \r: a leading \n ends nothing
        self._started = False  # past the optional BOM
        self._head = b""  # bytes held while deciding whether a BOM starts the stream

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """Events completed by ``chunk`` (in order)."""
        return [_decode(raw) for raw in self.feed_bytes(chunk)]

    def flush(self) -> list[SSEEvent]:
        """At end of stream: the last event if only its blank line is missing (see module)."""
        return [_decode(raw) for raw in self.flush_bytes()]

    def feed_bytes(self, chunk: bytes) -> list[RawEvent]:
        """``feed`` without decoding: ``(event, data)`` as bytes."""
        if not self._started:
            head = self._head + chunk
            if len(head) < len(_BOM) and _BOM.startswith(head):
                self._head = head
                return []
            self._started = True
            self._head = b""
            chunk = head[len(_BOM) :] if head.startswith(_BOM) else head
        if not chunk:
            return []
        if self._skip_lf:
            self._skip_lf = False
            if chunk[0] == _LF:
                chunk = chunk[1:]
        # (int in bytes is a memchr; b"\r" in bytes is several times slower.)
        if _CR in chunk:
            # Normalise CR and CRLF to LF so one split handles every ending. A chunk
            # ending in \r has ended its line; the next chunk's leading \n (if any) is the
            # rest of a CRLF and must not count as a blank line.
            self._skip_lf = chunk[-1] == _CR
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        pending = self._pending
        if _LF not in chunk:
            if chunk:
                pending.append(chunk)
            return []
        if pending:
            pending.append(chunk)
            chunk = b"".join(pending)
        lines = chunk.split(b"\n")
        rest = lines.pop()
        self._pending = [rest] if rest else []
        events: list[RawEvent] = []
        data = self._data
        for line in lines:
            if not line:  # blank line: dispatch
                if data:
                    events.append(self._dispatch())
                    data = self._data
                else:
                    self._event = None
            elif line[:5] == b"data:":
                data.append(line[6:] if line[5:6] == b" " else line[5:])
            elif line[:6] == b"event:":
                value = line[7:] if line[6:7] == b" " else line[6:]
                self._event = value or None
            elif line[0] != _COLON:  # ":" starts a comment
                self._field(line)
        return events

    def flush_bytes(self) -> list[RawEvent]:
        """``flush`` without decoding."""
        self._head = b""  # at most a partial BOM: nothing to dispatch
        self._pending = []
        self._skip_lf = False
        if self._data:
            return [self._dispatch()]
        self._event = None
        return []

    def _field(self, line: bytes) -> None:
        """A line other than ``data:`` / ``event:`` / comment: the spec's general case."""
        colon = line.find(b":")
        if colon < 0:
            name, value = line, b""
        else:
            name, value = line[:colon], line[colon + 1 :]
            if value[:1] == b" ":
                value = value[1:]
        if name == b"data":
            self._data.append(value)
        elif name == b"event":
            self._event = value or None

    def _dispatch(self) -> RawEvent:
        data = self._data
        raw = data[0] if len(data) == 1 else b"\n".join(data)
        event = self._event
        self._data = []
        self._event = None
        return event, raw

"""The SSE decoder: same events whatever the chunking, per the WHATWG parsing rules."""

from __future__ import annotations

import itertools
import random

import pytest

from ext_proc.tokens.sse import SSEDecoder, SSEEvent

# Every rule at once: BOM, comments, named events, multi-line data, "data:" without the
# space, a field without a colon, an event with no data (not dispatched), id/retry
# (ignored), unknown fields, multi-byte UTF-8 (2, 3 and 4 bytes), and all three line
# endings including CRLF.
STREAM = (
    b"\xef\xbb\xbf"
    b": keep-alive comment\n"
    b"event: message_start\n"
    b'data: {"type":"message_start"}\n'
    b"\n"
    b"data: line one\n"
    b"data:line two\n"
    b"data\n"
    b"id: 42\n"
    b"retry: 1000\n"
    b"\n"
    b"event: lonely\n"
    b"\n"
    b'data: {"text":"caf\xc3\xa9 \xe6\x97\xa5\xe6\x9c\xac \xf0\x9f\x8e\x89"}\r\n'
    b"\r\n"
    b"unknown: field\r"
    b"data:  two spaces\r"
    b"\r"
    b"event:\n"
    b"data: [DONE]\n"
    b"\n"
)

EXPECTED = [
    SSEEvent("message_start", '{"type":"message_start"}'),
    SSEEvent(None, "line one\nline two\n"),
    SSEEvent(None, '{"text":"café 日本 🎉"}'),
    SSEEvent(None, " two spaces"),
    SSEEvent(None, "[DONE]"),
]


def decode(chunks: list[bytes]) -> list[SSEEvent]:
    decoder = SSEDecoder()
    events: list[SSEEvent] = []
    for chunk in chunks:
        events.extend(decoder.feed(chunk))
    events.extend(decoder.flush())
    return events


def test_whole_stream() -> None:
    assert decode([STREAM]) == EXPECTED


def test_every_single_split_position() -> None:
    for offset in range(len(STREAM) + 1):
        assert decode([STREAM[:offset], STREAM[offset:]]) == EXPECTED, offset


def test_every_pair_of_split_positions_in_the_crlf_utf8_region() -> None:
    start = STREAM.index(b'data: {"text"')
    end = STREAM.index(b"event:\n")
    for first in range(start, end):
        for second in range(first, end):
            chunks = [STREAM[:first], STREAM[first:second], STREAM[second:]]
            assert decode(chunks) == EXPECTED, (first, second)


def test_random_splits_fixed_seed() -> None:
    rng = random.Random(20240611)
    for _ in range(300):
        cuts = sorted(rng.sample(range(1, len(STREAM)), rng.randint(1, 12)))
        bounds = [0, *cuts, len(STREAM)]
        chunks = [STREAM[a:b] for a, b in itertools.pairwise(bounds)]
        assert decode(chunks) == EXPECTED, cuts


def test_byte_at_a_time() -> None:
    assert decode([STREAM[i : i + 1] for i in range(len(STREAM))]) == EXPECTED


def test_utf8_character_split_inside() -> None:
    snowman = "☃".encode()  # 3 bytes
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a" + snowman[:1]) == []
    assert decoder.feed(snowman[1:2]) == []
    assert decoder.feed(snowman[2:] + b"b\n\n") == [SSEEvent(None, "a☃b")]


def test_crlf_split_between_cr_and_lf_is_one_line_ending() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: x\r") == []
    # The \n completes the CRLF; only the next CRLF is the blank line.
    assert decoder.feed(b"\n") == []
    assert decoder.feed(b"data: y\r") == []
    assert decoder.feed(b"\n\r\n") == [SSEEvent(None, "x\ny")]


def test_cr_then_cr_is_two_line_endings() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: x\r") == []
    assert decoder.feed(b"\r") == [SSEEvent(None, "x")]


def test_empty_chunk_keeps_pending_crlf_state() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: x\r") == []
    assert decoder.feed(b"") == []
    assert decoder.feed(b"\n\n") == [SSEEvent(None, "x")]


def test_comments_only_dispatch_nothing() -> None:
    assert decode([b": ping\n\n: ping\n\n"]) == []


def test_multi_line_data_keeps_empty_lines() -> None:
    assert decode([b"data: a\ndata:\ndata: b\n\n"]) == [SSEEvent(None, "a\n\nb")]


def test_single_empty_data_line_is_an_event_with_empty_data() -> None:
    assert decode([b"data:\n\n"]) == [SSEEvent(None, "")]


def test_event_type_applies_to_one_event_only() -> None:
    events = decode([b"event: ping\ndata: 1\n\ndata: 2\n\n"])
    assert events == [SSEEvent("ping", "1"), SSEEvent(None, "2")]


def test_bom_only_once_and_split() -> None:
    bom = b"\xef\xbb\xbf"
    assert decode([bom[:1], bom[1:2], bom[2:] + b"data: x\n\n"]) == [SSEEvent(None, "x")]
    # A second BOM is not stripped: it becomes part of a field name (ignored field).
    assert decode([bom + bom + b"data: x\n\n"]) == []


def test_invalid_utf8_is_replaced_not_raised() -> None:
    assert decode([b"data: \xff\xfe ok\n\n"]) == [SSEEvent(None, "\ufffd\ufffd ok")]


@pytest.mark.parametrize(
    ("tail", "expected"),
    [
        # Lines complete, blank line missing: dispatched at flush (documented choice).
        (b"data: last\n", [SSEEvent(None, "last")]),
        (b"data: last\r\n", [SSEEvent(None, "last")]),
        (b"event: e\ndata: a\ndata: b\n", [SSEEvent("e", "a\nb")]),
        # An unterminated last line may be cut: dropped.
        (b"data: cut", []),
        (b"data: a\ndata: cut", [SSEEvent(None, "a")]),
    ],
)
def test_flush_at_end_of_stream(tail: bytes, expected: list[SSEEvent]) -> None:
    assert decode([b"data: first\n\n" + tail]) == [SSEEvent(None, "first"), *expected]


def test_flush_is_idempotent_and_resets() -> None:
    decoder = SSEDecoder()
    decoder.feed(b"data: a\n")
    assert decoder.flush() == [SSEEvent(None, "a")]
    assert decoder.flush() == []


def test_long_event_across_many_chunks() -> None:
    payload = ("x" * 99 + "é") * 2000  # ~200 KB in one data line, é split at some cuts
    body = f"data: {payload}\n\n".encode()
    chunks = [body[i : i + 61] for i in range(0, len(body), 61)]
    assert decode(chunks) == [SSEEvent(None, payload)]


def test_feed_bytes_returns_undecoded_events() -> None:
    decoder = SSEDecoder()
    raw = decoder.feed_bytes(b"event: delta\ndata: caf\xc3\xa9\n\ndata: [DONE]\n")
    assert raw == [(b"delta", "café".encode())]
    assert decoder.flush_bytes() == [(None, b"[DONE]")]

"""The lean RESP client's wire format: packing commands and parsing every reply type."""

from __future__ import annotations

import pytest
from redis.exceptions import NoScriptError, ResponseError

from ext_proc.stores.resp import _Incomplete, pack, parse


def test_pack_commands() -> None:
    assert pack(("EVALSHA", b"ab", 2, 1.5, "k")) == (
        b"*5\r\n$7\r\nEVALSHA\r\n$2\r\nab\r\n$1\r\n2\r\n$3\r\n1.5\r\n$1\r\nk\r\n"
    )


@pytest.mark.parametrize(
    ("wire", "value"),
    [
        (b"+OK\r\n", b"OK"),
        (b":42\r\n", 42),
        (b"$5\r\nhello\r\n", b"hello"),
        (b"$0\r\n\r\n", b""),
        (b"$-1\r\n", None),
        (b"*2\r\n$1\r\na\r\n:7\r\n", [b"a", 7]),
        (b"*-1\r\n", None),
    ],
)
def test_parse_replies(wire: bytes, value: object) -> None:
    assert parse(bytearray(wire), 0) == (value, len(wire))


def test_errors_come_back_as_exceptions() -> None:
    no_script, _ = parse(bytearray(b"-NOSCRIPT No matching script\r\n"), 0)
    assert isinstance(no_script, NoScriptError)
    error, _ = parse(bytearray(b"-ERR wrong number of arguments\r\n"), 0)
    assert isinstance(error, ResponseError) and "wrong number" in str(error)


@pytest.mark.parametrize("cut", range(1, 17))
def test_incomplete_replies_wait_for_more(cut: int) -> None:
    wire = b"*2\r\n$5\r\nhello\r\n:7\r\n"
    if cut < len(wire):
        with pytest.raises(_Incomplete):
            parse(bytearray(wire[:cut]), 0)


def test_replies_back_to_back() -> None:
    buf = bytearray(b"$2\r\nhi\r\n:1\r\n+OK\r\n")
    first, pos = parse(buf, 0)
    second, pos = parse(buf, pos)
    third, pos = parse(buf, pos)
    assert (first, second, third, pos) == (b"hi", 1, b"OK", len(buf))

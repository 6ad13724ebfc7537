"""Decoding Envoy's ext_proc messages, whatever bytes the app put in its headers.

Envoy copies request headers into proto3 ``string`` fields (the attributes the request
filter sends, a header's ``value``). An app that sends bytes that are not UTF-8 in one
of them (``authorization: Bearer \\xff...``) makes the whole ``ProcessingRequest``
invalid protobuf: the standard decoder refuses it, grpc fails the call, and Envoy would
answer 503 with grpc's internals in the body. ``decode_request`` decodes as usual and,
only when that fails, repairs those string fields (invalid bytes become U+FFFD) and
decodes again, so the processor sees the request and answers it properly (a key that
is not UTF-8 is a 401, a content type a 400). The usual path costs nothing extra.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf.message import DecodeError

REPLACEMENT = "\ufffd"  # what an invalid byte sequence becomes (the processor looks for it)

_from_string = pb.ProcessingRequest.FromString

# Where a ProcessingRequest holds strings taken from the app's headers: field number ->
# the schema of that field (a nested mapping for a sub-message, STRING for a string).
_STRING = "string"
_STRUCT_OF_STRINGS: Mapping[int, Any] = {1: {2: {3: _STRING}}}  # Struct.fields[].value.string
_HEADER_MAP: Mapping[int, Any] = {1: {1: {2: _STRING}}}  # HttpHeaders.headers.headers[].value
_REQUEST: Mapping[int, Any] = {
    2: _HEADER_MAP,  # request_headers
    3: _HEADER_MAP,  # response_headers
    9: {2: _STRUCT_OF_STRINGS},  # attributes[].value (a Struct)
}


def decode_request(data: bytes) -> pb.ProcessingRequest:
    """A ``ProcessingRequest`` from its wire bytes (the gRPC request deserializer)."""
    try:
        return _from_string(data)
    except DecodeError:
        repaired = _repair(memoryview(data), _REQUEST)
        if repaired == data:
            raise  # broken for another reason: let grpc refuse it
        return _from_string(repaired)


def _varint(data: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data):
            raise DecodeError("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise DecodeError("varint too long")


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _repair(data: memoryview, schema: Mapping[int, Any]) -> bytes:
    """``data`` (one message) with the string fields ``schema`` names made valid UTF-8;
    every other field copied as it is."""
    out = bytearray()
    pos = 0
    end = len(data)
    while pos < end:
        start = pos
        key, pos = _varint(data, pos)
        key_end = pos
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:  # varint
            _, pos = _varint(data, pos)
        elif wire_type == 1:  # 64-bit
            pos += 8
        elif wire_type == 5:  # 32-bit
            pos += 4
        elif wire_type == 2:  # length-delimited
            length, body = _varint(data, pos)
            pos = body + length
            if pos > end:
                raise DecodeError("truncated field")
            inner = schema.get(number)
            if inner is not None:
                value = data[body:pos]
                if inner is _STRING:
                    fixed = bytes(value).decode("utf-8", "replace").encode()
                else:
                    fixed = _repair(value, inner)
                out += data[start:key_end]
                out += _encode_varint(len(fixed))
                out += fixed
                continue
        else:
            raise DecodeError(f"unsupported wire type {wire_type}")
        if pos > end:
            raise DecodeError("truncated field")
        out += data[start:pos]
    return bytes(out)

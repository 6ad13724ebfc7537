"""Builders for ext_proc responses: continue, header mutations, OpenAI-shaped denials.

Everything here is small and allocation-light because it runs for every message;
protobuf classes are looked up once at import.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import orjson
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2

from ext_proc import envoy_contract as contract

ProcessingResponse = pb.ProcessingResponse
_HeaderValue = base_pb2.HeaderValue
_HeaderValueOption = base_pb2.HeaderValueOption
_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD

# OpenAI's error "type" per HTTP status, so SDKs and humans see familiar shapes.
_ERROR_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "timeout_error",
}

Headers = Sequence[tuple[str, str]]

_EMPTY_HEADERS_RESPONSE = pb.HeadersResponse()
_EMPTY_BODY_RESPONSE = pb.BodyResponse()

CONTINUE_REQUEST_HEADERS = ProcessingResponse(request_headers=_EMPTY_HEADERS_RESPONSE)
CONTINUE_RESPONSE_HEADERS = ProcessingResponse(response_headers=_EMPTY_HEADERS_RESPONSE)
CONTINUE_RESPONSE_BODY = ProcessingResponse(response_body=_EMPTY_BODY_RESPONSE)

# Response-headers answer for a text/event-stream response: stream the body chunk by
# chunk (never delay or buffer the app's tokens) instead of the configured BUFFERED.
_STREAMED_RESPONSE_MODE = processing_mode_pb2.ProcessingMode(
    request_header_mode=processing_mode_pb2.ProcessingMode.SKIP,
    response_header_mode=processing_mode_pb2.ProcessingMode.SKIP,
    request_body_mode=processing_mode_pb2.ProcessingMode.NONE,
    response_body_mode=processing_mode_pb2.ProcessingMode.STREAMED,
    request_trailer_mode=processing_mode_pb2.ProcessingMode.SKIP,
    response_trailer_mode=processing_mode_pb2.ProcessingMode.SKIP,
)


def error_body(
    message: str,
    *,
    status: int,
    code: str | None = None,
    param: str | None = None,
    error_type: str | None = None,
) -> bytes:
    """``{"error": {"message", "type", "code", "param"}}`` as OpenAI answers errors."""
    return orjson.dumps(
        {
            "error": {
                "message": message,
                "type": error_type or _ERROR_TYPE_BY_STATUS.get(status, "api_error"),
                "code": code,
                "param": param,
            }
        }
    )


_ANTHROPIC_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
}


def anthropic_error_body(message: str, *, status: int, code: str | None = None) -> bytes:
    """Anthropic's error shape, for apps on ``/v1/messages`` (the Anthropic SDK)."""
    error: dict[str, str] = {
        "type": _ANTHROPIC_TYPE_BY_STATUS.get(status, "api_error"),
        "message": message,
    }
    if code:
        error["code"] = code  # ours, beside Anthropic's fields: the SDK ignores extra keys
    return orjson.dumps({"type": "error", "error": error})


def header_options(headers: Iterable[tuple[str, str]]) -> list[base_pb2.HeaderValueOption]:
    return [
        _HeaderValueOption(
            header=_HeaderValue(key=k, raw_value=v.encode()), append_action=_OVERWRITE
        )
        for k, v in headers
    ]


def header_mutation(set_headers: Headers = ()) -> pb.HeaderMutation:
    return pb.HeaderMutation(set_headers=header_options(set_headers))


def immediate(
    status: int,
    message: str,
    *,
    code: str | None = None,
    param: str | None = None,
    error_type: str | None = None,
    headers: Headers = (),
    anthropic: bool = False,
) -> pb.ProcessingResponse:
    """An error answered by the gateway itself (the upstream is not called): OpenAI's
    shape, or Anthropic's for apps calling ``/v1/messages``."""
    if anthropic:
        body = anthropic_error_body(message, status=status, code=code)
    else:
        body = error_body(message, status=status, code=code, param=param, error_type=error_type)
    all_headers = [("content-type", "application/json"), *headers]
    return immediate_raw(status, body, all_headers, details=contract.details(code or "error"))


def immediate_raw(
    status: int, body: bytes, headers: Headers, *, details: str = ""
) -> pb.ProcessingResponse:
    return ProcessingResponse(
        immediate_response=pb.ImmediateResponse(
            status=http_status_pb2.HttpStatus(code=status),
            headers=header_mutation(headers),
            body=body,
            details=details.replace(" ", "_")[:64],
        )
    )


def continue_request_body_with_metadata(
    metadata: struct_pb2.Struct, *, body: bytes | None = None
) -> pb.ProcessingResponse:
    """Let the request go on, with the routing decision as dynamic metadata (applied by
    the Lua filter) and, when the provider needs it, a replacement body."""
    response = ProcessingResponse(request_body=pb.BodyResponse(), dynamic_metadata=metadata)
    if body is not None:
        common = response.request_body.response
        common.status = pb.CommonResponse.CONTINUE_AND_REPLACE
        common.body_mutation.body = body
    return response


def continue_response_headers(
    set_headers: Headers = (),
    *,
    remove: Sequence[str] = (),
    stream_body: bool = False,
    metadata: struct_pb2.Struct | None = None,
) -> pb.ProcessingResponse:
    response = ProcessingResponse(response_headers=pb.HeadersResponse())
    if set_headers:
        response.response_headers.response.header_mutation.set_headers.extend(
            header_options(set_headers)
        )
    if remove:
        response.response_headers.response.header_mutation.remove_headers.extend(remove)
    if stream_body:
        response.mode_override.CopyFrom(_STREAMED_RESPONSE_MODE)
    if metadata is not None:
        response.dynamic_metadata.CopyFrom(metadata)
    return response


def replace_response_body(body: bytes, set_headers: Headers = ()) -> pb.ProcessingResponse:
    """Send ``body`` instead of this response body chunk (or the whole buffered body).

    Status CONTINUE (not CONTINUE_AND_REPLACE, which would stop further chunks); an empty
    replacement clears the chunk.
    """
    common = pb.CommonResponse(header_mutation=header_mutation(set_headers))
    if body:
        common.body_mutation.body = body
    else:
        common.body_mutation.clear_body = True
    return ProcessingResponse(response_body=pb.BodyResponse(response=common))

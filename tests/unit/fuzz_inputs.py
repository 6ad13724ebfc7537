"""What the fuzz suites send: hypothesis strategies for whole HTTP requests (method, path,
the headers the gateway reads, body) and the ext_proc wire bytes Envoy makes of them.

Shared by the processor-level suite (``tests/unit/test_fuzz.py``) and the one through a
real Envoy (``tests/e2e/test_fuzz_e2e.py``). Each ``Case`` carries tags saying how it was
built (``path_kind``, ``auth``, ``content_type_kind``, ``body_faults``) so the suites can
hold the gateway to the documented answer where the README fixes one (a key header
that is not UTF-8 is a 401, a body that is not JSON a 400, ...), and to the general
rules (never a 500, the error shape, one usage record) everywhere else.

The wire form is built by hand, field by field, because the interesting inputs (header
bytes that are not UTF-8) cannot be put into a protobuf ``string`` by the Python
library; this is what Envoy's C++ serializer sends for them.
"""

from __future__ import annotations

import json
import string
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from hypothesis import strategies as st

from ext_proc.server.processor import ATTRIBUTES_KEY

KEY_HEADERS = ("authorization", "api-key", "x-api-key")

# -------------------------------------------------------------------------- wire form


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _len_field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _bool_field(number: int, value: bool) -> bytes:
    return _varint(number << 3) + _varint(1) if value else b""


_PROTOCOL_CONFIG = pb.ProtocolConfiguration(
    request_body_mode=1  # BUFFERED, as the gateway's Envoy config asks
).SerializeToString()


def body_message(
    attributes: dict[str, bytes],
    body: bytes,
    *,
    end_of_stream: bool = True,
    protocol_config: bool = False,
) -> bytes:
    """A ``ProcessingRequest`` with ``request_body`` and the filter's attributes (each a
    ``Struct`` string value holding exactly ``attributes[name]``'s bytes), serialized
    in field order as Envoy's serializer writes it."""
    http_body = (_len_field(1, body) if body else b"") + _bool_field(2, end_of_stream)
    struct = b"".join(
        _len_field(1, _len_field(1, name.encode()) + _len_field(2, _len_field(3, value)))
        for name, value in attributes.items()
    )
    entry = _len_field(1, ATTRIBUTES_KEY.encode()) + _len_field(2, struct)
    out = _len_field(4, http_body) + (_len_field(9, entry) if attributes else b"")
    if protocol_config:
        out += _len_field(11, _PROTOCOL_CONFIG)
    return out


def headers_message(
    headers: list[tuple[str, bytes]], *, end_of_stream: bool, raw_value: bool = True
) -> bytes:
    """A ``ProcessingRequest`` with ``request_headers``: each header's bytes in
    ``raw_value`` (what current Envoy sends) or in the ``value`` string (older Envoy)."""
    values = b"".join(
        _len_field(1, _len_field(1, name.encode()) + _len_field(3 if raw_value else 2, value))
        for name, value in headers
    )
    http_headers = _len_field(1, values) + _bool_field(3, end_of_stream)
    return _len_field(2, http_headers)


# ---------------------------------------------------------------------------- a case


@dataclass
class Case:
    """One HTTP request as the app sent it, with how it was made."""

    method: bytes
    path: bytes
    headers: dict[str, bytes]  # the key headers and content-type that are present
    body: bytes
    request_id: str
    path_kind: str  # "body" (a known body endpoint), "models", "unknown", "odd"
    auth: str  # "active", "inactive" (revoked / expired), "missing", "non_utf8", "other"
    content_type_kind: str  # "json", "other", "non_utf8", "absent", "odd"
    body_faults: list[str] = field(default_factory=list)  # mutations that break the body
    body_kind: str = ""  # what the body was made from
    phase: str = "body"  # "body": one message with attributes; "headers": headers first
    raw_value: bool = True  # headers phase: values in raw_value (else the value string)
    # Headers phase only: more headers (a repeated key header makes ``auth`` moot).
    extra_headers: list[tuple[str, bytes]] = field(default_factory=list)

    def in_headers_phase(self) -> Case:
        """The same request under the Envoy config that sends its headers first
        (``ext-proc envoy-config --headers-phase``), with a request id of its own."""
        last = "e" if self.request_id.endswith("f") else "f"
        return replace(self, phase="headers", request_id=self.request_id[:-1] + last)

    @property
    def text_path(self) -> str:
        return self.path.decode("utf-8", "replace")

    def attributes(self) -> dict[str, bytes]:
        out = {
            "request.path": self.path,
            "request.method": self.method,
        }
        if self.request_id:
            out["request.id"] = self.request_id.encode()
        for name, value in self.headers.items():
            out[f"request.headers['{name}']"] = value
        return out

    def wire(self) -> list[bytes]:
        """The messages Envoy sends for this request, in order."""
        if self.phase == "body":
            return [body_message(self.attributes(), self.body, protocol_config=True)]
        head = [
            (":authority", b"gateway"),
            (":path", self.path),
            (":method", self.method),
            (":scheme", b"http"),
            ("x-request-id", self.request_id.encode()),
            *self.headers.items(),
            *self.extra_headers,
        ]
        if self.body:
            head.append(("content-length", str(len(self.body)).encode()))
        first = headers_message(head, end_of_stream=not self.body, raw_value=self.raw_value)
        if not self.body:
            return [first]
        return [first, body_message({}, self.body)]

    def inputs_text(self) -> str:
        """Everything the app sent, as text (an error may echo part of it)."""
        extra = [value for _, value in self.extra_headers]
        parts = [self.method, self.path, self.body, *self.headers.values(), *extra]
        return " ".join(p.decode("utf-8", "replace") for p in parts)


# ------------------------------------------------------------------------ JSON values

# Values that trip parsers, estimators and type checks, drawn as often as random ones.
_TRICKY = [
    None,
    True,
    False,
    0,
    -1,
    1,
    1.5,
    -0.0,
    1e308,
    5e-324,
    2**31,
    2**53 + 1,
    2**63 - 1,
    2**63,
    2**64 - 1,
    2**64,
    -(2**63) - 1,
    10**30,
    "",
    " ",
    "\u0000",
    "a\u0000b",
    "\ufeff",
    "\u2028",
    "\U0001f600",
    "<|endoftext|>",
    "x" * 2000,
    [],
    {},
    [None],
    [[]],
    {"": None},
    {"type": "text", "text": "hi"},
]
_RANDOM_SCALARS = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
)
_TRICKY_VALUE = st.sampled_from(_TRICKY)
_KEYS_TEXT = st.text(max_size=6)
# Mostly one draw (a tricky value, a random scalar); sometimes a small random structure.
json_values: st.SearchStrategy[Any] = st.one_of(
    _TRICKY_VALUE,
    _TRICKY_VALUE,
    _RANDOM_SCALARS,
    st.recursive(
        st.one_of(_TRICKY_VALUE, _RANDOM_SCALARS),
        lambda children: (
            st.lists(children, max_size=3) | st.dictionaries(_KEYS_TEXT, children, max_size=3)
        ),
        max_leaves=5,
    ),
)

# Text an LLM app sends: mostly ordinary, sometimes anything unicode (no surrogates: a
# str with one cannot be written as UTF-8; lone surrogate *escapes* are a body fault).
_TEXTS = [
    "Hi",
    "Say hello in three languages.",
    "",
    " ",
    "<|endoftext|>",
    "<|im_start|>system",
    "\u0000",
    "\u2028\u2029",
    "\ufeff",
    "Привет, как дела?",
    "日本語のテキスト",
    "🙂" * 50,
    "a" * 3000,
    '{"nested": "json in a string"}',
    "\\ud800 (an escaped backslash, not a surrogate)",
]
_text = st.one_of(
    st.sampled_from(_TEXTS),
    st.sampled_from(_TEXTS),
    st.text(alphabet=string.ascii_letters + string.digits + " .,!?'\n", max_size=60),
    st.text(max_size=30),
)

# ------------------------------------------------------------------------ the models

# Catalog names, aliases and deployments of the suites' configs (both use these names),
# and names no config has.
MODEL_NAMES = (
    "gpt-4o-mini",
    "mini",
    "text-embedding-3-small",
    "priced",
    "azure-mini",
    "mini-prod",
    "keyless",
    "claude-4",
    "claude-sonnet-4-20250514",
    "deny-me",
    "unknown-model",
    "GPT-4O-MINI",
    "gpt-4o-mini ",
    "gpt-4o-mini\u0000",  # NUL: a valid JSON string that Postgres text cannot hold
    "\u0000",
    "mini\U0001f600",
)
_MODEL_NAME = st.sampled_from(MODEL_NAMES)
models = st.one_of(*[_MODEL_NAME] * 10, st.text(max_size=20), json_values)

# ------------------------------------------------------------------------- messages

_image_url = st.fixed_dictionaries(
    {},
    optional={
        "url": st.sampled_from(
            [
                "https://example.com/a.png",
                "http://example.com/b.jpg",
                "data:image/png;base64,iVBORw0KGgo=",
                "data:image/tiff;base64,AAAA",
                "data:image/png,notbase64",
                "data:,",
                "ftp://x",
                "",
            ]
        )
        | json_values,
        "detail": st.sampled_from(["low", "high", "auto"]) | json_values,
    },
)
_content_part = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": _text}),
    st.fixed_dictionaries({"type": st.just("image_url"), "image_url": _image_url | json_values}),
    st.fixed_dictionaries({"type": st.just("refusal"), "refusal": _text | json_values}),
    st.fixed_dictionaries(
        {"type": st.sampled_from(["text", "image_url", "input_audio", "file", "refusal"])},
        optional={"text": json_values, "image_url": json_values, "input_audio": json_values},
    ),
    json_values,
)
_content = st.one_of(_text, st.lists(_content_part, max_size=3), st.none(), json_values)
_tool_call = st.one_of(
    st.fixed_dictionaries(
        {
            "id": st.text(max_size=10) | json_values,
            "type": st.sampled_from(["function", "custom"]) | json_values,
            "function": st.fixed_dictionaries(
                {},
                optional={
                    "name": st.text(max_size=10) | json_values,
                    "arguments": st.sampled_from(['{"a": 1}', "{}", "[1]", "{", ""])
                    | st.text(max_size=20)
                    | json_values,
                },
            )
            | json_values,
        }
    ),
    json_values,
)
_role = st.one_of(
    st.sampled_from(["system", "developer", "user", "assistant", "tool", "function"]),
    st.text(max_size=8),
    json_values,
)
# Messages worth sending often: every shape the estimator and translator know, and
# several they must refuse cleanly.
_MESSAGE_POOL = [
    {"role": "user", "content": "Hi"},
    {"role": "system", "content": "You are terse."},
    {"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
        ],
    },
    {
        "role": "assistant",
        "tool_calls": [
            {"id": "call_2", "type": "function", "function": {"name": "g", "arguments": "not json"}}
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "42"},
    {"role": "tool", "content": [{"type": "text", "text": "x"}]},
    {
        "role": "user",
        "content": [
            {"type": "text", "text": "What is this?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
        ],
    },
    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/a.png"}}]},
    {"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "AA=="}}]},
    {"role": "assistant", "content": [{"type": "refusal", "refusal": "No."}]},
    {"role": "function", "name": "f", "content": "old style"},
    {"role": "user", "name": "bob", "content": "named"},
    {"role": "user", "content": ""},
    {"role": "user", "content": 5},
    {"role": "user", "content": {"text": "a dict"}},
    {"role": "user", "content": [None, 1, "x"]},
    {"role": "user", "content": [[{"type": "text", "text": "nested"}]]},
    {"role": "assistant", "content": "ok", "function_call": {"name": "f"}},
    {"role": "wizard", "content": "unknown role"},
    {"role": 7, "content": "role is a number"},
    {"role": None, "content": "role is null"},
    {"content": "no role"},
    {"role": "user"},
    {},
    {"role": "user", "content": "a" * 5000},
]
_chat_message = st.one_of(
    st.sampled_from(_MESSAGE_POOL),
    st.sampled_from(_MESSAGE_POOL),
    st.sampled_from(_MESSAGE_POOL),
    st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "assistant"]), "content": _text}
    ),
    st.fixed_dictionaries(
        {},
        optional={
            "role": _role,
            "content": _content,
            "name": st.text(max_size=8) | json_values,
            "tool_calls": st.lists(_tool_call, max_size=2) | json_values,
            "tool_call_id": st.text(max_size=8) | json_values,
            "function_call": json_values,
            "audio": json_values,
        },
    ),
    json_values,
)
_message_list = st.lists(_chat_message, min_size=1, max_size=3)
_chat_messages = st.one_of(_message_list, _message_list, _message_list, st.just([]), json_values)
_tool = st.one_of(
    st.fixed_dictionaries(
        {
            "type": st.sampled_from(["function", "custom"]) | json_values,
            "function": st.fixed_dictionaries(
                {"name": st.text(max_size=10) | json_values},
                optional={
                    "description": _text | json_values,
                    "parameters": st.just({"type": "object", "properties": {}}) | json_values,
                    "strict": json_values,
                },
            )
            | json_values,
        }
    ),
    json_values,
)
_max_tokens = st.one_of(
    st.integers(min_value=-3, max_value=300),
    st.sampled_from([0, 2**31, 2**53, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 10**30]),
    st.floats(allow_nan=False, allow_infinity=False),
    json_values,
)
# OpenAI chat parameters (and a few others), each with plausible and arbitrary values.
_CHAT_PARAMS: dict[str, st.SearchStrategy[Any]] = {
    "stream": st.booleans() | json_values,
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": json_values})
    | json_values,
    "max_tokens": _max_tokens,
    "max_completion_tokens": _max_tokens,
    "n": st.integers(min_value=-1, max_value=4) | json_values,
    "temperature": st.floats(min_value=0, max_value=2) | json_values,
    "top_p": st.floats(min_value=0, max_value=1) | json_values,
    "top_k": st.integers(min_value=0, max_value=50) | json_values,
    "stop": _text | st.lists(_text, max_size=3) | json_values,
    "tools": st.lists(_tool, max_size=2) | json_values,
    "tool_choice": st.sampled_from(["auto", "none", "required"])
    | st.fixed_dictionaries(
        {"type": st.just("function"), "function": st.fixed_dictionaries({"name": st.text()})}
    )
    | json_values,
    "parallel_tool_calls": st.booleans() | json_values,
    "user": st.text(max_size=10) | json_values,
    "logprobs": st.booleans() | json_values,
    "top_logprobs": st.integers(min_value=0, max_value=5) | json_values,
    "logit_bias": st.just({}) | json_values,
    "response_format": st.sampled_from([{"type": "text"}, {"type": "json_object"}]) | json_values,
    "modalities": st.just(["text"]) | json_values,
    "seed": st.integers() | json_values,
    "metadata": json_values,
    "functions": json_values,
    "reasoning_effort": json_values,
    "frequency_penalty": json_values,
}


# (Index 0 is what hypothesis draws when it keeps things simple: "present" comes first.)
_PRESENT = st.sampled_from([True] * 9 + [False])
_SOME_EXTRAS = st.dictionaries(st.text(max_size=8), json_values, min_size=1, max_size=2)
_EXTRAS = st.one_of(st.just({}), st.just({}), _SOME_EXTRAS)
_BOOLEANS = st.booleans()


def _with_extras(
    required: dict[str, st.SearchStrategy[Any]], params: dict[str, st.SearchStrategy[Any]]
) -> st.SearchStrategy[dict[str, Any]]:
    """Objects with ``required`` keys (each sometimes left out), some of ``params``, and
    random extra keys. (Strategies are built once, here: building one per draw costs
    hypothesis a validation each time.)"""
    chosen_params = st.lists(st.sampled_from(sorted(params)), max_size=4, unique=True)

    @st.composite
    def build(draw: st.DrawFn) -> dict[str, Any]:
        obj: dict[str, Any] = {}
        for name, strategy in required.items():
            if draw(_PRESENT):  # required keys are there 90% of the time
                obj[name] = draw(strategy)
        for name in draw(chosen_params):
            obj[name] = draw(params[name])
        for name, value in draw(_EXTRAS).items():
            obj.setdefault(name, value)
        if draw(_BOOLEANS):  # reorder: parsers must not care
            obj = dict(reversed(list(obj.items())))
        return obj

    return build()


_prompt = st.one_of(
    _text,
    st.lists(_text, max_size=3),
    st.lists(st.integers(min_value=-1, max_value=300_000), max_size=5),
    st.lists(st.lists(st.integers(min_value=0, max_value=1000), max_size=3), max_size=2),
    json_values,
)
_anthropic_block = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": _text}),
    st.fixed_dictionaries(
        {"type": st.sampled_from(["text", "image", "tool_use", "tool_result", "thinking"])},
        optional={
            "text": json_values,
            "input": json_values,
            "content": json_values,
            "thinking": json_values,
            "source": json_values,
        },
    ),
    json_values,
)
_ANTHROPIC_POOL = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": [{"type": "text", "text": "Hello"}]},
    {
        "role": "assistant",
        "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": {"a": 1}}],
    },
    {
        "role": "user",
        "content": [
            {"type": "tool_result", "tool_use_id": "t1", "content": [{"type": "text", "text": "1"}]}
        ],
    },
    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "2"}]},
    {
        "role": "user",
        "content": [
            {
                "type": "image",
                "source": {"type": "base64", "media_type": "image/png", "data": "AA=="},
            }
        ],
    },
    {"role": "assistant", "content": [{"type": "thinking", "thinking": "hmm", "signature": "s"}]},
    {"role": "user", "content": [{"type": "document", "source": {"type": "text", "data": "d"}}]},
    {"role": "user", "content": [{"type": "text"}]},
    {"role": "user", "content": None},
    {"role": "system", "content": "not a Messages role"},
    {"content": "no role"},
    {},
]
_anthropic_message = st.one_of(
    st.sampled_from(_ANTHROPIC_POOL),
    st.sampled_from(_ANTHROPIC_POOL),
    st.fixed_dictionaries(
        {
            "role": st.sampled_from(["user", "assistant"]) | _role,
            "content": _text | st.lists(_anthropic_block, max_size=3) | json_values,
        }
    ),
    json_values,
)

chat_bodies = _with_extras({"model": models, "messages": _chat_messages}, _CHAT_PARAMS)
completion_bodies = _with_extras(
    {"model": models, "prompt": _prompt},
    {
        "max_tokens": _max_tokens,
        "stream": st.booleans() | json_values,
        "stream_options": json_values,
        "n": json_values,
        "echo": json_values,
        "suffix": json_values,
    },
)
embedding_bodies = _with_extras(
    {"model": models, "input": _prompt},
    {
        "dimensions": json_values,
        "encoding_format": st.sampled_from(["float", "base64"]) | json_values,
        "user": json_values,
        "stream": json_values,
    },
)
messages_bodies = _with_extras(
    {
        "model": models,
        "max_tokens": _max_tokens,
        "messages": st.lists(_anthropic_message, min_size=1, max_size=3) | json_values,
    },
    {
        "system": _text | st.lists(_anthropic_block, max_size=2) | json_values,
        "stream": st.booleans() | json_values,
        "tools": json_values,
        "tool_choice": json_values,
        "temperature": json_values,
        "thinking": json_values,
        "metadata": json_values,
        "stop_sequences": json_values,
    },
)
_RESPONSES_INPUT_POOL = [
    {"role": "user", "content": "Hi"},
    {"role": "user", "content": [{"type": "input_text", "text": "Describe"}]},
    {"role": "user", "content": [{"type": "input_image", "image_url": "https://x/a.png"}]},
    {"type": "message", "role": "developer", "content": "Be brief."},
    {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
    {"type": "function_call_output", "call_id": "c1", "output": "42"},
    {"type": "reasoning", "summary": []},
    {"role": "assistant", "content": [{"type": "output_text", "text": "ok"}]},
    {"type": "item_reference", "id": "msg_1"},
    {},
]
_responses_input = st.one_of(
    _text,
    st.lists(st.one_of(st.sampled_from(_RESPONSES_INPUT_POOL), json_values), max_size=3),
    json_values,
)
_RESPONSES_PARAMS: dict[str, st.SearchStrategy[Any]] = {
    "instructions": _text | json_values,
    "stream": st.booleans() | json_values,
    "max_output_tokens": _max_tokens,
    "previous_response_id": st.text(max_size=10) | json_values,
    "tools": st.lists(
        st.sampled_from(
            [{"type": "function", "name": "f", "parameters": {}}, {"type": "web_search"}]
        ),
        max_size=2,
    )
    | json_values,
    "reasoning": st.just({"effort": "low"}) | json_values,
    "text": st.just({"format": {"type": "text"}}) | json_values,
    "store": json_values,
    "temperature": json_values,
}
responses_bodies = _with_extras({"model": models, "input": _responses_input}, _RESPONSES_PARAMS)
any_request_body = st.one_of(
    chat_bodies, completion_bodies, embedding_bodies, messages_bodies, responses_bodies
)

# Bodies whose required fields are right (a served model, well-formed messages), with
# the optional parameters still arbitrary: these reach the router, the estimator, the
# translator, the policies and the adapters.
_SERVED_CHAT_MODELS = st.sampled_from(
    ["gpt-4o-mini", "mini", "priced", "azure-mini", "keyless", "claude-4", "deny-me"]
)
_SERVED_EMBEDDING_MODELS = st.sampled_from(["text-embedding-3-small", "azure-mini", "keyless"])
_CLAUDE_MODELS = st.sampled_from(["claude-4", "claude-sonnet-4-20250514"])
_GOOD_MESSAGES = st.lists(st.sampled_from(_MESSAGE_POOL[:13]), min_size=1, max_size=3)
_GOOD_ANTHROPIC = st.lists(st.sampled_from(_ANTHROPIC_POOL[:8]), min_size=1, max_size=3)
plausible_chat_bodies = _with_extras(
    {"model": _SERVED_CHAT_MODELS, "messages": _GOOD_MESSAGES}, _CHAT_PARAMS
)
plausible_completion_bodies = _with_extras(
    {"model": _SERVED_CHAT_MODELS, "prompt": _prompt},
    {"max_tokens": _max_tokens, "stream": st.booleans(), "echo": json_values},
)
plausible_embedding_bodies = _with_extras(
    {"model": _SERVED_EMBEDDING_MODELS, "input": _prompt},
    {"dimensions": json_values, "encoding_format": st.sampled_from(["float", "base64"])},
)
plausible_responses_bodies = _with_extras(
    {
        "model": _SERVED_CHAT_MODELS,
        "input": st.one_of(_text, st.lists(st.sampled_from(_RESPONSES_INPUT_POOL[:8]), min_size=1)),
    },
    _RESPONSES_PARAMS,
)
plausible_messages_bodies = _with_extras(
    {
        "model": _CLAUDE_MODELS,
        "max_tokens": st.integers(min_value=1, max_value=2000),
        "messages": _GOOD_ANTHROPIC,
    },
    {
        "system": _text | st.lists(_anthropic_block, max_size=2),
        "stream": st.booleans(),
        "tools": json_values,
        "temperature": json_values,
    },
)

# ---------------------------------------------------------------------- serializing


_SEPARATORS = st.sampled_from([(",", ":"), (", ", ": "), (" , ", " : ")])
_INDENTS = st.sampled_from([None, None, None, 0, 2, "\t"])


@st.composite
def serialized(draw: st.DrawFn, value: Any) -> bytes:
    """``value`` as JSON text, in one of the spellings JSON allows."""
    text = json.dumps(
        value,
        ensure_ascii=draw(_BOOLEANS),
        separators=draw(_SEPARATORS),
        indent=draw(_INDENTS),
    )
    return text.encode("utf-8")


# Faults that make a body something the gateway must refuse with a 400 (the README's
# "Bad input": not JSON, not UTF-8, NaN, a lone surrogate, a repeated key, too deep, an
# integer past 64 bits).
REFUSED_FAULTS = frozenset(
    {
        "big_int",
        "truncated",
        "non_utf8",
        "lone_surrogate",
        "nan",
        "infinite_number",
        "repeated_key",
        "too_deep",
        "bom",
        "trailing_garbage",
        "empty",
        "not_an_object",
    }
)
_INVALID_UTF8 = st.sampled_from(
    [
        b"\xff",
        b"\xfe",
        b"\x80",
        b"\xc3\x28",
        b"\xc0\xaf",  # overlong "/"
        b"\xed\xa0\x80",  # a UTF-16 surrogate encoded as UTF-8 (CESU-8)
        b"\xf4\x90\x80\x80",  # past U+10FFFF
        b"\xe2\x82",  # a sequence cut short
    ]
)
_FAULT_KINDS = st.sampled_from(
    [
        *["none"] * 10,
        "whitespace",
        "big_int",
        "depth_ok",
        "truncated",
        "non_utf8",
        "lone_surrogate",
        "nan",
        "infinite_number",
        "repeated_key",
        "too_deep",
        "bom",
        "trailing_garbage",
        "empty",
    ]
)
_WHITESPACE = st.sampled_from([b" ", b"\n", b"\t", b"\r\n"])
_BIG_DIGITS = st.integers(min_value=10**19, max_value=10**40)
_SIGN = st.sampled_from(["", "-"])
_SURROGATE_ESCAPES = st.sampled_from([b"\\ud800", b"\\udfff", b"\\uDBFF", b"x\\ud83d"])
_KEY_OR_VALUE = st.sampled_from(["value", "key"])
_NAN_TOKENS = st.sampled_from([b"NaN", b"Infinity", b"-Infinity", b"nan"])
_HUGE_TOKENS = st.sampled_from([b"1e400", b"-1e999", b"123e456789"])
_REPEATABLE = st.sampled_from([b"model", b"messages", b"stream", b"dup"])
_DEPTHS = st.sampled_from([128, 129, 200, 1000, 5000])
_NESTERS = st.sampled_from([(b"[", b"]"), (b'{"a":', b"}")])
_GARBAGE = st.sampled_from([b"x", b"}", b",", b"{}", b"\x00", b"]"])


def _insert(raw: bytes, member: bytes) -> bytes:
    """``raw`` (a serialized object) with ``member`` (``"key":value``) as its first
    member, and a comma only when other members follow."""
    at = raw.index(b"{") + 1
    empty = raw[at:].lstrip().startswith(b"}")
    return raw[:at] + member + (b"" if empty else b",") + raw[at:]


_WHERE = st.sampled_from(["anywhere", "end", "middle", "start"])


def _inject(draw: st.DrawFn, value: bytes) -> bytes:
    """``value`` with a byte sequence that is not UTF-8 somewhere in it (hypothesis
    favours small integers: the end and the middle are asked for explicitly)."""
    where = draw(_WHERE)
    if where == "end":
        at = len(value)
    elif where == "middle":
        at = len(value) // 2
    elif where == "start":
        at = 0
    else:
        at = draw(st.integers(min_value=0, max_value=len(value)))
    return value[:at] + draw(_INVALID_UTF8) + value[at:]


@st.composite
def faulty_body(draw: st.DrawFn, raw: bytes) -> tuple[bytes, list[str]]:
    """``raw`` (a serialized JSON object) with zero or one fault, and its name."""
    kind = draw(_FAULT_KINDS)
    if kind == "none":
        return raw, []
    if kind == "whitespace":  # still a valid body
        return draw(_WHITESPACE) + raw + b"\n ", []
    if kind == "big_int":  # valid JSON; refused past 64 bits (parsers read it differently)
        value = int(draw(_SIGN) + str(draw(_BIG_DIGITS)))
        beyond = not -(2**63) <= value <= 2**64 - 1
        return _insert(raw, f'"big":{value}'.encode()), ["big_int"] if beyond else []
    if kind == "depth_ok":  # exactly the deepest body allowed (the object is level 1)
        return _insert(raw, b'"deep":' + b"[" * 127 + b"]" * 127), []
    if kind == "truncated":
        cut = draw(st.integers(min_value=0, max_value=max(0, len(raw.rstrip()) - 1)))
        return raw[:cut], ["truncated" if cut else "empty"]
    if kind == "non_utf8":
        return _inject(draw, raw), ["non_utf8"]
    if kind == "lone_surrogate":
        escape = draw(_SURROGATE_ESCAPES)
        member = (
            b'"s":"' + escape + b'"' if draw(_KEY_OR_VALUE) == "value" else b'"' + escape + b'":1'
        )
        return _insert(raw, member), ["lone_surrogate"]
    if kind == "nan":
        return _insert(raw, b'"x":' + draw(_NAN_TOKENS)), ["nan"]
    if kind == "infinite_number":
        return _insert(raw, b'"x":' + draw(_HUGE_TOKENS)), ["infinite_number"]
    if kind == "repeated_key":
        key = draw(_REPEATABLE)
        return _insert(raw, b'"' + key + b'":1,"' + key + b'":2'), ["repeated_key"]
    if kind == "too_deep":
        depth = draw(_DEPTHS)
        opener, closer = draw(_NESTERS)
        nested = opener * depth + (b"1" if closer == b"}" else b"") + closer * depth
        return _insert(raw, b'"deep":' + nested), ["too_deep"]
    if kind == "bom":
        return b"\xef\xbb\xbf" + raw, ["bom"]
    if kind == "trailing_garbage":
        return raw + draw(_GARBAGE), ["trailing_garbage"]
    return b"", ["empty"]


_BODY_SOURCES = st.sampled_from(["request"] * 8 + ["json", "bytes"])
_RANDOM_BYTES = st.binary(max_size=48)


@st.composite
def bodies(
    draw: st.DrawFn, objects: st.SearchStrategy[Any] = any_request_body
) -> tuple[bytes, list[str], str]:
    """A body's bytes, the faults put in it, and what it was made from."""
    source = draw(_BODY_SOURCES)
    if source == "bytes":
        return draw(_RANDOM_BYTES), ["random_bytes"], "bytes"
    value = draw(objects if source == "request" else json_values)
    raw = draw(serialized(value))
    if not isinstance(value, dict):
        return raw, ["not_an_object"], source
    raw, faults = draw(faulty_body(raw))
    return raw, faults, source


# -------------------------------------------------------------------------- headers

# Visible ASCII and obs-text: what an HTTP/1.1 header value may hold on the wire.
_HEADER_BYTES = st.binary(max_size=40).map(
    lambda b: bytes(c for c in b if c == 9 or 32 <= c < 127 or c >= 128)
)
_TOKEN = st.text(alphabet=string.ascii_letters + string.digits + "-_", min_size=1, max_size=12)
_KEY_HEADER = st.sampled_from(KEY_HEADERS)
_AUTH_MODES = st.sampled_from(
    ["active"] * 5 + ["inactive", "missing", "non_utf8", "non_utf8", "other", "other"]
)
_SOME_KEY_HEADERS = st.lists(_KEY_HEADER, min_size=1, max_size=3, unique=True)
_OTHER_HEADER = st.sampled_from((None, *KEY_HEADERS))
_VARIANTS = st.sampled_from(
    [
        "bearer {key}",
        "BEARER   {key}  ",
        "Bearer\t{key}",
        "Basic {key}",
        "Bearer {key}x",
        "Bearer {key1}",
        "Bearer {key}, Bearer {key}",
        " {key} ",
        "Bearer ",
        "Bearer",
        "",
        "sk-proj-0123456789abcdef",
        "gwk_" + "A" * 43,
        "gwk_" + "A" * 400,
        "{upper}",
        "{key}{key}",
        "Bearer gwk_" + "x" * 8000,
    ]
)


def _canonical(header: str, key: str) -> bytes:
    return f"Bearer {key}".encode() if header == "authorization" else key.encode()


def active_key_headers(keys: KeySet) -> st.SearchStrategy[tuple[dict[str, bytes], str]]:
    """An active key in one of the three headers, as the SDKs send it."""
    weighted = (*keys.active[:-1], *keys.active)  # the last (a tight limit) less often
    return st.tuples(_KEY_HEADER, st.sampled_from(weighted)).map(
        lambda pair: ({pair[0]: _canonical(*pair)}, "active")
    )


def key_headers(keys: KeySet) -> st.SearchStrategy[tuple[dict[str, bytes], str]]:
    """The key headers the app sent, and how to read them (``Case.auth``)."""
    active = st.sampled_from(keys.active)
    inactive = st.sampled_from(keys.inactive)
    anything = st.sampled_from((*keys.active, *keys.inactive, "gwk_", ""))
    any_key = st.sampled_from((*keys.active, *keys.inactive))

    @st.composite
    def build(draw: st.DrawFn) -> tuple[dict[str, bytes], str]:
        mode = draw(_AUTH_MODES)
        name = draw(_KEY_HEADER)
        if mode == "active":
            return {name: _canonical(name, draw(active))}, "active"
        if mode == "inactive":
            return {name: _canonical(name, draw(inactive))}, "inactive"
        if mode == "missing":
            return {}, "missing"
        if mode == "non_utf8":
            headers = {name: _inject(draw, _canonical(name, draw(anything)))}
            # Sometimes beside a valid key in another header: the bad bytes still decide.
            other = draw(_OTHER_HEADER)
            if other is not None and other != name:
                headers[other] = _canonical(other, draw(active))
            return headers, "non_utf8"
        # Anything else: scheme and spacing variants, other keys' shapes, noise, several
        # headers at once. Decided by the authenticator; no fixed answer here.
        headers = {}
        for header in draw(_SOME_KEY_HEADERS):
            key = draw(any_key)
            if draw(_BOOLEANS):
                headers[header] = draw(_HEADER_BYTES)
            else:
                headers[header] = (
                    draw(_VARIANTS).format(key=key, key1=key[:-1], upper=key.upper()).encode()
                )
        return headers, "other"

    return build()


_JSON_CONTENT_TYPES = [
    b"application/json",
    b"application/json; charset=utf-8",
    b"Application/JSON",
    b"application/json ; charset=UTF-8",
    b"application/json;",
    b"APPLICATION/JSON;charset=utf-8",
]
_JSON_CONTENT_TYPE = st.sampled_from(_JSON_CONTENT_TYPES)
_CT_MODES = st.sampled_from(["json", "json", "json", "absent", "other", "non_utf8", "odd"])
_OTHER_CONTENT_TYPES = st.sampled_from(
    [
        b"text/plain",
        b"application/x-www-form-urlencoded",
        b"multipart/form-data; boundary=x",
        b"application/jsonx",
        b"application/json-patch+json",
        b"json",
        b"application/xml",
    ]
)
_CT_BASES = st.sampled_from([*_JSON_CONTENT_TYPES, b"text/plain"])


def json_content_types() -> st.SearchStrategy[tuple[bytes | None, str]]:
    """A JSON content type in any spelling, or none."""
    return st.one_of(
        _JSON_CONTENT_TYPE.map(lambda v: (v, "json")),
        st.just((None, "absent")),
    )


@st.composite
def _content_types(draw: st.DrawFn) -> tuple[bytes | None, str]:
    mode = draw(_CT_MODES)
    if mode == "json":
        return draw(_JSON_CONTENT_TYPE), "json"
    if mode == "absent":
        return None, "absent"
    if mode == "other":
        return draw(_OTHER_CONTENT_TYPES), "other"
    if mode == "non_utf8":
        return _inject(draw, draw(_CT_BASES)), "non_utf8"
    return draw(_HEADER_BYTES), "odd"


_ANY_CONTENT_TYPE = _content_types()


def content_types() -> st.SearchStrategy[tuple[bytes | None, str]]:
    """Any content type: JSON spellings, none, others, not UTF-8, noise."""
    return _ANY_CONTENT_TYPE


# ---------------------------------------------------------------------------- paths

FIXED_BODY_PATHS = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/messages",
    "/v1/responses",
    "/openai/responses",
    "/openai/v1/responses",
)
AZURE_OPERATIONS = ("chat/completions", "completions", "embeddings")
_DEPLOYMENT_ALPHABET = string.ascii_letters + string.digits + "-._~%" + "éß中"
_PATH_MODES = st.sampled_from(
    ["fixed", "fixed", "fixed", "azure", "azure", "models", "unknown", "odd"]
)
_QUERIES = st.sampled_from(
    [
        "",
        "",
        "?api-version=2024-10-21",
        "?api-version=",
        "?api-version=2024-10-21&api-version=1999-01-01",
        "?api-key=gwk_secret",
        "?x=%ff%fe",
        "?&&==",
        "?a=" + "b" * 300,
    ]
)
_FIXED = st.sampled_from(FIXED_BODY_PATHS)
_DEPLOYMENTS = st.one_of(
    st.sampled_from(["mini-prod", "azure-mini", "keyless-prod", "gpt-4o-mini", "nope"]),
    st.text(alphabet=_DEPLOYMENT_ALPHABET, min_size=1, max_size=30),
)
_AZURE_OPERATION = st.sampled_from(AZURE_OPERATIONS)
_MODEL_LISTS = st.sampled_from(["/v1/models", "/openai/models"])
_UNKNOWN_PATHS = st.sampled_from(
    [
        b"/",
        b"/v1",
        b"/v1/chat",
        b"/v2/chat/completions",
        b"/V1/CHAT/COMPLETIONS",
        b"/v1/chat%2Fcompletions",
        b"/v1/responses/x",
        b"/openai/deployments//chat/completions",
        b"/openai/deployments/x/unknown",
        b"/openai/deployments/x",
        b"/v1/models/gpt-4o-mini/extra",
        b"/v1/chat/completionsX",
        b"/healthz",
        b"/" + b"a" * 5000,
    ]
)
_ODD_PATHS = st.one_of(
    st.sampled_from(
        [
            b"",
            b"*",
            b"//v1/chat/completions",
            b"/v1/chat/completions/",
            b"/v1/chat/completions//",
            b"/v1/messages/",
            b"/v1/chat/completions/../models",
            b"/v1/chat/completions#frag",
            b"/v1/chat/completions?",
            b"/openai/deployments/a/b/chat/completions",
            b"/openai/deployments/%2F/chat/completions",
            b"/openai/deployments/\xff/chat/completions",
            b"/v1/chat/completions\xff",
            b"http://gateway/v1/chat/completions",
        ]
    ),
    _HEADER_BYTES.map(lambda b: b"/" + b.replace(b" ", b"%20")),
)


@st.composite
def _paths(draw: st.DrawFn) -> tuple[bytes, str]:
    mode = draw(_PATH_MODES)
    if mode == "fixed":
        return (draw(_FIXED) + draw(_QUERIES)).encode(), "body"
    if mode == "azure":
        deployment, operation = draw(_DEPLOYMENTS), draw(_AZURE_OPERATION)
        return f"/openai/deployments/{deployment}/{operation}{draw(_QUERIES)}".encode(), "body"
    if mode == "models":
        return (draw(_MODEL_LISTS) + draw(_QUERIES)).encode(), "models"
    if mode == "unknown":
        return draw(_UNKNOWN_PATHS), "unknown"
    return draw(_ODD_PATHS), "odd"


_ANY_PATH = _paths()


def paths() -> st.SearchStrategy[tuple[bytes, str]]:
    """A ``:path`` and its kind: "body" (a known endpoint that takes a body), "models",
    "unknown" (no endpoint there), "odd" (anything: decided by the gateway)."""
    return _ANY_PATH


methods = st.one_of(
    st.just(b"POST"),
    st.just(b"POST"),
    st.just(b"POST"),
    st.sampled_from([b"GET", b"PUT", b"DELETE", b"PATCH", b"HEAD", b"OPTIONS", b"post", b""]),
    _TOKEN.map(str.encode),
)


# ------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class KeySet:
    """Gateway keys the case may use: active ones, and revoked or expired ones."""

    active: tuple[str, ...]
    inactive: tuple[str, ...]


_BODIES_FOR = {
    "chat": bodies(st.one_of(plausible_chat_bodies, chat_bodies)),
    "completions": bodies(st.one_of(plausible_completion_bodies, completion_bodies)),
    "embeddings": bodies(st.one_of(plausible_embedding_bodies, embedding_bodies)),
    "messages": bodies(st.one_of(plausible_messages_bodies, messages_bodies)),
    "responses": bodies(st.one_of(plausible_responses_bodies, responses_bodies)),
    "": bodies(any_request_body),
}


def _operation(path: bytes) -> str:
    """Which body the endpoint ``path`` takes ("" when it names none)."""
    route = path.partition(b"?")[0]
    for suffix, operation in (
        (b"/chat/completions", "chat"),
        (b"/completions", "completions"),
        (b"/embeddings", "embeddings"),
        (b"/v1/messages", "messages"),
        (b"/responses", "responses"),
    ):
        if route.endswith(suffix):
            return operation
    return ""


_REQUEST_IDS = st.integers(min_value=0, max_value=2**128 - 1).map(lambda n: str(uuid.UUID(int=n)))
# Headers beside the ones the gateway reads, in a headers message: mostly none; sometimes
# a second copy of a key or content-type header (Envoy joins repeated values with ", ").
_EXTRA_HEADERS = st.one_of(
    st.just([]),
    st.just([]),
    st.just([]),
    st.lists(
        st.tuples(
            st.sampled_from(
                ["authorization", "x-api-key", "content-type", "x-gateway-provider", "x-other"]
            ),
            _HEADER_BYTES,
        ),
        min_size=1,
        max_size=2,
    ),
)


_NO_PADDING: st.SearchStrategy[int | None] = st.none()


def cases(
    keys: KeySet,
    *,
    body_objects: st.SearchStrategy[Any] = any_request_body,
    path_strategy: Callable[[], st.SearchStrategy[tuple[bytes, str]]] = paths,
    method_strategy: st.SearchStrategy[bytes] = methods,
    pad_to: st.SearchStrategy[int | None] = _NO_PADDING,
    content_type_strategy: Callable[[], st.SearchStrategy[tuple[bytes | None, str]]] = (
        content_types
    ),
    key_strategy: Callable[[KeySet], st.SearchStrategy[tuple[dict[str, bytes], str]]] = (
        key_headers
    ),
    matched_bodies: bool = False,
) -> st.SearchStrategy[Case]:
    """Whole requests: each part from its strategy (built once, here). With
    ``matched_bodies`` the body is made for the endpoint the path names (a chat body for
    a chat path, ...) instead of from ``body_objects``."""
    path_s, key_s, ct_s = path_strategy(), key_strategy(keys), content_type_strategy()
    body_s = bodies(body_objects)

    @st.composite
    def build(draw: st.DrawFn) -> Case:
        path, path_kind = draw(path_s)
        method = draw(method_strategy)
        headers, auth = draw(key_s)
        content_type, ct_kind = draw(ct_s)
        if content_type is not None:
            headers["content-type"] = content_type
        raw, faults, body_kind = draw(_BODIES_FOR[_operation(path)] if matched_bodies else body_s)
        padding = draw(pad_to)
        if padding is not None and raw.startswith(b"{") and len(raw) < padding:
            raw = _insert(raw, b'"pad":"' + b"p" * max(0, padding - len(raw) - 10) + b'"')
        return Case(
            method=method,
            path=path,
            headers=headers,
            body=raw,
            request_id=draw(_REQUEST_IDS),
            path_kind=path_kind,
            auth=auth,
            content_type_kind=ct_kind,
            body_faults=faults,
            body_kind=body_kind,
            raw_value=draw(_BOOLEANS),
            extra_headers=draw(_EXTRA_HEADERS),
        )

    return build()

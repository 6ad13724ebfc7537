"""Reads gateway.yaml into a ``GatewayConfig``, or raises ``ConfigError`` with every problem.

We compose the YAML into nodes (``yaml.compose``) and build values ourselves instead of
``yaml.safe_load``, because nodes keep their line and column, so each problem points at
the offending key or value. It also lets us refuse duplicate keys (YAML keeps the last
one silently) and read mapping keys as the text written (YAML 1.1 would turn the key
``on:`` into ``True``), and string fields as written (``api_version: 2024-10-21`` would
otherwise be a date). References between sections (model -> provider, application ->
policy, allowlist -> model) are checked against the declared names, so one broken
provider does not also flag every model that uses it.

Top-level keys starting with ``x-`` are ignored: a place for YAML anchors to share.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Mapping, Sequence
from decimal import Decimal, InvalidOperation
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from ext_proc import policies as _policies  # module, not names: see _policy_types()
from ext_proc.config.durations import DurationError, parse_duration
from ext_proc.config.errors import ConfigError, ConfigIssue, did_you_mean
from ext_proc.config.model import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_ENVIRONMENT,
    DEFAULT_RETRIABLE_STATUS_CODES,
    DEFAULT_RETRY_ON,
    DEFAULT_TIMEOUT,
    MAX_TARGETS,
    MAX_WEIGHT,
    ON_ERROR_CHOICES,
    RETRY_ON_CONDITIONS,
    SCOPING_HEADERS,
    Application,
    Environment,
    GatewayConfig,
    Model,
    Policy,
    Provider,
    RetryPolicy,
    Target,
    canonical_form,
    fingerprint_of,
)
from ext_proc.policies.base import COMMON_FIELDS, PolicyType
from ext_proc.tokens.encodings import ENCODING_FILES
from ext_proc.usage.pricing import Price

_TAG = "tag:yaml.org,2002:"
_STRING_TAGS = frozenset(_TAG + kind for kind in ("str", "int", "float", "bool", "timestamp"))
_MAX_NAME = 128
_SLUG = re.compile(r"[a-z0-9][a-z0-9._-]*")
_SLUG_HELP = "use lower-case letters, digits, '.', '_' and '-', starting with a letter or digit"
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+-]*")
_MODEL_NAME_HELP = (
    "use letters, digits and . _ - : / @ +, starting with a letter or digit "
    "(e.g. meta/llama-3.1:8b)"
)
_AZURE_DEPLOYMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_ENV_VAR = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


if TYPE_CHECKING:
    from ext_proc.routing.providers import ProviderType
_TOP_LEVEL = ("providers", "models", "policies", "applications")
# Every provider's fields; each type adds its own (ProviderType.options).
_PROVIDER_FIELDS = (
    "type",
    "base_url",
    "api_key_env",
    "api_key_file",
    "headers",
    "timeout",
    "connect_timeout",
    "retries",
    "inject_stream_usage",
    "pass_headers",
)
_RETRY_FIELDS = ("attempts", "on", "retriable_status_codes")
_MODEL_FIELDS = (
    "provider",
    "deployment",
    "encoding",
    "aliases",
    "price",
    "fallbacks",
    "weight",
    "attempt_timeout",
)
_TARGET_FIELDS = ("provider", "deployment", "weight", "priority", "price")
_PRICE_FIELDS = ("input", "output", "cached_input", "cache_write")
# USD per million tokens: no model costs anywhere near this; with at most 6 decimal
# places a price has at most 11 significant digits, so it survives the catalog's JSON
# (a double) exactly.
_MAX_PRICE = Decimal(100_000)
_PRICE_PLACES = 6
# A number written as a plain YAML scalar that YAML 1.1 does not resolve to a number
# (`1e-05`, as JSON writes small floats) is still a number here.
_NUMBER = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][-+]?[0-9]+)?")
_APPLICATION_FIELDS = ("org", "description", "policies", "environments")
_ENVIRONMENT_FIELDS = ("policies",)

# Static provider headers must not touch what Envoy manages per connection or request,
# nor carry credentials (those come from api_key_env / api_key_file, kept out of the file).
_FORBIDDEN_HEADERS: Mapping[str, str] = MappingProxyType(
    {
        **dict.fromkeys(
            ("connection", "keep-alive", "proxy-connection", "te", "trailer", "upgrade"),
            "is a hop-by-hop header, managed by Envoy per connection",
        ),
        "transfer-encoding": "is a hop-by-hop header, managed by Envoy per connection",
        "host": "is set from base_url",
        "content-length": "is set from the request body",
        **dict.fromkeys(
            ("authorization", "api-key", "x-api-key", "proxy-authorization", "cookie"),
            "carries a credential: use api_key_env or api_key_file instead",
        ),
    }
)

_Choice = TypeVar("_Choice", bound=str)
_Item = TypeVar("_Item")


def load_config(path: str | Path) -> GatewayConfig:
    """Read and validate a gateway.yaml file."""
    filename = str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(
            [ConfigIssue(filename, 0, 0, "", f"cannot read the file: {exc.strerror or exc}")]
        ) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        message = f"not UTF-8 text: byte 0x{data[exc.start]:02x} cannot be decoded"
        raise ConfigError([ConfigIssue(filename, line, column, "", message)]) from None
    return parse_config(text, filename)


def parse_config(text: str, filename: str = "<string>") -> GatewayConfig:
    """Validate gateway.yaml text; ``filename`` is what issues are reported against."""
    document = _Document(filename, text.removeprefix("\ufeff"))
    root = document.compose()
    if root is None:
        if not document.issues:
            document.report_at(1, 1, "providers", "no providers declared")
        raise ConfigError(document.issues)
    config = _Builder(document).build(root)
    if document.issues or config is None:
        raise ConfigError(document.issues)
    return config


def _provider_types() -> Mapping[str, ProviderType]:
    # Imported at call time, like the policy types: the provider modules import
    # ext_proc.config.model (this package) themselves.
    from ext_proc.routing.providers import PROVIDER_TYPES

    return PROVIDER_TYPES


def _policy_types() -> Mapping[str, PolicyType[Any]]:
    # Read at call time: a policy module may import ext_proc.config for its enforcement
    # code, in which case this module is imported while ext_proc.policies is half done.
    return _policies.POLICY_TYPES


class _Document:
    """The text being loaded and the issues found in it so far."""

    def __init__(self, filename: str, text: str) -> None:
        self.filename = filename
        self.text = text
        self.issues: list[ConfigIssue] = []
        self._seen: set[ConfigIssue] = set()
        self._constructor = SafeConstructor()
        self._lines: list[str] | None = None

    def compose(self) -> Node | None:
        try:
            return yaml.compose(self.text, Loader=yaml.SafeLoader)
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            message = f"invalid YAML: {exc.problem or exc.context or 'syntax error'}"
            if exc.problem and exc.context and exc.context_mark is not None:
                message += f" ({exc.context}, line {exc.context_mark.line + 1})"
            line, column = (mark.line + 1, mark.column + 1) if mark is not None else (1, 1)
            self.report_at(line, column, "", message)
        except yaml.reader.ReaderError as exc:
            line = self.text.count("\n", 0, exc.position) + 1
            column = exc.position - (self.text.rfind("\n", 0, exc.position) + 1) + 1
            self.report_at(line, column, "", f"invalid character U+{exc.character:04X} in YAML")
        except yaml.YAMLError as exc:
            self.report_at(1, 1, "", f"invalid YAML: {exc}")
        except RecursionError:
            self.report_at(1, 1, "", "invalid YAML: nested too deeply")
        return None

    def report_at(self, line: int, column: int, path: str, message: str) -> None:
        issue = ConfigIssue(self.filename, line, column, path, message)
        if issue not in self._seen:  # a merged (`<<: *x`) mapping is read more than once
            self._seen.add(issue)
            self.issues.append(issue)

    def report(self, node: Node, path: str, message: str) -> None:
        self.report_at(node.start_mark.line + 1, node.start_mark.column + 1, path, message)

    # --- mappings ---------------------------------------------------------------

    def entries(
        self, node: MappingNode, path: str, _seen: frozenset[int] = frozenset()
    ) -> dict[str, tuple[Node, Node]]:
        """Key text -> (key node, value node), in file order; `<<` merges applied."""
        entries: dict[str, tuple[Node, Node]] = {}
        merged: list[MappingNode] = []
        for key_node, value_node in node.value:
            if key_node.tag == _TAG + "merge":
                merged.extend(self._merge_sources(value_node, path))
                continue
            if not isinstance(key_node, ScalarNode):
                self.report(key_node, path, f"keys must be names, not {_kind(key_node)}")
                continue
            key = key_node.value
            if key in entries:
                first = entries[key][0].start_mark.line + 1
                message = f"duplicate key '{key}' (first defined on line {first})"
                self.report(key_node, _join(path, key), message)
                continue
            entries[key] = (key_node, value_node)
        for source in merged:
            if id(source) in _seen:
                continue
            for key, entry in self.entries(source, path, _seen | {id(node)}).items():
                entries.setdefault(key, entry)  # keys written here win over merged ones
        return entries

    def _merge_sources(self, node: Node, path: str) -> list[MappingNode]:
        items = node.value if isinstance(node, SequenceNode) else [node]
        sources = [item for item in items if isinstance(item, MappingNode)]
        if len(sources) != len(items):
            self.report(node, path, "'<<' merges a mapping or a list of mappings")
        return sources

    # --- scalars ----------------------------------------------------------------

    def text_of(self, node: Node, path: str) -> str | None:
        if isinstance(node, ScalarNode) and node.tag in _STRING_TAGS:
            if node.value == "":
                self.report(node, path, "must not be empty")
                return None
            return node.value
        self.wrong_type(node, path, "a string")
        return None

    def int_of(
        self, node: Node, path: str, minimum: int | None = None, maximum: int | None = None
    ) -> int | None:
        if not (isinstance(node, ScalarNode) and node.tag == _TAG + "int"):
            self.wrong_type(node, path, "an integer")
            return None
        value = self._constructor.construct_yaml_int(node)
        if minimum is not None and maximum is not None and not minimum <= value <= maximum:
            self.report(node, path, f"must be between {minimum} and {maximum}, not {value}")
        elif minimum is not None and value < minimum:
            self.report(node, path, f"must be at least {minimum}, not {value}")
        elif maximum is not None and value > maximum:
            self.report(node, path, f"must be at most {maximum}, not {value}")
        else:
            return value
        return None

    def bool_of(self, node: Node, path: str) -> bool | None:
        if isinstance(node, ScalarNode) and node.tag == _TAG + "bool":
            return self._constructor.construct_yaml_bool(node)
        self.wrong_type(node, path, "true or false")
        return None

    def duration_of(self, node: Node, path: str, allow_zero: bool) -> float | None:
        value: str | int | float
        if isinstance(node, ScalarNode) and node.tag == _TAG + "int":
            value = self._constructor.construct_yaml_int(node)
        elif isinstance(node, ScalarNode) and node.tag == _TAG + "float":
            value = self._constructor.construct_yaml_float(node)
        elif isinstance(node, ScalarNode) and node.tag == _TAG + "str":
            value = node.value
        else:
            self.wrong_type(node, path, "a duration such as 60s")
            return None
        try:
            return parse_duration(value, allow_zero=allow_zero)
        except DurationError as exc:
            self.report(node, path, str(exc))
            return None

    def decimal_of(
        self,
        node: Node,
        path: str,
        *,
        minimum: Decimal | None = None,
        maximum: Decimal | None = None,
        positive: bool = False,
        places: int | None = None,
    ) -> Decimal | None:
        """An exact decimal from a YAML number, taken as written (``0.1`` is 1/10, not
        the double nearest to it)."""
        if not isinstance(node, ScalarNode):
            self.wrong_type(node, path, "a number")
            return None
        numeric = node.tag in (_TAG + "int", _TAG + "float")
        plain_number = node.tag == _TAG + "str" and node.style is None
        if not (numeric or plain_number):
            self.wrong_type(node, path, "a number")
            return None
        text = node.value.replace("_", "") if numeric else node.value
        if plain_number and not _NUMBER.fullmatch(text):
            self.wrong_type(node, path, "a number")
            return None
        try:
            value = Decimal(text)
        except InvalidOperation:
            value = Decimal("NaN")
        if not value.is_finite():  # .inf, .nan, 0x1f, 1:30: YAML numbers that are no price
            self.report(node, path, f"expected a decimal number, got {node.value!r}")
            return None
        if positive and value <= 0:
            self.report(node, path, f"must be greater than 0, not {node.value}")
        elif minimum is not None and value < minimum:
            self.report(node, path, f"must be at least {minimum}, not {node.value}")
        elif maximum is not None and value > maximum:
            self.report(node, path, f"must be at most {maximum}, not {node.value}")
        elif places is not None and -int(value.normalize().as_tuple().exponent) > places:
            self.report(node, path, f"use at most {places} decimal places, not {node.value}")
        else:
            return value
        return None

    def items_of(self, node: Node, path: str, what: str) -> list[Node] | None:
        if isinstance(node, SequenceNode):
            return list(node.value)
        self.wrong_type(node, path, f"a list of {what}")
        return None

    def wrong_type(self, node: Node, path: str, expected: str) -> None:
        if node.tag.startswith("!"):
            self.report(node, path, f"unsupported YAML tag '{node.tag}'; expected {expected}")
            return
        got = _kind(node)
        if isinstance(node, ScalarNode) and got != "null":
            got += f" ({node.value!r})"
        self.report(node, path, f"expected {expected}, got {got}")

    def position_in(self, node: Node, line: int, column: int) -> tuple[int, int] | None:
        """Where 1-based (line, column) of a string value is in the file, when the value
        is written so that its characters map one to one (plain or quoted on one line
        without escapes, or a literal `|` block)."""
        if not isinstance(node, ScalarNode):
            return None
        start, end = node.start_mark, node.end_mark
        if node.style in (None, "'", '"'):
            quote = 0 if node.style is None else 1
            raw = self.text[start.index + quote : end.index - quote]
            if line != 1 or start.line != end.line or raw != node.value:
                return None
            return start.line + 1, start.column + quote + column
        if node.style == "|":
            if self._lines is None:
                self._lines = self.text.splitlines()
            value_lines = node.value.split("\n")
            if line == len(value_lines) > 1 and value_lines[-1] == "":
                # Past the final line break (CEL's end of input): the end of the last line.
                line, column = line - 1, len(value_lines[-2]) + 1
            index = start.line + line  # the block's first line follows the `|`
            if not 1 <= line <= len(value_lines) or index >= len(self._lines):
                return None
            source, wanted = self._lines[index], value_lines[line - 1]
            if not wanted or not source.endswith(wanted):
                return None
            return index + 1, len(source) - len(wanted) + column
        return None


class _Map:
    """One YAML mapping with typed getters; problems are reported with their position.

    ``anchor`` is where problems about the mapping as a whole (a missing field) point:
    the key that names the entry (``azure-eastus:``), else the mapping itself.
    """

    def __init__(self, document: _Document, node: MappingNode, path: str, anchor: Node) -> None:
        self._document = document
        self.path = path
        self.anchor = anchor
        self._entries = document.entries(node, path)

    @classmethod
    def of(
        cls,
        document: _Document,
        node: Node,
        path: str,
        anchor: Node,
        fields: Sequence[str] | None,
    ) -> _Map | None:
        if not isinstance(node, MappingNode):
            expected = f"a mapping of {', '.join(fields)}" if fields else "a mapping"
            document.wrong_type(node, path, expected)
            return None
        result = cls(document, node, path, anchor)
        if fields is not None:
            result.check_fields(fields)
        return result

    def check_fields(self, fields: Collection[str], *, extension_prefix: str | None = None) -> None:
        for key, (key_node, _) in self._entries.items():
            if key in fields or (extension_prefix and key.startswith(extension_prefix)):
                continue
            hint = did_you_mean(key, fields)
            message = f"unknown field '{key}'" + (hint or f" (known: {', '.join(fields)})")
            self._document.report(key_node, self.field_path(key), message)

    def field_path(self, key: str) -> str:
        return _join(self.path, key)

    def has(self, key: str) -> bool:
        return self.node(key) is not None

    def node(self, key: str) -> Node | None:
        """The value of ``key``; None when absent or null."""
        entry = self._entries.get(key)
        if entry is None or _is_null(entry[1]):
            return None
        return entry[1]

    def key_node(self, key: str) -> Node:
        entry = self._entries.get(key)
        return self.anchor if entry is None else entry[0]

    def error(self, key: str | None, message: str, *, index: int | None = None) -> None:
        if key is None:
            self._document.report(self.anchor, self.path, message)
            return
        entry = self._entries.get(key)
        node = self.anchor if entry is None else entry[1]
        path = self.field_path(key)
        if index is not None and isinstance(node, SequenceNode) and index < len(node.value):
            node = node.value[index]
            path += f"[{index}]"
        self._document.report(node, path, message)

    def error_in_text(self, key: str, message: str, line: int, column: int) -> None:
        entry = self._entries.get(key)
        if entry is None:
            self.error(key, message)
            return
        position = self._document.position_in(entry[1], line, column)
        if position is None:
            message += f" (at line {line}, column {column} of the text)"
            self._document.report(entry[1], self.field_path(key), message)
        else:
            self._document.report_at(*position, self.field_path(key), message)

    def _value(self, key: str, required: bool) -> Node | None:
        node = self.node(key)
        if node is None and required:
            entry = self._entries.get(key)
            where = self.anchor if entry is None else entry[1]
            self._document.report(where, self.field_path(key), f"missing required field '{key}'")
        return node

    def get_str(self, key: str, *, required: bool = False) -> str | None:
        node = self._value(key, required)
        return None if node is None else self._document.text_of(node, self.field_path(key))

    def get_int(
        self,
        key: str,
        *,
        required: bool = False,
        minimum: int | None = None,
        maximum: int | None = None,
    ) -> int | None:
        node = self._value(key, required)
        if node is None:
            return None
        return self._document.int_of(node, self.field_path(key), minimum, maximum)

    def get_bool(self, key: str, *, required: bool = False) -> bool | None:
        node = self._value(key, required)
        return None if node is None else self._document.bool_of(node, self.field_path(key))

    def get_duration(
        self, key: str, *, required: bool = False, allow_zero: bool = False
    ) -> float | None:
        node = self._value(key, required)
        if node is None:
            return None
        return self._document.duration_of(node, self.field_path(key), allow_zero)

    def get_decimal(
        self,
        key: str,
        *,
        required: bool = False,
        minimum: Decimal | None = None,
        maximum: Decimal | None = None,
        positive: bool = False,
        places: int | None = None,
    ) -> Decimal | None:
        node = self._value(key, required)
        if node is None:
            return None
        return self._document.decimal_of(
            node,
            self.field_path(key),
            minimum=minimum,
            maximum=maximum,
            positive=positive,
            places=places,
        )

    def get_choice(
        self, key: str, choices: Sequence[_Choice], *, required: bool = False
    ) -> _Choice | None:
        text = self.get_str(key, required=required)
        if text is None:
            return None
        for choice in choices:
            if text == choice:
                return choice
        message = f"unknown {key} '{text}' (known: {', '.join(choices)})"
        self.error(key, message + did_you_mean(text, choices))
        return None

    def get_list(
        self,
        key: str,
        convert: Callable[[Node, str], _Item | None],
        *,
        what: str,
        required: bool = False,
        non_empty: bool = False,
    ) -> list[_Item] | None:
        """Each item converted; None if the list or any item is unusable."""
        node = self._value(key, required)
        if node is None:
            return None
        path = self.field_path(key)
        items = self._document.items_of(node, path, what)
        if items is None:
            return None
        if non_empty and not items:
            self._document.report(node, path, f"must list at least one of {what}")
            return None
        values = [convert(item, f"{path}[{index}]") for index, item in enumerate(items)]
        if any(value is None for value in values):
            return None
        return [value for value in values if value is not None]

    def get_str_list(
        self, key: str, *, required: bool = False, non_empty: bool = False
    ) -> list[str] | None:
        return self.get_list(
            key, self._document.text_of, what="names", required=required, non_empty=non_empty
        )


class _PolicyReader(_Map):
    """What a policy type's parse function reads its params through (``ParamReader``)."""

    def __init__(
        self,
        document: _Document,
        node: MappingNode,
        path: str,
        anchor: Node,
        policy_name: str,
        declared_models: Collection[str],
    ) -> None:
        super().__init__(document, node, path, anchor)
        self._policy_name = policy_name
        self._declared_models = declared_models

    @property
    def policy_name(self) -> str:
        return self._policy_name

    @property
    def declared_models(self) -> Collection[str]:
        return self._declared_models


class _Builder:
    """Walks the document section by section; returns None when something is unusable."""

    def __init__(self, document: _Document) -> None:
        self.doc = document
        self.provider_types: dict[str, str | None] = {}
        self.model_names: dict[str, str] = {}  # every app-facing name -> its model

    def build(self, root: Node) -> GatewayConfig | None:
        if not isinstance(root, MappingNode):
            self.doc.wrong_type(root, "", f"a mapping of {', '.join(_TOP_LEVEL)}")
            return None
        top = _Map(self.doc, root, "", root)
        top.check_fields(_TOP_LEVEL, extension_prefix="x-")
        provider_entries = self._section(top, "providers")
        if not provider_entries and not isinstance(
            top.node("providers"), SequenceNode | ScalarNode
        ):
            top.error("providers" if top.has("providers") else None, "no providers declared")
        model_entries = self._section(top, "models")
        policy_entries = self._section(top, "policies")
        app_entries = self._section(top, "applications")

        providers = {n: self._provider(n, k, v) for n, k, v in provider_entries}
        for name, _, _ in model_entries:
            self.model_names[name] = name
        models = {n: self._model(n, k, v) for n, k, v in model_entries}
        declared_policies = [name for name, _, _ in policy_entries]
        policies = {n: self._policy(n, k, v) for n, k, v in policy_entries}
        applications = {n: self._application(n, k, v, declared_policies) for n, k, v in app_entries}

        if self.doc.issues:
            return None
        # Every entry that came out None had its problem reported, so none is left here.
        final_providers = _complete(providers)
        final_models = _complete(models)
        final_policies = _complete(policies)
        final_applications = _complete(applications)
        canonical = canonical_form(
            final_providers, final_models, final_policies, final_applications
        )
        return GatewayConfig(
            providers=final_providers,
            models=final_models,
            policies=final_policies,
            applications=final_applications,
            model_index=MappingProxyType(
                {alias: final_models[model] for alias, model in self.model_names.items()}
            ),
            source=self.doc.filename,
            fingerprint=fingerprint_of(canonical),
        )

    def _section(self, top: _Map, key: str) -> list[tuple[str, Node, Node]]:
        node = top.node(key)
        if node is None:
            return []
        if not isinstance(node, MappingNode):
            self.doc.wrong_type(node, key, f"a mapping of {key} by name")
            return []
        return [(name, k, v) for name, (k, v) in self.doc.entries(node, key).items()]

    def _name(self, node: Node, path: str, name: str, kind: str, pattern: re.Pattern[str]) -> None:
        if len(name) > _MAX_NAME:
            self.doc.report(node, path, f"{kind} name is longer than {_MAX_NAME} characters")
        elif not pattern.fullmatch(name):
            help_text = _MODEL_NAME_HELP if pattern is _MODEL_NAME else _SLUG_HELP
            self.doc.report(node, path, f"invalid {kind} name '{name}': {help_text}")

    # --- providers --------------------------------------------------------------

    def _provider(self, name: str, key: Node, value: Node) -> Provider | None:
        path = _join("providers", name)
        self._name(key, path, name, "provider", _SLUG)
        self.provider_types[name] = None
        fields = _Map.of(
            self.doc,
            value,
            path,
            key,
            _PROVIDER_FIELDS + tuple(o for t in _provider_types().values() for o in t.options),
        )
        if fields is None:
            return None
        types = _provider_types()
        kind = fields.get_choice("type", tuple(types), required=True)
        self.provider_types[name] = kind
        provider_type = types.get(kind) if kind is not None else None
        base_url = self._base_url(fields)

        api_key_env = fields.get_str("api_key_env")
        if api_key_env is not None and not _ENV_VAR.fullmatch(api_key_env):
            fields.error("api_key_env", f"'{api_key_env}' is not an environment variable name")
            api_key_env = None
        api_key_file = fields.get_str("api_key_file")
        if fields.has("api_key_env") and fields.has("api_key_file"):
            fields.error("api_key_file", "set api_key_env or api_key_file, not both")

        # The type's own fields: parsed by its module; another type's are refused.
        options: dict[str, Any] | None = {}
        own = provider_type.options if provider_type is not None else ()
        for option in dict.fromkeys(o for t in types.values() for o in t.options):
            if fields.has(option) and option not in own:
                owners = [t.name for t in types.values() if option in t.options]
                fields.error(option, f"applies only to {' and '.join(owners)} providers")
        if provider_type is not None:
            options = provider_type.parse_options(fields)

        inject = fields.get_bool("inject_stream_usage")
        injectable = sorted(t.name for t in types.values() if t.stream_usage_injectable)
        if provider_type is not None and not provider_type.stream_usage_injectable:
            if inject is not None:
                fields.error(
                    "inject_stream_usage",
                    f"{kind} streams report usage themselves; "
                    f"this applies to {', '.join(injectable)} providers",
                )
            inject = False
        elif inject is None:
            inject = True

        headers = self._headers(fields)
        pass_headers = self._pass_headers(fields)
        timeout = fields.get_duration("timeout") or DEFAULT_TIMEOUT
        connect_timeout = fields.get_duration("connect_timeout") or DEFAULT_CONNECT_TIMEOUT
        retries = self._retries(fields)
        if (
            kind is None
            or base_url is None
            or headers is None
            or retries is None
            or pass_headers is None
            or options is None
        ):
            return None
        return Provider(
            name=name,
            type=kind,
            base_url=base_url,
            api_key_env=api_key_env,
            api_key_file=api_key_file,
            options=MappingProxyType(options),
            headers=headers,
            timeout=timeout,
            connect_timeout=connect_timeout,
            retries=retries,
            inject_stream_usage=inject,
            pass_headers=pass_headers or None,
        )

    def _pass_headers(self, fields: _Map) -> tuple[str, ...] | None:
        """The lower-case names (empty when none are given); None when invalid."""
        names = fields.get_str_list("pass_headers")
        if names is None:
            return None if fields.has("pass_headers") else ()
        result: list[str] = []
        for index, name in enumerate(names):
            lower = name.lower()
            if lower not in SCOPING_HEADERS:
                fields.error(
                    "pass_headers",
                    f"'{name}' is not a header the gateway holds back (those are "
                    f"{', '.join(SCOPING_HEADERS)}); other app headers pass anyway"
                    + did_you_mean(lower, SCOPING_HEADERS),
                    index=index,
                )
                return None
            if lower not in result:
                result.append(lower)
        return tuple(result)

    def _base_url(self, fields: _Map) -> str | None:
        text = fields.get_str("base_url", required=True)
        if text is None:
            return None
        problem = None
        parts = urlsplit(text)
        if parts.scheme not in ("http", "https"):
            problem = "must start with http:// or https://"
        elif any(char.isspace() for char in text):
            problem = "must not contain spaces"
        elif not parts.hostname:
            problem = "has no host"
        elif parts.username is not None or parts.password is not None:
            problem = "must not hold credentials: use api_key_env or api_key_file"
        elif parts.query or parts.fragment:
            problem = "must not have a query or fragment"
        else:
            try:
                _ = parts.port  # raises ValueError for a bad port
            except ValueError:
                problem = "has an invalid port"
        if problem is not None:
            fields.error("base_url", f"'{text}' {problem}")
            return None
        return f"{parts.scheme}://{parts.netloc.lower()}{parts.path.rstrip('/')}"

    def _headers(self, fields: _Map) -> Mapping[str, str] | None:
        node = fields.node("headers")
        if node is None:
            return MappingProxyType({})
        path = fields.field_path("headers")
        if not isinstance(node, MappingNode):
            self.doc.wrong_type(node, path, "a mapping of header name to value")
            return None
        result: dict[str, str] = {}
        ok = True
        for name, (key_node, value_node) in self.doc.entries(node, path).items():
            lower = name.lower()
            header_path = _join(path, name)
            problem = None
            if not _HEADER_NAME.fullmatch(name):
                problem = f"'{name}' is not a valid header name"
            elif lower in _FORBIDDEN_HEADERS:
                problem = f"'{name}' {_FORBIDDEN_HEADERS[lower]}"
            elif lower.startswith("x-envoy-"):
                problem = f"'{name}': x-envoy-* headers are Envoy's own"
            elif lower in result:
                problem = f"'{name}' is set twice (header names ignore case)"
            if problem is not None:
                self.doc.report(key_node, header_path, problem)
                ok = False
                continue
            value = self.doc.text_of(value_node, header_path)
            if value is None:
                ok = False
            elif "\r" in value or "\n" in value:
                self.doc.report(value_node, header_path, "header values must be a single line")
                ok = False
            else:
                result[lower] = value
        return MappingProxyType(result) if ok else None

    def _retries(self, fields: _Map) -> RetryPolicy | None:
        node = fields.node("retries")
        if node is None:
            return RetryPolicy()
        path = fields.field_path("retries")
        retries = _Map.of(self.doc, node, path, fields.key_node("retries"), _RETRY_FIELDS)
        if retries is None:
            return None
        attempts = retries.get_int("attempts", minimum=0, maximum=5)
        attempts = 1 if attempts is None and not retries.has("attempts") else attempts
        on = retries.get_str_list("on")
        unknown = [(i, c) for i, c in enumerate(on or ()) if c not in RETRY_ON_CONDITIONS]
        for index, condition in unknown:
            known = ", ".join(sorted(RETRY_ON_CONDITIONS))
            hint = did_you_mean(condition, RETRY_ON_CONDITIONS)
            retries.error(
                "on", f"unknown retry condition '{condition}' (known: {known}){hint}", index=index
            )
        if unknown:
            on = None
        if on is not None and not on and attempts:
            retries.error("on", "list at least one condition, or set attempts: 0")
        codes = retries.get_list(
            "retriable_status_codes",
            lambda item, item_path: self.doc.int_of(item, item_path, 400, 599),
            what="HTTP status codes",
        )
        on_codes = on is None or "retriable-status-codes" in on
        if retries.has("retriable_status_codes") and not on_codes:
            retries.error(
                "retriable_status_codes",
                "has no effect unless 'on' lists retriable-status-codes",
            )
        if attempts is None or (on is None and retries.has("on")):
            return None
        if codes is None and retries.has("retriable_status_codes"):
            return None
        return RetryPolicy(
            attempts=attempts,
            on=tuple(on) if on is not None else DEFAULT_RETRY_ON,
            retriable_status_codes=tuple(codes) if codes else DEFAULT_RETRIABLE_STATUS_CODES,
        )

    # --- models -----------------------------------------------------------------

    def _model(self, name: str, key: Node, value: Node) -> Model | None:
        path = _join("models", name)
        self._name(key, path, name, "model", _MODEL_NAME)
        fields = _Map.of(self.doc, value, path, key, _MODEL_FIELDS)
        if fields is None:
            return None
        provider = fields.get_str("provider", required=True)
        if provider is not None and provider not in self.provider_types:
            declared = ", ".join(self.provider_types) or "none"
            fields.error(
                "provider",
                f"unknown provider '{provider}' (declared: {declared})"
                + did_you_mean(provider, self.provider_types),
            )
        deployment = self._deployment(fields, name, provider)
        encoding = fields.get_str("encoding")
        if encoding is not None and encoding not in ENCODING_FILES:
            fields.error(
                "encoding",
                f"unknown encoding '{encoding}' (known: {', '.join(ENCODING_FILES)})"
                + did_you_mean(encoding, ENCODING_FILES),
            )
        aliases = fields.get_str_list("aliases") or []
        for index, alias in enumerate(aliases):
            owner = self.model_names.get(alias)
            if alias == name:
                fields.error("aliases", f"'{alias}' is the model's own name", index=index)
            elif owner == alias:
                fields.error("aliases", f"'{alias}' is already a model name", index=index)
            elif owner is not None:
                fields.error(
                    "aliases", f"'{alias}' is already an alias of model '{owner}'", index=index
                )
            elif len(alias) > _MAX_NAME or not _MODEL_NAME.fullmatch(alias):
                fields.error("aliases", f"invalid alias '{alias}': {_MODEL_NAME_HELP}", index=index)
            else:
                self.model_names[alias] = name
        price = self._price(fields)
        weight = fields.get_int("weight", minimum=1, maximum=MAX_WEIGHT)
        attempt_timeout = fields.get_duration("attempt_timeout")
        fallbacks = self._fallbacks(fields, name, provider, deployment or name)
        if not fields.has("fallbacks"):
            for extra in ("weight", "attempt_timeout"):
                if fields.has(extra):
                    fields.error(extra, "has no effect without fallbacks")
        if provider is None or (price is None and fields.has("price")):
            return None
        if fallbacks is None and fields.has("fallbacks"):
            return None
        if (weight is None and fields.has("weight")) or (
            attempt_timeout is None and fields.has("attempt_timeout")
        ):
            return None
        return Model(
            name=name,
            provider=provider,
            deployment=deployment or name,
            encoding=encoding,
            aliases=tuple(aliases),
            price=price,
            fallbacks=fallbacks,
            weight=weight,
            attempt_timeout=attempt_timeout,
        )

    def _deployment(self, fields: _Map, name: str, provider: str | None) -> str | None:
        """``deployment`` (None: the model's name), checked for the provider's type."""
        kind = self.provider_types.get(provider or "")
        deployment = fields.get_str("deployment")
        if kind == "azure_openai":
            if deployment is not None and not _AZURE_DEPLOYMENT.fullmatch(deployment):
                fields.error(
                    "deployment",
                    f"'{deployment}' is not an Azure deployment name "
                    "(letters, digits, '.', '_' and '-')",
                )
            elif deployment is None and not _AZURE_DEPLOYMENT.fullmatch(name):
                fields.error(None, f"'{name}' cannot be an Azure deployment name: set deployment")
        elif deployment is not None and any(char.isspace() for char in deployment):
            fields.error("deployment", f"'{deployment}' must not contain spaces")
        return deployment

    def _fallbacks(
        self, fields: _Map, name: str, provider: str | None, deployment: str
    ) -> tuple[Target, ...] | None:
        """``fallbacks: [{provider, deployment?, weight?, priority?, price?}]``: where
        else the model is served, in the order tried."""
        node = fields.node("fallbacks")
        if node is None:
            return None
        path = fields.field_path("fallbacks")
        items = self.doc.items_of(node, path, "fallback targets")
        if items is None:
            return None
        if not items:
            self.doc.report(node, path, "list at least one fallback target, or leave it out")
            return None
        if len(items) + 1 > MAX_TARGETS:
            self.doc.report(
                node, path, f"at most {MAX_TARGETS - 1} fallbacks (each one is an attempt)"
            )
            return None
        seen = {(provider, deployment)}
        previous = 0  # the primary's priority
        targets: list[Target] = []
        ok = True
        for index, item in enumerate(items):
            item_path = f"{path}[{index}]"
            entry = _Map.of(self.doc, item, item_path, item, _TARGET_FIELDS)
            if entry is None:
                ok = False
                continue
            target_provider = entry.get_str("provider", required=True)
            if target_provider is not None and target_provider not in self.provider_types:
                declared = ", ".join(self.provider_types) or "none"
                entry.error(
                    "provider",
                    f"unknown provider '{target_provider}' (declared: {declared})"
                    + did_you_mean(target_provider, self.provider_types),
                )
                target_provider = None
            target_deployment = self._deployment(entry, name, target_provider) or name
            weight = entry.get_int("weight", minimum=1, maximum=MAX_WEIGHT)
            priority = entry.get_int("priority", minimum=0, maximum=MAX_TARGETS - 1)
            if priority is not None and priority < previous:
                entry.error(
                    "priority",
                    f"{priority} is below the target before it ({previous}): list targets "
                    "in the order they are tried",
                )
                priority = None
            price = self._price(entry)
            if target_provider is not None and (target_provider, target_deployment) in seen:
                entry.error(
                    None,
                    f"provider '{target_provider}' with deployment '{target_deployment}' "
                    "is already a target of this model",
                )
                ok = False
            seen.add((target_provider, target_deployment))
            if (
                target_provider is None
                or (weight is None and entry.has("weight"))
                or (priority is None and entry.has("priority"))
                or (price is None and entry.has("price"))
            ):
                ok = False
                continue
            priority = previous + 1 if priority is None else priority
            previous = priority
            targets.append(Target(target_provider, target_deployment, weight or 1, priority, price))
        return tuple(targets) if ok else None

    def _price(self, fields: _Map) -> Price | None:
        """``price: {input, output, cached_input?, cache_write?}``, USD per million tokens."""
        node = fields.node("price")
        if node is None:
            return None
        path = fields.field_path("price")
        price = _Map.of(self.doc, node, path, fields.key_node("price"), _PRICE_FIELDS)
        if price is None:
            return None
        values = {
            key: price.get_decimal(
                key,
                required=key in ("input", "output"),
                minimum=Decimal(0),
                maximum=_MAX_PRICE,
                places=_PRICE_PLACES,
            )
            for key in _PRICE_FIELDS
        }
        input_price, output_price = values["input"], values["output"]
        if input_price is None or output_price is None:
            return None
        if any(values[key] is None and price.has(key) for key in _PRICE_FIELDS):
            return None
        return Price(
            input=input_price,
            output=output_price,
            cached_input=values["cached_input"],
            cache_write=values["cache_write"],
            source="config",
        )

    # --- policies ---------------------------------------------------------------

    def _policy(self, name: str, key: Node, value: Node) -> Policy | None:
        path = _join("policies", name)
        self._name(key, path, name, "policy", _SLUG)
        if not isinstance(value, MappingNode):
            self.doc.wrong_type(value, path, "a mapping with a type and its fields")
            return None
        reader = _PolicyReader(self.doc, value, path, key, name, tuple(self.model_names))
        types = _policy_types()
        type_name = reader.get_str("type", required=True)
        policy_type = types.get(type_name or "")
        if type_name is not None and policy_type is None:
            reader.error(
                "type",
                f"unknown policy type '{type_name}' (known: {', '.join(types)})"
                + did_you_mean(type_name, types),
            )
        enabled = reader.get_bool("enabled")
        on_error = reader.get_choice("on_error", ON_ERROR_CHOICES) or "allow"
        if policy_type is None:
            return None  # its fields cannot be checked without knowing the type
        reader.check_fields((*COMMON_FIELDS, *policy_type.fields))
        issues_before = len(self.doc.issues)
        params = policy_type.parse(reader)
        if params is None:
            if len(self.doc.issues) == issues_before:  # a parse function must say why
                reader.error(None, f"invalid {policy_type.name} parameters")
            return None
        return Policy(
            name=name,
            type=policy_type.name,
            params=params,
            enabled=True if enabled is None else enabled,
            on_error=on_error,
        )

    # --- applications -----------------------------------------------------------

    def _application(
        self, name: str, key: Node, value: Node, declared_policies: Sequence[str]
    ) -> Application | None:
        path = _join("applications", name)
        self._name(key, path, name, "application", _SLUG)
        fields = _Map.of(self.doc, value, path, key, _APPLICATION_FIELDS)
        if fields is None:
            return None
        org = fields.get_str("org", required=True)
        if org is not None:
            node = fields.node("org")
            assert node is not None
            self._name(node, fields.field_path("org"), org, "org", _SLUG)
        description = fields.get_str("description")
        policies = self._policy_refs(fields, declared_policies, ())
        environments = self._environments(fields, declared_policies, policies or ())
        if org is None or policies is None or environments is None:
            return None
        return Application(
            name=name,
            org=org,
            description=description,
            policies=policies,
            environments=environments,
        )

    def _environments(
        self, fields: _Map, declared_policies: Sequence[str], app_policies: Sequence[str]
    ) -> Mapping[str, Environment] | None:
        result = {DEFAULT_ENVIRONMENT: Environment(DEFAULT_ENVIRONMENT)}
        node = fields.node("environments")
        if node is None:
            return MappingProxyType(result)
        path = fields.field_path("environments")
        if not isinstance(node, MappingNode):
            self.doc.wrong_type(node, path, "a mapping of environment name to its policies")
            return None
        ok = True
        for env_name, (key_node, value_node) in self.doc.entries(node, path).items():
            env_path = _join(path, env_name)
            self._name(key_node, env_path, env_name, "environment", _SLUG)
            if _is_null(value_node):
                result[env_name] = Environment(env_name)
                continue
            env_fields = _Map.of(self.doc, value_node, env_path, key_node, _ENVIRONMENT_FIELDS)
            env_policies = (
                self._policy_refs(env_fields, declared_policies, app_policies)
                if env_fields is not None
                else None
            )
            if env_policies is None:
                ok = False
            else:
                result[env_name] = Environment(env_name, env_policies)
        return MappingProxyType(result) if ok else None

    def _policy_refs(
        self, fields: _Map, declared: Sequence[str], inherited: Sequence[str]
    ) -> tuple[str, ...] | None:
        names = fields.get_str_list("policies")
        if names is None:
            return None if fields.has("policies") else ()
        ok = True
        for index, policy in enumerate(names):
            problem = None
            if policy not in declared:
                problem = (
                    f"unknown policy '{policy}' (declared: {', '.join(declared) or 'none'})"
                    + did_you_mean(policy, declared)
                )
            elif policy in names[:index]:
                problem = f"'{policy}' is listed twice"
            elif policy in inherited:
                problem = f"'{policy}' is already bound to the application"
            if problem is not None:
                fields.error("policies", problem, index=index)
                ok = False
        return tuple(names) if ok else None


def _complete(entries: Mapping[str, _Item | None]) -> Mapping[str, _Item]:
    values = {name: value for name, value in entries.items() if value is not None}
    assert len(values) == len(entries), "an entry failed without reporting why"
    return MappingProxyType(values)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _is_null(node: Node) -> bool:
    return isinstance(node, ScalarNode) and node.tag == _TAG + "null"


def _kind(node: Node) -> str:
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    names = {
        "null": "null",
        "bool": "a boolean",
        "int": "an integer",
        "float": "a number",
        "str": "a string",
        "timestamp": "a date",
    }
    return names.get(node.tag.removeprefix(_TAG), f"a {node.tag} value")

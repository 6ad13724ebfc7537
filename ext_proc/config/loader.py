"""Reads gateway.yaml into a ``GatewayConfig``, or raises ``ConfigError`` with every problem.

We compose the YAML into nodes (``yaml.compose``) and build values ourselves instead of
``yaml.safe_load``, because nodes keep their line and column, so each problem points at
the offending key or value. It also lets us refuse duplicate keys (YAML keeps the last
one silently) and read mapping keys as the text written (YAML 1.1 would turn the key
``on:`` into ``True``); scalars stay ``YamlScalar`` (tag and text as written), so a
string field takes the text written (``api_version: 2024-10-21`` would otherwise be a
date) and a price the decimal written.

The values are then validated by the declared schema (``ext_proc.config.document`` and
the pydantic models of ``ext_proc.config.specs``, the policy and the provider types):
the same checks as the catalog and the admin API, reported here with their positions.

Top-level keys starting with ``x-`` are ignored: a place for YAML anchors to share.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from ext_proc.config.document import build_config
from ext_proc.config.errors import ConfigError, ConfigIssue, path_text
from ext_proc.config.fields import Loc, Where, YamlScalar
from ext_proc.config.model import GatewayConfig

_TAG = "tag:yaml.org,2002:"


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
    data = document.to_python(root, ())
    try:
        config = build_config(data, filename, locator=document)
    except ConfigError as exc:
        raise ConfigError([*document.issues, *exc.issues]) from None
    if document.issues:
        raise ConfigError(document.issues)
    return config


def read_document(text: str, filename: str = "<string>") -> Any:
    """The YAML document as plain values (scalars as ``YamlScalar``), or ConfigError for
    YAML that cannot be read (syntax, duplicate keys)."""
    document = _Document(filename, text.removeprefix("\ufeff"))
    root = document.compose()
    data = document.to_python(root, ()) if root is not None else None
    if document.issues:
        raise ConfigError(document.issues)
    return data


class _Document:
    """The text being loaded and the issues found in it so far."""

    def __init__(self, filename: str, text: str) -> None:
        self.filename = filename
        self.text = text
        self.issues: list[ConfigIssue] = []
        self._seen: set[ConfigIssue] = set()
        self._lines: list[str] | None = None
        # Every path of the document -> (its key node, its value node); a list item has
        # no key node. What ``locate`` reads.
        self._nodes: dict[Loc, tuple[Node | None, Node]] = {}
        self._root: Node | None = None

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

    # --- values -------------------------------------------------------------------

    def to_python(self, node: Node, loc: Loc, _depth: int = 0) -> Any:
        """Plain values: dicts, lists, ``YamlScalar`` (None for null), every path's nodes
        remembered for ``locate``."""
        if not loc:
            self._root = node
        if _depth > 100:
            self.report(node, _path(loc), "nested too deeply")
            return None
        if isinstance(node, MappingNode):
            result: dict[str, Any] = {}
            for key, (key_node, value_node) in self.entries(node, _path(loc)).items():
                self._nodes[(*loc, key)] = (key_node, value_node)
                result[key] = self.to_python(value_node, (*loc, key), _depth + 1)
            return result
        if isinstance(node, SequenceNode):
            items: list[Any] = []
            for index, item in enumerate(node.value):
                self._nodes[(*loc, index)] = (None, item)
                items.append(self.to_python(item, (*loc, index), _depth + 1))
            return items
        if isinstance(node, ScalarNode) and node.tag == _TAG + "null":
            return None
        assert isinstance(node, ScalarNode)
        return YamlScalar.of(node)

    # --- positions (ext_proc.config.document.Locator) -------------------------------

    def locate(self, loc: Loc, where: Where) -> tuple[int, int]:
        node = self._node(loc, where)
        return node.start_mark.line + 1, node.start_mark.column + 1

    def locate_text(self, loc: Loc, line: int, column: int) -> tuple[int, int] | None:
        entry = self._nodes.get(loc)
        return self.position_in(entry[1], line, column) if entry is not None else None

    def _node(self, loc: Loc, where: Where) -> Node:
        entry = self._nodes.get(loc)
        if entry is None or where == "anchor":
            return self._anchor(loc)
        key_node, value_node = entry
        if where == "key" and key_node is not None:
            return key_node
        return value_node

    def _anchor(self, loc: Loc) -> Node:
        """What a problem about the mapping at ``loc`` as a whole points at: the key that
        names it (``azure-eastus:``), else the mapping itself (a list item)."""
        while loc:
            entry = self._nodes.get(loc)
            if entry is not None:
                return entry[0] if entry[0] is not None else entry[1]
            loc = loc[:-1]
        assert self._root is not None
        return self._root

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


def _path(loc: Loc) -> str:
    return path_text(loc)

"""The building blocks of the declared gateway.yaml schema: field types and the base model.

Every gateway.yaml object is a pydantic model made of these types (``ext_proc.config.specs``
for providers, models, applications, environments and organizations; each policy type's
module and each provider type's module for its own fields). The same models validate the
file (``ext_proc.config.loader``), the catalog in Postgres, the admin API's bodies, and
generate the OpenAPI document and ``schema/gateway.schema.json``.

A value comes either from YAML or from JSON:

- from YAML as a ``YamlScalar`` (its tag and the text as written), so a string field takes
  the text written (``api_version: 2024-10-21`` is not a date, ``on:`` is not ``True``)
  and a price is the decimal written, not the double nearest to it;
- from JSON as a plain value (str, int, float, bool), checked as strictly (a string field
  does not take a number).

Each type validates completely in its ``BeforeValidator`` and raises ``SpecError``
problems with the project's messages (``expected an integer, got a string ('sixty')``),
so pydantic's own checks never fire; the ``Field`` constraints are there for the JSON
Schema. A problem can name a position inside its value (``issues``): list items, a
sibling field, a line and column inside a CEL expression.

This module imports nothing else from the package's config, policies or providers: each
of those imports it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from functools import partial
from typing import Annotated, Any, ClassVar, Literal, NoReturn, TypeVar, get_args

from annotated_types import GroupedMetadata
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    model_validator,
)
from pydantic_core import PydanticCustomError
from yaml.constructor import SafeConstructor
from yaml.nodes import ScalarNode

from ext_proc.config.durations import DurationError, parse_duration
from ext_proc.config.errors import did_you_mean

YAML_TAG = "tag:yaml.org,2002:"
_TEXT_KINDS = frozenset({"str", "int", "float", "bool", "timestamp"})
ERROR_TYPE = "gateway"  # the pydantic error type of every problem raised here
MAX_NAME = 128
SLUG = re.compile(r"[a-z0-9][a-z0-9._-]*")
SLUG_HELP = "use lower-case letters, digits, '.', '_' and '-', starting with a letter or digit"
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+-]*")
MODEL_NAME_HELP = (
    "use letters, digits and . _ - : / @ +, starting with a letter or digit "
    "(e.g. meta/llama-3.1:8b)"
)
# A number written as a plain YAML scalar that YAML 1.1 does not resolve to a number
# (`1e-05`, as JSON writes small floats) is still a number here.
_NUMBER = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][-+]?[0-9]+)?")
DURATION_PATTERN = r"^\s*((\d+(\.\d+)?|\.\d+)(ms|s|m|h|d))+\s*$|^\s*(\d+(\.\d+)?|\.\d+)\s*$"

Loc = tuple[str | int, ...]
Where = Literal["value", "key", "anchor", "missing"]
_T = TypeVar("_T")
_Model = TypeVar("_Model", bound="BaseModel")


@dataclass(frozen=True, slots=True)
class YamlScalar:
    """A YAML scalar as written: its resolved tag, its text, its quoting style."""

    tag: str
    value: str
    style: str | None = None

    @classmethod
    def of(cls, node: ScalarNode) -> YamlScalar:
        return cls(node.tag, node.value, node.style)

    @property
    def kind(self) -> str:
        return self.tag.removeprefix(YAML_TAG)


@dataclass(frozen=True, slots=True)
class Problem:
    """One problem, at ``loc`` below the value that raised it.

    ``where`` it is reported in a file: at the ``value`` (or, when absent, the mapping
    holding it), at the ``key`` naming it, at the ``anchor`` of the mapping (the key
    naming it: a problem about the mapping as a whole), or ``missing`` (a required
    field: at its null value if written, else at the mapping's anchor).
    ``text``: a 1-based (line, column) inside the string value at ``loc`` (CEL).
    """

    loc: Loc
    message: str
    where: Where = "value"
    text: tuple[int, int] | None = None


def fail(message: str, *, text: tuple[int, int] | None = None) -> NoReturn:
    """Raise one problem at the value being validated."""
    raise_problems([Problem((), message, text=text)])


def fail_at(field: str | None, message: str) -> NoReturn:
    """Raise one problem from a model-level check: at one of the model's fields, or
    (``field`` None) at the model as a whole."""
    if field is None:
        raise_problems([Problem((), message, "anchor")])
    raise_problems([Problem((field,), message)])


def raise_problems(problems: Sequence[Problem]) -> NoReturn:
    """Raise several problems at once (pydantic carries one error per validator)."""
    raise PydanticCustomError(
        ERROR_TYPE, "{message}", {"message": problems[0].message, "problems": list(problems)}
    )


def problems_of(error: Mapping[str, Any]) -> list[Problem] | None:
    """The problems a ``raise_problems`` error carries; None for pydantic's own errors."""
    if error.get("type") != ERROR_TYPE:
        return None
    ctx = error.get("ctx") or {}
    found = ctx.get("problems")
    if isinstance(found, list):
        return found
    return [Problem((), str(ctx.get("message", error.get("msg", ""))))]


# --- describing what was given -------------------------------------------------------

_YAML_KINDS = {
    "null": "null",
    "bool": "a boolean",
    "int": "an integer",
    "float": "a number",
    "str": "a string",
    "timestamp": "a date",
}


def describe(value: Any) -> str:
    """``a string ('sixty')``, ``a list``, ``null``: what a value is, for messages."""
    if isinstance(value, YamlScalar):
        kind = _YAML_KINDS.get(value.kind, f"a {value.tag} value")
        return kind if kind == "null" else f"{kind} ({value.value!r})"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({'true' if value else 'false'})"
    if isinstance(value, int):
        return f"an integer ({value})"
    if isinstance(value, float):
        return f"a number ({value!r})"
    if isinstance(value, str):
        return f"a string ({value!r})"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    return f"a {type(value).__name__}"


def wrong_type_message(value: Any, expected: str) -> str:
    if isinstance(value, YamlScalar) and value.tag.startswith("!"):
        return f"unsupported YAML tag '{value.tag}'; expected {expected}"
    return f"expected {expected}, got {describe(value)}"


def wrong_type(value: Any, expected: str) -> NoReturn:
    fail(wrong_type_message(value, expected))


# --- scalar readers (used by the types below, and by validators of their own) ----------

_constructor = SafeConstructor()


def read_text(value: Any) -> str:
    """A non-empty string: YAML's text as written (any plain scalar), or a JSON string."""
    if isinstance(value, YamlScalar) and value.kind in _TEXT_KINDS:
        text = value.value
    elif isinstance(value, str):
        text = value
    else:
        wrong_type(value, "a string")
    if text == "":
        fail("must not be empty")
    if "\x00" in text:  # Postgres text cannot hold it, and no name or URL has one
        fail("must not contain NUL (U+0000)")
    return text


def read_int(value: Any, minimum: int | None = None, maximum: int | None = None) -> int:
    if isinstance(value, YamlScalar) and value.kind == "int":
        number = int(_constructor.construct_yaml_int(ScalarNode(value.tag, value.value)))
    elif isinstance(value, int) and not isinstance(value, bool):
        number = value
    else:
        wrong_type(value, "an integer")
    if minimum is not None and maximum is not None and not minimum <= number <= maximum:
        fail(f"must be between {minimum} and {maximum}, not {number}")
    if minimum is not None and number < minimum:
        fail(f"must be at least {minimum}, not {number}")
    if maximum is not None and number > maximum:
        fail(f"must be at most {maximum}, not {number}")
    return number


def read_bool(value: Any) -> bool:
    if isinstance(value, YamlScalar) and value.kind == "bool":
        return bool(_constructor.construct_yaml_bool(ScalarNode(value.tag, value.value)))
    if isinstance(value, bool):
        return value
    wrong_type(value, "true or false")


def read_duration(value: Any, allow_zero: bool = False) -> float:
    given: str | int | float
    if isinstance(value, YamlScalar) and value.kind == "int":
        given = int(_constructor.construct_yaml_int(ScalarNode(value.tag, value.value)))
    elif isinstance(value, YamlScalar) and value.kind == "float":
        given = float(_constructor.construct_yaml_float(ScalarNode(value.tag, value.value)))
    elif isinstance(value, YamlScalar) and value.kind == "str":
        given = value.value
    elif isinstance(value, int | float | str) and not isinstance(value, bool):
        given = value
    else:
        wrong_type(value, "a duration such as 60s")
    try:
        return parse_duration(given, allow_zero=allow_zero)
    except DurationError as exc:
        fail(str(exc))


def read_decimal(
    value: Any,
    *,
    minimum: Decimal | None = None,
    maximum: Decimal | None = None,
    positive: bool = False,
    places: int | None = None,
) -> Decimal:
    """An exact decimal, taken as written (``0.1`` is 1/10, not the double nearest it)."""
    if isinstance(value, YamlScalar):
        numeric = value.kind in ("int", "float")
        plain_number = value.kind == "str" and value.style is None
        if not (numeric or plain_number):
            wrong_type(value, "a number")
        text = value.value.replace("_", "") if numeric else value.value
        if plain_number and not _NUMBER.fullmatch(text):
            wrong_type(value, "a number")
        written = value.value
    elif isinstance(value, int | float) and not isinstance(value, bool):
        # repr is the shortest text that reads back as the same double: what was written
        # for any amount with at most 15 significant digits.
        text = written = repr(value)
    else:
        wrong_type(value, "a number")
    try:
        number = Decimal(text)
    except InvalidOperation:
        number = Decimal("NaN")
    if not number.is_finite():  # .inf, .nan, 0x1f, 1:30: YAML numbers that are no amount
        fail(f"expected a decimal number, got {written!r}")
    if positive and number <= 0:
        fail(f"must be greater than 0, not {written}")
    if minimum is not None and number < minimum:
        fail(f"must be at least {minimum}, not {written}")
    if maximum is not None and number > maximum:
        fail(f"must be at most {maximum}, not {written}")
    if places is not None and -int(number.normalize().as_tuple().exponent) > places:
        fail(f"use at most {places} decimal places, not {written}")
    return number


def read_choice(value: Any, choices: Sequence[str], what: str) -> str:
    text = read_text(value)
    if text in choices:
        return text
    fail(f"unknown {what} '{text}' (known: {', '.join(choices)})" + did_you_mean(text, choices))


def read_list(value: Any, what: str, *, non_empty: bool = False) -> list[Any]:
    if not isinstance(value, list):
        wrong_type(value, f"a list of {what}")
    if non_empty and not value:
        fail(f"must list at least one of {what}")
    return value


def read_mapping(value: Any, expected: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        wrong_type(value, expected)
    return value


def check_name(name: str, kind: str, pattern: re.Pattern[str] = SLUG) -> str | None:
    """Why ``name`` cannot name a ``kind`` (None: it can)."""
    if len(name) > MAX_NAME:
        return f"{kind} name is longer than {MAX_NAME} characters"
    if not pattern.fullmatch(name):
        help_text = MODEL_NAME_HELP if pattern is MODEL_NAME else SLUG_HELP
        return f"invalid {kind} name '{name}': {help_text}"
    return None


# --- the field types --------------------------------------------------------------------


def _with_info(reader: Callable[..., Any]) -> Callable[[Any, ValidationInfo], Any]:
    def validate(value: Any, info: ValidationInfo) -> Any:
        return reader(value, info.field_name or "value")

    return validate


Text = Annotated[str, Field(min_length=1), BeforeValidator(read_text)]
Bool = Annotated[bool, BeforeValidator(read_bool)]


@dataclass(frozen=True, slots=True)
class IntRange(GroupedMetadata):
    """``Annotated[int, IntRange(1)]``: an integer in [minimum, maximum]."""

    minimum: int | None = None
    maximum: int | None = None

    def __iter__(self) -> Iterator[Any]:
        yield Field(ge=self.minimum, le=self.maximum)
        yield BeforeValidator(partial(read_int, minimum=self.minimum, maximum=self.maximum))


@dataclass(frozen=True, slots=True)
class IsDuration(GroupedMetadata):
    """``Annotated[float, IsDuration()]``: seconds, written ``500ms``, ``60s``, ``5m``,
    ``1h``, ``1d``, ``1m30s`` or a number."""

    allow_zero: bool = False

    def __iter__(self) -> Iterator[Any]:
        number: dict[str, Any] = {
            "type": "number",
            "minimum" if self.allow_zero else "exclusiveMinimum": 0,
        }
        yield BeforeValidator(partial(read_duration, allow_zero=self.allow_zero))
        yield WithJsonSchema(
            {
                "anyOf": [{"type": "string", "pattern": DURATION_PATTERN}, number],
                "description": "a duration: 500ms, 60s, 5m, 1h, 1d, 1m30s, or seconds",
            }
        )


@dataclass(frozen=True, slots=True)
class IsAmount(GroupedMetadata):
    """``Annotated[Decimal, IsAmount(...)]``: an exact decimal number as written (money)."""

    minimum: Decimal | None = None
    maximum: Decimal | None = None
    positive: bool = False
    places: int | None = None

    def __iter__(self) -> Iterator[Any]:
        schema: dict[str, Any] = {"type": "number"}
        if self.positive:
            schema["exclusiveMinimum"] = 0
        elif self.minimum is not None:
            schema["minimum"] = _json_number(self.minimum)
        if self.maximum is not None:
            schema["maximum"] = _json_number(self.maximum)
        if self.places is not None:
            schema["description"] = f"at most {self.places} decimal places"
        yield BeforeValidator(
            partial(
                read_decimal,
                minimum=self.minimum,
                maximum=self.maximum,
                positive=self.positive,
                places=self.places,
            )
        )
        yield WithJsonSchema(schema)


@dataclass(frozen=True, slots=True)
class OneOf(GroupedMetadata):
    """``Annotated[str, OneOf(choices)]``: an unknown one is named with the known ones and
    a suggestion."""

    choices: tuple[str, ...]
    what: str | None = None

    def __iter__(self) -> Iterator[Any]:
        choices, what = self.choices, self.what

        def read(value: Any, field_name: str) -> str:
            return read_choice(value, choices, what or field_name)

        yield BeforeValidator(_with_info(read))
        yield WithJsonSchema({"type": "string", "enum": list(choices)})


@dataclass(frozen=True, slots=True)
class NameOf(GroupedMetadata):
    """``Annotated[str, NameOf("org")]``: the name of another object, held to that
    object's naming rule."""

    kind: str
    pattern: re.Pattern[str] = SLUG

    def __iter__(self) -> Iterator[Any]:
        kind, pattern = self.kind, self.pattern

        def read(value: Any) -> str:
            text = read_text(value)
            problem = check_name(text, kind, pattern)
            if problem is not None:
                fail(problem)
            return text

        yield Field(min_length=1, max_length=MAX_NAME, pattern=f"^{pattern.pattern}$")
        yield BeforeValidator(read)


@dataclass(frozen=True, slots=True)
class Items(GroupedMetadata):
    """``Annotated[list[X], Items("names")]``: a list (each item checked, its problems
    at its index)."""

    what: str = "names"
    non_empty: bool = False

    def __iter__(self) -> Iterator[Any]:
        if self.non_empty:
            yield Field(min_length=1)
        yield BeforeValidator(partial(read_list, what=self.what, non_empty=self.non_empty))


def _json_number(value: Decimal) -> int | float:
    return int(value) if value == value.to_integral_value() else float(value)


# --- the base of every object -----------------------------------------------------------


class SpecModel(BaseModel):
    """One gateway.yaml object (or a part of one): its fields are the YAML keys.

    Unknown fields are refused (with a suggestion, see ``ext_proc.config.document``), a
    null value means the field is absent, and a value that is not a mapping is named.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    # What the mapping is called in "expected a mapping of ..." (None: its field names).
    mapping_description: ClassVar[str | None] = None

    @model_validator(mode="before")
    @classmethod
    def _a_mapping(cls, data: Any) -> Any:
        if isinstance(data, BaseModel):
            return data
        if not isinstance(data, dict):
            expected = cls.mapping_description or f"a mapping of {', '.join(cls.field_names())}"
            wrong_type(data, expected)
        return {key: value for key, value in data.items() if value is not None}

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(cls.model_fields)


@dataclass(frozen=True, slots=True)
class SpecContext:
    """What an object's validation may look up about the rest of the config: the declared
    names (declared, not valid: one broken provider must not also fail its models)."""

    entry: str  # the name of the object being validated
    providers: Mapping[str, str | None] = field(default_factory=dict)  # name -> its type
    model_names: Mapping[str, str] = field(default_factory=dict)  # app-facing name -> model
    # (model, index in its aliases) of the declaration that owns each alias.
    alias_owners: Mapping[str, tuple[str, int]] = field(default_factory=dict)
    policies: Sequence[str] = ()


CONTEXT_KEY = "gateway"


def spec_context(info: ValidationInfo) -> SpecContext | None:
    """The validation's context, None when an object is validated on its own (then the
    checks against other objects are skipped)."""
    context = info.context
    if isinstance(context, Mapping):
        found = context.get(CONTEXT_KEY)
        if isinstance(found, SpecContext):
            return found
    return None


# --- pydantic's errors as problems ----------------------------------------------------


def problems_from_error(error: ValidationError, model: type[BaseModel]) -> list[Problem]:
    """Every error of a validation of ``model`` as problems (locations relative to it),
    with the project's wording for pydantic's own (a missing or an unknown field)."""
    found: list[Problem] = []
    for item in error.errors(include_url=False, include_input=False):
        loc = tuple(item["loc"])
        carried = problems_of(item)
        if carried is not None:
            found.extend(Problem(loc + p.loc, p.message, p.where, p.text) for p in carried)
        elif item["type"] == "missing" and loc and isinstance(loc[-1], str):
            found.append(Problem(loc, f"missing required field '{loc[-1]}'", "missing"))
        elif item["type"] == "extra_forbidden" and loc and isinstance(loc[-1], str):
            known = fields_at(model, loc[:-1])
            found.append(Problem(loc, unknown_field_message(loc[-1], known), "key"))
        else:  # not raised by our types: pydantic's own words
            found.append(Problem(loc, str(item["msg"])))
    return found


def unknown_field_message(key: str, known: Sequence[str]) -> str:
    hint = did_you_mean(key, known)
    return f"unknown field '{key}'" + (hint or f" (known: {', '.join(known)})")


def fields_at(model: type[BaseModel], loc: Loc) -> tuple[str, ...]:
    """The field names of the model found at ``loc`` below ``model`` (list indexes and
    mapping keys pass through to the item's model)."""
    current: type[BaseModel] | None = model
    for part in loc:
        if current is None:
            break
        if isinstance(part, str) and part in current.model_fields:
            current = _model_in(current.model_fields[part].annotation)
    return tuple(current.model_fields) if current is not None else ()


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def validate_nested(
    model: type[_Model], value: Any, info: ValidationInfo, **context: Any
) -> _Model:
    """``model`` validated inside another validator (same context plus ``context``);
    its problems are re-raised relative to the value."""
    merged = dict(info.context) if isinstance(info.context, Mapping) else {}
    merged.update(context)
    try:
        return model.model_validate(value, context=merged)
    except ValidationError as exc:
        raise_problems(problems_from_error(exc, model))


def collect(
    problems: list[Problem], loc: Loc, read: Callable[..., _T], *args: Any, **kwargs: Any
) -> _T | None:
    """``read(*args, **kwargs)``, its problems added to ``problems`` at ``loc`` (None then)."""
    try:
        return read(*args, **kwargs)
    except PydanticCustomError as exc:
        carried = problems_of({"type": exc.type, "ctx": exc.context, "msg": exc.message()})
        problems.extend(Problem(loc + p.loc, p.message, p.where, p.text) for p in carried or [])
        return None

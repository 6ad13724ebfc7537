"""What every policy type provides, and what it is given to read its config.

A policy type is one module in this package exporting ``POLICY_TYPE``: its name (the
``type:`` in gateway.yaml), the YAML fields it accepts besides the common ones, a frozen
params dataclass and a parse function. ``ext_proc.policies.POLICY_TYPES`` maps names to
them; adding a type is adding its module and one line there.

The parse function gets a ``ParamReader``: typed getters over the policy's YAML mapping
that report problems with their line and column (the config loader implements it), so a
policy module validates its own fields without knowing about YAML. This module imports
nothing from ``ext_proc.config`` (which imports the policies), so there is no cycle.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Generic, Literal, Protocol, TypeVar

# Whose counter a limit draws from: the application's (default), the API key's or the org's.
Scope = Literal["app", "key", "org"]
SCOPES: tuple[Scope, ...] = ("app", "key", "org")

# Fields every policy has, whatever its type (parsed by the config loader).
COMMON_FIELDS: tuple[str, ...] = ("type", "enabled", "on_error")

_Choice = TypeVar("_Choice", bound=str)


@dataclass(frozen=True, slots=True)
class PolicyParams:
    """Base of each policy type's params dataclass (frozen, built once per config load)."""


class ParamReader(Protocol):
    """Typed access to one policy's YAML mapping.

    Every getter returns ``None`` when the field is absent (or null) or invalid; an
    invalid or missing required field has already been reported with its position, so
    the caller only decides what to build from what it got.
    """

    @property
    def policy_name(self) -> str: ...

    @property
    def declared_models(self) -> Collection[str]:
        """Every app-facing model name in the config: model names and their aliases."""
        ...

    def has(self, key: str) -> bool:
        """The field is present with a non-null value (valid or not)."""
        ...

    def get_int(
        self,
        key: str,
        *,
        required: bool = False,
        minimum: int | None = None,
        maximum: int | None = None,
    ) -> int | None: ...

    def get_bool(self, key: str, *, required: bool = False) -> bool | None: ...

    def get_str(self, key: str, *, required: bool = False) -> str | None:
        """A non-empty string (any YAML scalar, taken as the text written)."""
        ...

    def get_duration(
        self, key: str, *, required: bool = False, allow_zero: bool = False
    ) -> float | None:
        """Seconds, from ``500ms`` / ``60s`` / ``5m`` / ``1h`` / ``1d`` or a bare number."""
        ...

    def get_choice(
        self, key: str, choices: Sequence[_Choice], *, required: bool = False
    ) -> _Choice | None: ...

    def get_str_list(
        self, key: str, *, required: bool = False, non_empty: bool = False
    ) -> list[str] | None:
        """A list of non-empty strings; report item problems with ``error(key, ..., index=i)``."""
        ...

    def error(self, key: str | None, message: str, *, index: int | None = None) -> None:
        """Report a problem at the field's value (its ``index``-th item), or at the policy."""
        ...

    def error_in_text(self, key: str, message: str, line: int, column: int) -> None:
        """Report a problem at a 1-based line/column inside the field's string value,
        located in the YAML file where that can be worked out (else at the value)."""
        ...


_Params = TypeVar("_Params", bound=PolicyParams)


@dataclass(frozen=True, slots=True)
class PolicyType(Generic[_Params]):
    name: str  # the `type:` value in gateway.yaml
    params_type: type[_Params]
    fields: tuple[str, ...]  # YAML fields beyond COMMON_FIELDS
    parse: Callable[[ParamReader], _Params | None]  # None when a required field is unusable

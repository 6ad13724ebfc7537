"""``model_allowlist``: the app-facing model names an application may use.

Entries are model names (or aliases) declared in the config, or fnmatch patterns such
as ``gpt-4o*``. A plain name must be declared, so a typo cannot silently deny a model.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, ValidationInfo

from ext_proc.config.fields import Problem, collect, raise_problems, read_list, read_text
from ext_proc.policies.base import (
    Denial,
    Enforcer,
    PolicyParams,
    PolicySpec,
    PolicyType,
    RequestFacts,
    declared_models,
)

_WILDCARDS = frozenset("*?[")


def is_pattern(entry: str) -> bool:
    return not _WILDCARDS.isdisjoint(entry)


@dataclass(frozen=True, slots=True)
class ModelAllowlistParams(PolicyParams):
    models: tuple[str, ...]
    # The same entries split once at load, so a check is a set lookup plus the patterns.
    names: frozenset[str] = field(default=frozenset(), compare=False, repr=False)
    patterns: tuple[str, ...] = field(default=(), compare=False, repr=False)


def _models(value: Any, info: ValidationInfo) -> list[str]:
    """Declared model names or aliases (a typo cannot silently deny a model), or patterns."""
    items = read_list(value, "names", non_empty=True)
    declared = declared_models(info)
    problems: list[Problem] = []
    result: list[str] = []
    for index, raw in enumerate(items):
        entry = collect(problems, (index,), read_text, raw)
        if entry is None:
            continue
        result.append(entry)
        if declared is not None and not is_pattern(entry) and entry not in declared:
            close = difflib.get_close_matches(entry, list(declared), n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            problems.append(Problem((index,), f"'{entry}' is not a declared model or alias{hint}"))
    if problems:
        raise_problems(problems)
    return result


class ModelAllowlistSpec(PolicySpec):
    """``{type: model_allowlist, models: [gpt-4o-mini, "text-embedding-*"]}``"""

    type: Literal["model_allowlist"]
    models: Annotated[list[str], Field(min_length=1), BeforeValidator(_models)] = Field(
        description="model names or aliases, or fnmatch patterns such as gpt-4o*"
    )

    def params(self, name: str) -> ModelAllowlistParams:
        return ModelAllowlistParams(
            models=tuple(self.models),
            names=frozenset(entry for entry in self.models if not is_pattern(entry)),
            patterns=tuple(entry for entry in self.models if is_pattern(entry)),
        )


class ModelAllowlistEnforcer(Enforcer):
    def __init__(self, name: str, params: ModelAllowlistParams, on_error: str) -> None:
        super().__init__(name, on_error)
        self.params = params

    def allows_model(self, model: str) -> bool:
        if model in self.params.names:
            return True
        return any(fnmatchcase(model, pattern) for pattern in self.params.patterns)

    def check(self, facts: RequestFacts) -> Denial | None:
        # Judged on the model that will serve the request, by any of its names (catalog
        # name or alias), never on the name the app sent: an Azure deployment path may
        # carry an allowed model's name and resolve to another model.
        names = facts.served_names or (facts.catalog_model,)
        if any(self.allows_model(name) for name in names if name):
            return None
        return Denial(
            self.name,
            403,
            "model_not_allowed",
            f"The model `{facts.model}` is not allowed for application {facts.app_id} "
            f"(policy {self.name}).",
        )


POLICY_TYPE = PolicyType(
    name="model_allowlist",
    params_type=ModelAllowlistParams,
    spec=ModelAllowlistSpec,
    enforcer=ModelAllowlistEnforcer,
)

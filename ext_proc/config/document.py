"""A whole gateway document validated into a ``GatewayConfig`` (or every problem in it).

The file loader (YAML, with positions), the catalog in Postgres and the admin API (JSON)
all come here, so a document means the same and gets the same checks and messages
wherever it comes from. What happens here is only the part no single object can do:

- the sections and the names of their entries (``providers.openai``, ...);
- which model validates an entry: the provider type's or the policy type's own (an
  unknown ``type`` is named with the known ones, and the entry's other fields are still
  checked as far as they can be);
- the names every object may refer to (``SpecContext``): the declared ones, so one broken
  provider does not also fail its models; an alias belongs to the first model declaring
  it;
- organizations: declared under ``organizations:`` or named by an application.

Each problem is reported once as a ``ConfigIssue`` naming its path; a ``Locator`` (the
YAML loader's) turns paths into lines and columns.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Protocol, TypeVar

from pydantic import ValidationError

from ext_proc.config.errors import ConfigError, ConfigIssue, did_you_mean, path_text
from ext_proc.config.fields import (
    CONTEXT_KEY,
    MODEL_NAME,
    SLUG,
    Loc,
    Problem,
    SpecContext,
    SpecModel,
    Where,
    check_name,
    collect,
    problems_from_error,
    read_text,
    wrong_type_message,
)
from ext_proc.config.model import (
    Application,
    GatewayConfig,
    Model,
    Organization,
    Policy,
    Provider,
    canonical_form,
    fingerprint_of,
)
from ext_proc.config.specs import (
    ApplicationSpec,
    ModelSpec,
    OrganizationSpec,
    ProviderSpec,
)
from ext_proc.policies.base import COMMON_FIELDS, PolicySpec

_Spec = TypeVar("_Spec")
SECTIONS: tuple[str, ...] = ("providers", "models", "policies", "applications", "organizations")
KIND_OF_SECTION: Mapping[str, str] = MappingProxyType(
    {
        "providers": "provider",
        "models": "model",
        "policies": "policy",
        "applications": "application",
        "organizations": "organization",
    }
)


class Locator(Protocol):
    """Where a path is in the source text (the YAML loader's positions)."""

    def locate(self, loc: Loc, where: Where) -> tuple[int, int]: ...

    def locate_text(self, loc: Loc, line: int, column: int) -> tuple[int, int] | None:
        """Where a (line, column) of the string value at ``loc`` is, when it maps one
        to one into the file."""
        ...


def build_config(
    data: Any,
    source: str,
    *,
    locator: Locator | None = None,
    require_providers: bool = True,
) -> GatewayConfig:
    """The validated config of a document, or ``ConfigError`` with every problem.

    ``require_providers``: a file must declare a provider; the catalog may hold only
    organizations so far (the admin API builds it up object by object).
    """
    checker = _Checker(source, locator)
    config = checker.build(data, require_providers)
    if checker.issues or config is None:
        raise ConfigError(checker.issues)
    return config


def provider_types() -> Mapping[str, Any]:
    # At call time: the provider modules import the config package to declare their specs.
    from ext_proc.routing.providers import PROVIDER_TYPES

    return PROVIDER_TYPES


def policy_types() -> Mapping[str, Any]:
    from ext_proc.policies import POLICY_TYPES

    return POLICY_TYPES


class _Checker:
    def __init__(self, source: str, locator: Locator | None) -> None:
        self.source = source
        self.locator = locator
        self.issues: list[ConfigIssue] = []
        self._seen: set[ConfigIssue] = set()

    # --- reporting ------------------------------------------------------------------

    def report(
        self, loc: Loc, message: str, where: Where = "value", text: tuple[int, int] | None = None
    ) -> None:
        line = column = 0
        if text is not None:
            at = self.locator.locate_text(loc, *text) if self.locator is not None else None
            if at is None:
                message += f" (at line {text[0]}, column {text[1]} of the text)"
            else:
                line, column = at
        if self.locator is not None and not line:
            line, column = self.locator.locate(loc, where)
        issue = ConfigIssue(
            self.source, line, column, path_text(loc), message, loc=loc, text_position=text
        )
        if issue not in self._seen:  # a merged (`<<: *x`) mapping is read more than once
            self._seen.add(issue)
            self.issues.append(issue)

    def report_problems(self, loc: Loc, problems: list[Problem]) -> None:
        for problem in problems:
            self.report(loc + problem.loc, problem.message, problem.where, problem.text)

    def validate(
        self, model: type[SpecModel], raw: Any, loc: Loc, context: SpecContext
    ) -> Any | None:
        try:
            return model.model_validate(raw, context={CONTEXT_KEY: context})
        except ValidationError as exc:
            self.report_problems(loc, problems_from_error(exc, model))
            return None

    # --- the document ---------------------------------------------------------------

    def build(self, data: Any, require_providers: bool) -> GatewayConfig | None:
        if not isinstance(data, dict):
            self.report((), wrong_type_message(data, f"a mapping of {', '.join(SECTIONS)}"))
            return None
        for key in data:
            if key not in SECTIONS and not key.startswith("x-"):
                hint = did_you_mean(key, SECTIONS)
                message = f"unknown field '{key}'" + (hint or f" (known: {', '.join(SECTIONS)})")
                self.report((key,), message, "key")
        sections = {name: self._section(data, name) for name in SECTIONS}
        declared = data.get("providers")
        if require_providers and not sections["providers"] and not isinstance(declared, list):
            if declared is None:
                self.report((), "no providers declared", "anchor")
            elif isinstance(declared, dict):
                self.report(("providers",), "no providers declared")

        for section, entries in sections.items():
            kind = KIND_OF_SECTION[section]
            pattern = MODEL_NAME if section == "models" else SLUG
            for name in entries:
                problem = check_name(name, kind, pattern)
                if problem is not None:
                    self.report((section, name), problem, "key")

        context = self._context(sections)
        providers = {
            name: self._provider(name, raw, context) for name, raw in sections["providers"].items()
        }
        models = {
            name: self._object(ModelSpec, "models", name, raw, context)
            for name, raw in sections["models"].items()
        }
        policies = {
            name: self._policy(name, raw, context) for name, raw in sections["policies"].items()
        }
        applications = {
            name: self._object(ApplicationSpec, "applications", name, raw, context)
            for name, raw in sections["applications"].items()
        }
        organizations = {
            name: self._object(OrganizationSpec, "organizations", name, raw, context)
            for name, raw in sections["organizations"].items()
        }
        if self.issues:
            return None
        # Every entry that failed reported why, so none is None past this point.
        providers_ok = _complete(providers)
        models_ok = _complete(models)
        policies_ok = _complete(policies)
        applications_ok = _complete(applications)
        organizations_ok = _complete(organizations)

        final_providers: dict[str, Provider] = {
            name: spec.to_provider(name) for name, spec in providers_ok.items()
        }
        final_models: dict[str, Model] = {
            name: spec.to_model(name) for name, spec in models_ok.items()
        }
        final_policies: dict[str, Policy] = {
            name: Policy(
                name=name,
                type=spec.type,
                params=spec.params(name),
                enabled=spec.enabled,
                on_error=spec.on_error,  # type: ignore[arg-type]  # OneOf(ON_ERROR_CHOICES)
            )
            for name, spec in policies_ok.items()
        }
        final_apps: dict[str, Application] = {
            name: spec.to_application(name) for name, spec in applications_ok.items()
        }
        final_orgs: dict[str, Organization] = {
            name: spec.to_organization(name) for name, spec in organizations_ok.items()
        }
        for app in final_apps.values():
            final_orgs.setdefault(app.org, Organization(app.org, implied=True))
        canonical = canonical_form(
            final_providers, final_models, final_policies, final_apps, final_orgs
        )
        return GatewayConfig(
            providers=MappingProxyType(final_providers),
            models=MappingProxyType(final_models),
            policies=MappingProxyType(final_policies),
            applications=MappingProxyType(final_apps),
            model_index=MappingProxyType(
                {alias: final_models[model] for alias, model in context.model_names.items()}
            ),
            source=self.source,
            fingerprint=fingerprint_of(canonical),
            organizations=MappingProxyType(final_orgs),
        )

    def _section(self, data: Mapping[str, Any], key: str) -> dict[str, Any]:
        value = data.get(key)
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.report((key,), wrong_type_message(value, f"a mapping of {key} by name"))
            return {}
        return value

    def _context(self, sections: Mapping[str, Mapping[str, Any]]) -> SpecContext:
        """The declared names: what references are checked against."""
        known_types = provider_types()
        types: dict[str, str | None] = {}
        for name, raw in sections["providers"].items():
            kind = _plain_text(raw.get("type")) if isinstance(raw, dict) else None
            types[name] = kind if kind in known_types else None
        model_names = {name: name for name in sections["models"]}
        owners: dict[str, tuple[str, int]] = {}
        for name, raw in sections["models"].items():
            aliases = raw.get("aliases") if isinstance(raw, dict) else None
            if not isinstance(aliases, list):
                continue
            for index, item in enumerate(aliases):
                alias = _plain_text(item)
                if (
                    alias is None
                    or alias == name
                    or alias in model_names
                    or check_name(alias, "alias", MODEL_NAME) is not None
                ):
                    continue
                owners[alias] = (name, index)
                model_names[alias] = name
        return SpecContext(
            entry="",
            providers=types,
            model_names=model_names,
            alias_owners=owners,
            policies=tuple(sections["policies"]),
        )

    def _object(
        self, model: type[SpecModel], section: str, name: str, raw: Any, context: SpecContext
    ) -> Any | None:
        return self.validate(model, raw, (section, name), _for(context, name))

    def _provider(self, name: str, raw: Any, context: SpecContext) -> ProviderSpec | None:
        loc: Loc = ("providers", name)
        types = provider_types()
        own = {field: t.name for t in types.values() for field in t.options}
        if not isinstance(raw, dict):
            fields = (*ProviderSpec.model_fields, *own)
            self.report(loc, wrong_type_message(raw, f"a mapping of {', '.join(fields)}"))
            return None
        kind = self._type(raw, loc, types, "type")
        if kind is None:  # the common fields can still be checked
            data = {k: v for k, v in raw.items() if k not in own and k != "inject_stream_usage"}
            data["type"] = "?"
            self.validate(ProviderSpec, data, loc, _for(context, name))
            return None
        spec_model: type[ProviderSpec] = types[kind].spec
        try:
            return spec_model.model_validate(
                {**raw, "type": kind}, context={CONTEXT_KEY: _for(context, name)}
            )
        except ValidationError as exc:
            for problem in problems_from_error(exc, spec_model):
                field = problem.loc[0] if len(problem.loc) == 1 else None
                if problem.where == "key" and field in own:
                    owners = [t.name for t in types.values() if field in t.options]
                    problem = Problem(
                        problem.loc, f"applies only to {' and '.join(owners)} providers"
                    )
                self.report(loc + problem.loc, problem.message, problem.where, problem.text)
            return None

    def _policy(self, name: str, raw: Any, context: SpecContext) -> PolicySpec | None:
        loc: Loc = ("policies", name)
        if not isinstance(raw, dict):
            self.report(loc, wrong_type_message(raw, "a mapping with a type and its fields"))
            return None
        types = policy_types()
        kind = self._type(raw, loc, types, "policy type")
        if kind is None:  # its fields cannot be checked without knowing the type
            data = {k: v for k, v in raw.items() if k in COMMON_FIELDS}
            data["type"] = "?"
            self.validate(PolicySpec, data, loc, _for(context, name))
            return None
        spec: PolicySpec | None = self.validate(
            types[kind].spec, {**raw, "type": kind}, loc, _for(context, name)
        )
        return spec

    def _type(
        self, raw: Mapping[str, Any], loc: Loc, types: Mapping[str, Any], what: str
    ) -> str | None:
        """The entry's known ``type``, else None (the problem reported)."""
        value = raw.get("type")
        if value is None:
            self.report((*loc, "type"), "missing required field 'type'", "missing")
            return None
        problems: list[Problem] = []
        text = collect(problems, (), read_text, value)
        if text is None:
            self.report_problems((*loc, "type"), problems)
            return None
        if text not in types:
            self.report(
                (*loc, "type"),
                f"unknown {what} '{text}' (known: {', '.join(types)})" + did_you_mean(text, types),
            )
            return None
        return text


def _complete(entries: Mapping[str, _Spec | None]) -> dict[str, _Spec]:
    values = {name: value for name, value in entries.items() if value is not None}
    assert len(values) == len(entries), "an entry failed without reporting why"
    return values


def _for(context: SpecContext, name: str) -> SpecContext:
    return SpecContext(
        entry=name,
        providers=context.providers,
        model_names=context.model_names,
        alias_owners=context.alias_owners,
        policies=context.policies,
    )


def _plain_text(value: Any) -> str | None:
    try:
        return read_text(value)
    except ValueError:
        return None

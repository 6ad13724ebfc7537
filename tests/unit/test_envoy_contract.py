"""The wire contract between the ext_proc server and its Envoy config has one home,
``ext_proc/envoy_contract.py``: no other module spells a metadata namespace, the
``gw_`` details prefix or a gateway header itself, and the rendered config and the
processor agree on each name."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from ext_proc import envoy_contract as contract
from ext_proc.config.loader import load_config
from ext_proc.envoy_config import EnvoyOptions, render_yaml

PACKAGE = Path(contract.__file__).parent
REPO = PACKAGE.parent
# A string that is one of the contract's names (or builds one) when spelled elsewhere.
_SPELLED = re.compile(r"^gw_|x-gateway-")
_FORMATTED = re.compile(r"(DYNAMIC|UPSTREAM)_METADATA\(gw")  # Envoy format operators


def _literals(path: Path) -> list[tuple[int, str]]:
    """String constants of a module, docstrings excluded."""
    tree = ast.parse(path.read_text(), str(path))
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    return [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and id(node) not in docstrings
    ]


def _spellings(path: Path) -> list[str]:
    found = []
    for line, text in sorted(_literals(path)):
        pieces = re.split(r"[\s\"'(),]+", text)
        if _FORMATTED.search(text) or any(_SPELLED.search(piece) for piece in pieces):
            found.append(f"{path.name}:{line}: {text[:60]}")
    return found


def test_no_module_spells_a_contract_name_itself() -> None:
    found = [
        spelling
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.name != "envoy_contract.py"
        for spelling in _spellings(path)
    ]
    assert found == [], "spell these through ext_proc/envoy_contract.py:\n" + "\n".join(found)


def test_the_check_sees_a_name_spelled_by_hand(tmp_path: Path) -> None:
    module = tmp_path / "drift.py"
    module.write_text(
        '"""Docs may say gw_route."""\n'
        'A = "gw_route"\n'
        'B = f"%DYNAMIC_METADATA(gw:f)%"\n'
        "C = 'x-gateway-provider'\n"
        'D = "gateway"\n'
    )
    assert [s.split(": ")[0] for s in _spellings(module)] == [
        "drift.py:2",
        "drift.py:3",
        "drift.py:4",
    ]


def test_lua_placeholders_are_all_known() -> None:
    assert contract.lua('md:get("@ROUTE_NAMESPACE@")') == 'md:get("gw_route")'
    assert contract.lua("{@KEY_HEADERS@}") == '{"authorization", "api-key", "x-api-key"}'
    with pytest.raises(ValueError, match="@NO_SUCH_NAME@"):
        contract.lua("@NO_SUCH_NAME@")


def test_the_rendered_config_uses_the_contract_names() -> None:
    config = load_config(REPO / "examples" / "gateway.yaml")
    text = render_yaml(config, EnvoyOptions.dev())
    assert "@" + "ROUTE" not in text  # every placeholder was filled
    for name in (
        contract.ROUTE_NAMESPACE,
        contract.USAGE_NAMESPACE,
        contract.MODEL_NAMESPACE,
        contract.BODY_NAMESPACE,
        contract.PROVIDER_HEADER,
        contract.RESPONSE_HEADER,
        f"{contract.NAMESPACE}:{contract.FACTS_FIELD}",
        f"{contract.RESPONSE_NAMESPACE}:{contract.RECORDED_FIELD}",
        f"startsWith('{contract.DETAILS_PREFIX}')",
    ):
        assert name in text, name
    assert not re.search(r"@[A-Z][A-Z_]*@", text)

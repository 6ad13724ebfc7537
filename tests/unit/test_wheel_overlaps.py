"""The install step left every wheel that shares files with xds-protos importable
(ext_proc/wheel_overlaps.py says why they clash)."""

from __future__ import annotations

from ext_proc.wheel_overlaps import CHECKS, _imports


def test_each_shadowed_distribution_imports_its_own_files() -> None:
    broken = [name for name, statement in CHECKS.items() if not _imports(statement)]
    assert broken == [], f"run `python -m ext_proc.wheel_overlaps`: {broken} shadowed"


def test_envoy_stubs_still_import_beside_them() -> None:
    assert _imports(
        "from envoy.service.ext_proc.v3 import external_processor_pb2;"
        "from envoy.config.trace.v3 import opentelemetry_pb2;"
        "import cel.expr.syntax_pb2"
    )

"""Repair the files that ``xds-protos`` shares with two other wheels.

The ``xds-protos`` wheel (Envoy's API stubs) carries its own generated modules under
``opentelemetry/proto/`` (an older copy of what ``opentelemetry-proto`` ships) and a
``cel/__init__.py`` (for ``cel/expr/*_pb2``, the CEL spec protos), in the same import
paths as ``opentelemetry-proto`` (the OTLP exporters need its newer files) and
``common-expression-language`` (our CEL engine lives in ``cel/__init__.py``). Whichever
wheel pip unpacks last owns a shared file, so an install in another order, or a later
``pip install --force-reinstall xds-protos``, leaves the server without
``cel.compile`` or the exporters without ``InstrumentationScope``. The other wheels'
files are supersets of what Envoy's stubs import, so the fix is to reinstall them (same
version, no dependencies) when their import fails: ``python -m ext_proc.wheel_overlaps``
(run by the Makefile's install step and the Dockerfile). It changes nothing when the
files are right.
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys

# distribution -> a statement that fails while xds-protos' copy shadows its files
CHECKS = {
    "common-expression-language": "import cel; cel.compile",
    "opentelemetry-proto": (
        "from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope"
    ),
}


def _imports(statement: str) -> bool:
    result = subprocess.run([sys.executable, "-c", statement], capture_output=True, check=False)
    return result.returncode == 0


def main() -> int:
    failed = 0
    for distribution, statement in CHECKS.items():
        try:
            version = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue  # not installed: nothing shadowed
        if _imports(statement):
            continue
        print(f"reinstalling {distribution}=={version}: xds-protos' copy shadows its files")
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--quiet",
                "--force-reinstall",
                "--no-deps",
                f"{distribution}=={version}",
            ],
            check=True,
        )
        if not _imports(statement):
            print(f"{distribution} is still shadowed: {statement!r} fails", file=sys.stderr)
            failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

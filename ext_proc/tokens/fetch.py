"""Install step: make tiktoken's encodings available offline.

tiktoken downloads its BPE files on first use, which must never happen at run time.
The ``litellm`` wheel on PyPI ships ``o200k_base`` and ``cl100k_base`` in tiktoken's
cache format (file name = sha1 of the download URL), so this step downloads that one
wheel (without installing it), extracts the two files into the package's cache folder,
and checks each against the sha256 tiktoken itself expects.

Run by ``make install`` as ``python -m ext_proc.tokens.fetch``.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from ext_proc.tokens.encodings import BUNDLED_CACHE_DIR, ENCODING_FILES

_WHEEL_DIR_IN_ARCHIVE = "litellm/litellm_core_utils/tokenizers/"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def encodings_present(cache_dir: Path = BUNDLED_CACHE_DIR) -> bool:
    return all((cache_dir / f.cache_name).is_file() for f in ENCODING_FILES.values())


def fetch(cache_dir: Path = BUNDLED_CACHE_DIR) -> None:
    cache_dir.mkdir(parents=True, exist_ok=True)
    if not encodings_present(cache_dir):
        with tempfile.TemporaryDirectory(prefix="ext-proc-enc-") as tmp:
            print("fetching tiktoken encodings (litellm wheel, no install) ...", flush=True)
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "download",
                    "--quiet",
                    "--no-deps",
                    "--only-binary=:all:",
                    "--dest",
                    tmp,
                    "litellm",
                ],
                check=True,
            )
            wheels = sorted(Path(tmp).glob("litellm-*.whl"))
            if not wheels:
                raise SystemExit("pip download produced no litellm wheel")
            with zipfile.ZipFile(wheels[-1]) as zf:
                for name, spec in ENCODING_FILES.items():
                    member = _WHEEL_DIR_IN_ARCHIVE + spec.cache_name
                    try:
                        data = zf.read(member)
                    except KeyError:
                        raise SystemExit(f"{wheels[-1].name} has no {member} ({name})") from None
                    (cache_dir / spec.cache_name).write_bytes(data)
    for name, spec in ENCODING_FILES.items():
        digest = _sha256((cache_dir / spec.cache_name).read_bytes())
        if digest != spec.sha256:
            raise SystemExit(f"encoding {name}: sha256 {digest} != expected {spec.sha256}")
    (cache_dir / ".complete").touch()
    print(f"tiktoken encodings ready in {cache_dir}: {', '.join(ENCODING_FILES)}")


if __name__ == "__main__":
    fetch()

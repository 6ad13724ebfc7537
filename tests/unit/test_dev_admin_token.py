"""``ext-proc dev`` (``make run``) without EXT_PROC_ADMIN_TOKEN makes an admin token once
and keeps it, so the console can be signed into at once and the token survives restarts."""

from __future__ import annotations

import stat
from pathlib import Path

from ext_proc.cli import _dev_admin_token


def test_made_once_kept_private_and_reused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    first = _dev_admin_token(data)
    assert first.startswith("gwadm-") and len(first) > 30
    path = data / "dev-admin-token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert _dev_admin_token(data) == first


def test_an_empty_file_gets_a_new_token(tmp_path: Path) -> None:
    (tmp_path / "dev-admin-token").write_text("\n")
    token = _dev_admin_token(tmp_path)
    assert token.startswith("gwadm-")
    assert (tmp_path / "dev-admin-token").read_text().strip() == token

"""``python -m bench --smoke``: the real stack under wrk for a few seconds, as CI runs it.

It uses its own database and Redis key prefix (DATABASE_URL / REDIS_URL's servers, or
embedded ones when unset) and removes them; this test only reads the JSON it writes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(
    shutil.which("wrk") is None and shutil.which("h2load") is None,
    reason="no load generator: neither wrk nor h2load is installed (apt-get install -y wrk)",
)


def test_bench_smoke(tmp_path: Path) -> None:
    out = tmp_path / "smoke.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--json", str(out)],
        cwd=REPO,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, (
        f"bench --smoke failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    )
    doc = json.loads(out.read_text())

    by_target: dict[str, list[dict[str, object]]] = {}
    for result in doc["results"]:
        by_target.setdefault(result["target"], []).append(result)
    assert set(by_target) == {"envoy", "gateway"}
    for target, results in by_target.items():
        assert sorted(r["connections"] for r in results) == [1, 4], target
        for r in results:
            assert r["requests"] > 0, (target, r)
            assert r["errors"]["total"] == 0, (target, r["errors"])

    for r in by_target["gateway"]:
        rows = r["rows"]
        if r["exact_count"]:
            assert rows["written"] == rows["sent"] == r["sent"], rows
        else:  # h2load: requests in flight at the end may or may not have reached it
            assert r["requests"] <= rows["written"] <= rows["sent"], rows
        assert r["cpu_ms_per_request"]["ext_proc"] > 0

    usage = doc["usage_rows"]
    assert usage["written"] is not None and usage["sent_to_gateway"] > 0
    if usage["exact"]:
        assert usage["written"] == usage["sent_to_gateway"], usage
    assert doc["ok"] is True, doc["failures"]

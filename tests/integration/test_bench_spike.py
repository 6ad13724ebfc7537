"""``python -m bench.spike``: a short spike past a small bound, through the real stack.

The numbers belong to the benchmark; this checks the tool measures what it says: offered
load past capacity is partly refused with 503, every answer has its usage row, and the
gateway serves again right after.
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
    shutil.which("wrk") is None or shutil.which("h2load") is None,
    reason="wrk and h2load are needed (make loadgen)",
)


def test_a_short_spike_is_shed_recorded_and_recovered(tmp_path: Path) -> None:
    out = tmp_path / "spike.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.spike",
            *("--rps", "3000", "--seconds", "3", "--clients", "30", "--streams", "100"),
            *("--steady", "1", "--connections", "4", "--json", str(out)),
        ],
        cwd=REPO,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, (
        f"bench.spike failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    )
    doc = json.loads(out.read_text())
    spike = doc["spike"]
    assert spike["offered_rps"] == 3000
    answered = sum(spike["statuses"].values())
    assert answered > 0 and spike["admitted"] > 0
    # Only 200s and early refusals: nothing else (no 500s, no timeouts).
    assert set(spike["statuses"]) <= {"200", "503"}, spike["statuses"]
    if spike["refused_503"]:
        assert spike["a_refusal"] is None or spike["a_refusal"]["retry_after"] == "1"
        assert sum(spike["envoy_overflow"].values()) >= spike["refused_503"]
    assert spike["rows"]["ok"], spike["rows"]
    assert doc["after"]["rps"] > 0 and doc["after"]["errors"]["total"] == 0

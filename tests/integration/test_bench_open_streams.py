"""``python -m bench --open-streams``: a small run (20 streams x 2 s) of the many-open-
streams benchmark, end to end on the real stack.

Like the smoke test, the bench uses its own database and Redis key prefix and removes
them; this test reads the JSON it writes.
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
    shutil.which("wrk") is None, reason="wrk is not installed (apt-get install -y wrk)"
)

STREAMS = 20
SECONDS = 2
INTERVAL_MS = 50


def test_bench_open_streams(tmp_path: Path) -> None:
    out = tmp_path / "open-streams.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--open-streams",
            str(STREAMS),
            "--stream-seconds",
            str(SECONDS),
            "--chunk-interval-ms",
            str(INTERVAL_MS),
            "--ramp-seconds",
            "1",
            "--probe-streams",
            "4",
            "--json",
            str(out),
        ],
        cwd=REPO,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, (
        f"bench --open-streams failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    )
    assert "open streams: 20 x 2 s" in done.stdout  # the printed table
    doc = json.loads(out.read_text())
    assert doc["mode"] == "open-streams"
    report = doc["open_streams"]
    chunks = SECONDS * 1000 // INTERVAL_MS

    assert report["spec"]["streams"] == STREAMS
    assert report["spec"]["chunks_per_stream"] == chunks
    assert report["spec"]["probe_streams"] == 4 and report["spec"]["wrk_streams"] == 16

    streams = report["streams"]
    assert streams["sent"] == STREAMS
    assert streams["completed_ok"] == STREAMS, streams
    assert streams["statuses"] == {"200": STREAMS}, streams
    assert streams["socket_errors_total"] == 0, streams["socket_errors"]
    assert streams["incomplete"] == 0 and streams["body_short"] == 0, streams
    assert streams["body_without_done"] == 0 and streams["resent_after_socket_error"] == 0
    assert report["chunks_delivered"] == report["chunks_expected"] == STREAMS * chunks

    # Every stream left exactly its usage row (counted after the shutdown flush).
    rows = report["rows"]
    assert rows["written"] == rows["sent"] == STREAMS, rows
    assert rows["ok"] is True

    pace = report["pace"]
    expected = (chunks - 1) * INTERVAL_MS / 1000
    assert pace["expected_stream_s"] == pytest.approx(expected)
    durations = pace["stream_duration_s_wrk"]
    assert durations is not None and durations["min"] >= expected - 0.01, durations
    assert pace["stream_duration_s_probes"]["count"] == 4
    gaps = pace["probe_gap_ms"]
    assert gaps["count"] == 4 * (chunks - 1), gaps
    assert {"p50", "p99", "max"} <= set(gaps)
    assert isinstance(pace["kept_pace"], bool)

    for name in ("ext_proc", "envoy", "mock"):
        proc = report["processes"][name]
        assert proc["cpu_s"] >= 0
        assert {"before", "peak", "after"} == set(proc["rss_mib"])
        assert proc["rss_mib"]["peak"] >= proc["rss_mib"]["before"] > 0
        assert "rss_kib_per_open_stream" in proc and "cpu_us_per_chunk" in proc
    assert report["processes"]["ext_proc"]["cpu_s"] > 0
    assert report["clients"]["wrk_cpu_s"] >= 0
    assert report["samples"], "the sampler took no sample"
    assert doc["ok"] is True, doc["failures"]

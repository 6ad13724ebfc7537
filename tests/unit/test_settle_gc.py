"""The garbage collector is settled once the service serves (``app.settle_gc``).

Run in a child interpreter: freezing the collector of the test runner itself would change
every later test's memory behaviour.
"""

from __future__ import annotations

import json
import subprocess
import sys

CHILD = """
import gc, json
from ext_proc.server.app import settle_gc, _GC_YOUNG_THRESHOLD
before = gc.get_freeze_count()
settle_gc()
garbage = []
for _ in range(3):  # a cycle made after settling is still collected
    a = []; a.append(a); garbage.append(id(a)); del a
collected = gc.collect()
print(json.dumps({"before": before, "frozen": gc.get_freeze_count(),
                  "threshold": gc.get_threshold(), "young": _GC_YOUNG_THRESHOLD,
                  "collected": collected}))
"""


def test_start_up_objects_are_frozen_and_later_garbage_still_collected() -> None:
    out = subprocess.run(
        [sys.executable, "-c", CHILD], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result["before"] == 0
    # everything imported by the app (tens of thousands of objects) is out of the scans
    assert result["frozen"] > 10_000
    assert result["threshold"][0] == result["young"] > 700
    assert result["collected"] >= 3  # the three self-referencing lists made afterwards


def test_in_process_hosts_leave_the_collector_alone() -> None:
    from ext_proc.server.app import ServeOptions

    assert ServeOptions(config_path=None).settle_gc is False

"""A spike far past capacity: is the excess refused early, and does the gateway recover?

Run: ``.venv/bin/python -m bench.spike`` (needs h2load: ``apt-get install -y
nghttp2-client``; wrk for the steady phases). Brings up the bench's stack (the full policy
chain, one ext_proc process unless ``--ext-proc-processes``), then:

1. **before**: ``--connections`` (16) closed-loop connections for ``--steady`` seconds;
2. **spike**: ``--rps`` (10,000) requests/s offered for ``--seconds`` (30) by h2load over
   HTTP/2 (``--clients`` connections, each sending ``rps / clients`` requests/s with up to
   ``--streams`` in flight), so the offered rate does not fall when answers slow down,
   as a closed-loop tool's would; every request's status and latency are logged;
3. **after**: the same as before, at once.

It reports the offered and answered rates, admitted (200) vs refused (503) with their
latency percentiles, the refusals' ``retry-after``, other statuses, Envoy's shedding
counters, and usage rows written against requests that reached Envoy (each must have its
row: a refused request is recorded too, status 503). Writes ``bench/results/spike-*.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import loadgen, procstat
from bench.loadgen import REQUEST_BODY
from bench.run import RESULTS_DIR, Bench, StackError, parse_args


@dataclass(frozen=True, slots=True)
class SpikeOptions:
    rps: int
    seconds: float
    clients: int
    streams: int
    steady: float
    connections: int
    processes: int
    json_path: Path | None
    keep_logs: bool


def parse(argv: Sequence[str] | None = None) -> SpikeOptions:
    parser = argparse.ArgumentParser(prog="python -m bench.spike", description=__doc__)
    parser.add_argument("--rps", type=int, default=10_000, help="offered requests/s (10000)")
    parser.add_argument("--seconds", type=float, default=30.0, help="spike length (30)")
    parser.add_argument("--clients", type=int, default=100, help="h2load connections (100)")
    parser.add_argument(
        "--streams", type=int, default=100, help="requests in flight per connection (100)"
    )
    parser.add_argument("--steady", type=float, default=10.0, help="before/after seconds (10)")
    parser.add_argument("--connections", type=int, default=16, help="before/after conns (16)")
    parser.add_argument("--ext-proc-processes", type=int, default=1, dest="processes")
    parser.add_argument("--json", dest="json_path", type=Path)
    parser.add_argument("--keep-logs", action="store_true")
    ns = parser.parse_args(argv)
    if ns.rps < ns.clients:
        parser.error("--rps must be at least --clients (each sends rps/clients per second)")
    return SpikeOptions(
        ns.rps,
        ns.seconds,
        ns.clients,
        ns.streams,
        ns.steady,
        ns.connections,
        ns.processes,
        ns.json_path,
        ns.keep_logs,
    )


def latency_ms(latencies_us: list[int]) -> dict[str, float] | None:
    """``loadgen.percentiles_ms`` of the samples; None when there are none."""
    return loadgen.percentiles_ms(sorted(latencies_us)) if latencies_us else None


def read_log(path: Path) -> tuple[Counter[int], dict[int, list[int]]]:
    """h2load's per-request log: start (us since epoch), status, microseconds to the end
    of the answer. Status -1: no answer (the connection failed or h2load stopped first)."""
    statuses: Counter[int] = Counter()
    latencies: dict[int, list[int]] = {}
    for line in path.read_text().splitlines():
        parts = line.split("\t")
        if len(parts) < 3:
            continue
        status, elapsed = int(parts[1]), int(parts[2])
        statuses[status] += 1
        latencies.setdefault(status, []).append(elapsed)
    return statuses, latencies


def _h2load_summary(text: str) -> dict[str, int]:
    """``requests: N total, N started, N done, N succeeded, N failed, N errored, ...``."""
    for line in text.splitlines():
        if line.startswith("requests:"):
            fields = [part.strip().split(" ", 1) for part in line[9:].split(",")]
            return {name.strip(): int(number) for number, name in fields if number.isdigit()}
    return {}


def _envoy_counters(admin_port: int) -> dict[str, int]:
    """Envoy's shedding and request counters (the ext_proc cluster's circuit breaker)."""
    url = f"http://127.0.0.1:{admin_port}/stats?filter=" + (
        r"cluster\.ext_proc\.upstream_rq_(active|pending)_overflow"
    )
    with urllib.request.urlopen(url, timeout=5) as response:
        out: dict[str, int] = {}
        for line in response.read().decode().splitlines():
            name, _, value = line.partition(": ")
            if value.strip().isdigit():
                out[name] = int(value)
        return out


def spike(bench: Bench, options: SpikeOptions, work: Path) -> dict[str, Any]:
    assert bench.stack is not None and bench.backends is not None and bench.api_key
    url = f"{bench.stack.listener_url}/v1/chat/completions"
    log = work / "h2load.log"
    per_client = max(1, options.rps // options.clients)
    argv = [
        "h2load",
        "-c",
        str(options.clients),
        "-m",
        str(options.streams),
        "--rps",
        str(per_client),
        "-D",
        f"{options.seconds:g}",
        "-t",
        "1",
        "-d",
        str(REQUEST_BODY),
        "-H",
        f"authorization: Bearer {bench.api_key}",
        "-H",
        "content-type: application/json",
        "--log-file",
        str(log),
        url,
    ]
    groups = bench._groups()
    counters_before = _envoy_counters(bench.stack.options.envoy_admin_port)
    rows_before = bench.backends.database.count_rows()
    cpu_before = {g: procstat.sample_group(p) for g, p in groups.items()}
    bench.say(
        f"spike: {per_client * options.clients:,} requests/s offered for {options.seconds:g}s "
        f"({options.clients} HTTP/2 connections x {per_client}/s, up to {options.streams} "
        "in flight each) ..."
    )
    probe = _RefusalProbe(url, bench.api_key, wait=2.0, give_up=options.seconds - 4)
    probe.start()
    started = time.monotonic()
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=options.seconds + 120, check=False
    )
    wall = time.monotonic() - started
    if done.returncode != 0:
        raise loadgen.LoadGenError(f"h2load failed ({done.returncode}): {done.stderr[-500:]}")
    cpu_after = {g: procstat.sample_group(p) for g, p in groups.items()}
    probe.join(timeout=35)
    summary = _h2load_summary(done.stdout)
    statuses, latencies = read_log(log)
    # Each answer has its row; so do the probe's requests (sent to the same gateway).
    reached = sum(n for status, n in statuses.items() if status > 0) + probe.sent
    rows = bench._await_rows(rows_before + reached, timeout=60) - rows_before
    counters_after = _envoy_counters(bench.stack.options.envoy_admin_port)
    shed = {
        name: counters_after.get(name, 0) - counters_before.get(name, 0)
        for name in counters_after
        if "overflow" in name
    }
    seconds = options.seconds
    return {
        "offered_rps": per_client * options.clients,
        "seconds": seconds,
        "wall_seconds": round(wall, 1),
        "h2load": summary,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "answered_rps": round(reached / seconds, 1),
        "admitted": statuses.get(200, 0),
        "admitted_rps": round(statuses.get(200, 0) / seconds, 1),
        "refused_503": statuses.get(503, 0),
        "other": {str(k): v for k, v in statuses.items() if k not in (200, 503)},
        "latency_ms": {
            "admitted": latency_ms(latencies.get(200, [])),
            "refused": latency_ms(latencies.get(503, [])),
        },
        "a_refusal": probe.seen,
        "envoy_overflow": shed,
        "cpu_seconds": {
            g: round(cpu_after[g].cpu_seconds - cpu_before[g].cpu_seconds, 2) for g in cpu_before
        },
        # At least one row per answer, at most one per request started (a request still
        # in flight when h2load stopped is recorded too, as cancelled: 499).
        "rows": {
            "written": rows,
            "answers": reached,
            "started": summary.get("started", reached) + probe.sent,
            "ok": reached <= rows <= summary.get("started", reached) + probe.sent,
        },
    }


class _RefusalProbe(threading.Thread):
    """During the spike, plain requests of its own until one is refused: what a refused
    app sees (status, retry-after, the error's type) — h2load's log has statuses only."""

    def __init__(self, url: str, key: str, wait: float, give_up: float) -> None:
        super().__init__(name="refusal-probe", daemon=True)
        self._url, self._key, self._wait, self._give_up = url, key, wait, give_up
        self.seen: dict[str, Any] | None = None
        self.sent = 0

    def run(self) -> None:
        time.sleep(self._wait)
        deadline = time.monotonic() + self._give_up
        body = REQUEST_BODY.read_bytes()
        while self.seen is None and time.monotonic() < deadline:
            request = urllib.request.Request(
                self._url,
                data=body,
                headers={
                    "authorization": f"Bearer {self._key}",
                    "content-type": "application/json",
                },
            )
            self.sent += 1
            try:
                with urllib.request.urlopen(request, timeout=30) as response:
                    response.read()
            except urllib.error.HTTPError as refused:
                if refused.code == 503:
                    payload = json.loads(refused.read() or b"{}")
                    self.seen = {
                        "status": 503,
                        "retry_after": refused.headers.get("retry-after"),
                        "error_type": (payload.get("error") or {}).get("type"),
                    }
            except OSError:
                continue


def steady(bench: Bench, label: str) -> dict[str, Any]:
    target = bench.targets()["gateway"]
    bench.say(f"{label}: {bench.options.connections[0]} connections, {bench.options.duration:g}s")
    result = bench.measure(target, bench.options.connections[0])
    return {
        "rps": result["rps"],
        "latency_ms": result.get("latency_ms"),
        "errors": result.get("errors"),
        "rows_ok": (result.get("rows") or {}).get("ok"),
        "cpu_ms_per_request": result["cpu_ms_per_request"],
    }


def main(argv: Sequence[str] | None = None) -> int:
    options = parse(argv)
    if shutil.which("h2load") is None:
        print("error: h2load not found: apt-get install -y nghttp2-client", file=sys.stderr)
        return 2
    tool = loadgen.available_tool()
    if tool is None:
        print("error: no load generator for the steady phases: install wrk", file=sys.stderr)
        return 2
    bench_options = parse_args(
        [
            "--targets",
            "gateway",
            "--connections",
            str(options.connections),
            "--duration",
            f"{options.steady:g}",
            "--ext-proc-processes",
            str(options.processes),
        ]
        + (["--keep-logs"] if options.keep_logs else [])
    )
    started = dt.datetime.now(dt.UTC)
    bench = Bench(bench_options, tool)
    work = Path(tempfile.mkdtemp(prefix="spike-"))
    failed = True
    try:
        try:
            bench.setup()
            bench.check_targets()
            bench.warm_up()
            before = steady(bench, "before")
            during = spike(bench, options, work)
            after = steady(bench, "after")
        except (StackError, loadgen.LoadGenError, RuntimeError, OSError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        doc = {
            "started": started.isoformat(),
            "options": {k: str(v) for k, v in dataclasses.asdict(options).items()},
            "before": before,
            "spike": during,
            "after": after,
        }
        print_summary(doc)
        path = options.json_path or RESULTS_DIR / f"spike-{started:%Y%m%dT%H%M%SZ}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
        bench.say(f"JSON: {path}")
        failed = not during["rows"]["ok"]
        return 1 if failed else 0
    finally:
        bench.cleanup(failed)
        shutil.rmtree(work, ignore_errors=True)


def print_summary(doc: dict[str, Any]) -> None:
    before, during, after = doc["before"], doc["spike"], doc["after"]
    admitted = during["latency_ms"]["admitted"] or {}
    refused = during["latency_ms"]["refused"] or {}
    print()
    print(f"before: {before['rps']:,.0f} rps at {doc['options']['connections']} connections")
    print(
        f"spike:  {during['offered_rps']:,} rps offered for {during['seconds']:g}s; "
        f"{during['answered_rps']:,.0f} answers/s; admitted {during['admitted']:,} "
        f"({during['admitted_rps']:,.0f}/s), refused 503 {during['refused_503']:,}, "
        f"other {during['other'] or 'none'}"
    )
    print(
        f"        admitted latency p50 {admitted.get('p50')} / p90 {admitted.get('p90')} / "
        f"p99 {admitted.get('p99')} / max {admitted.get('max')} ms; refused p50 "
        f"{refused.get('p50')} / p99 {refused.get('p99')} ms"
    )
    print(f"        Envoy shed (circuit breaker overflow): {during['envoy_overflow']}")
    print(f"        a refused request saw: {during['a_refusal']}")
    print(
        f"        usage rows {during['rows']['written']:,} for {during['rows']['answers']:,} "
        f"answers ({'ok' if during['rows']['ok'] else 'MISSING ROWS'}); CPU s "
        f"{during['cpu_seconds']}"
    )
    print(f"after:  {after['rps']:,.0f} rps at once, errors {after['errors']}")


if __name__ == "__main__":
    sys.exit(main())

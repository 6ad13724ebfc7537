"""``python -m bench``: the real stack under a real load generator, compared in one run.

Brings up Postgres/Redis (a database and key prefix of its own), the mock upstream,
``ext-proc serve`` with the full policy chain of ``bench/gateway.yaml`` and Envoy, plus
LiteLLM as the peer, then drives each target with wrk at fixed connection counts,
interleaved (for each connection count: Envoy alone, gateway, gateway streaming,
LiteLLM), so every ratio compares numbers measured minutes apart on the same machine.

Targets: ``envoy`` (the same Envoy and mock, ``/__direct/`` skips ext_proc), ``gateway``
(non-streaming), ``stream`` (50 chunks sent at once: the mock answers immediately and
Envoy coalesces them into one or two ext_proc messages), ``stream-spaced`` (the same 50
chunks 2 ms apart, so each reaches ext_proc as its own message like a real model's
tokens; run once, at 16 connections: it is what the per-chunk CPU goal is judged on) and
``litellm``. Every target gets the same request (``request.json``) and the same answer
(50 completion tokens).

Per target and connection count: requests/s, p50/p99/max latency, errors (status > 399
and socket errors), CPU seconds per request of the ext_proc process(es), Envoy, the mock
and LiteLLM's process tree (``/proc/<pid>/stat`` utime+stime, delta from just before the
load to after its usage rows are written, over the responses), RSS at start and end, and
for the gateway the usage rows written against the requests sent.

Modes: the default matrix; ``--smoke`` (CI: 1 and 4 connections, 1 s each, Envoy alone
and the gateway, fails on any error or row mismatch); ``--soak SECONDS`` (the gateway at a
fixed rate, ext_proc RSS sampled every 10 s, fails when rows written != requests sent);
``--open-streams N`` (N long streams held at once: ``bench/open_streams.py``).
Exit codes: 0 fine, 1 errors / row mismatch / soak failure, 2 could not run.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from bench import loadgen, procstat, report
from bench import open_streams as open_streams_mode
from bench.litellm_peer import NO_DATABASE_NOTE, LiteLLMPeer, PeerUnavailable
from bench.loadgen import LoadResult, LoadSpec
from bench.resources import Backends
from ext_proc.dev import Stack, StackError, StackOptions, free_port

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
GATEWAY_TEMPLATE = BENCH_DIR / "gateway.yaml"
RESULTS_DIR = BENCH_DIR / "results"
TARGETS = ("envoy", "gateway", "stream", "stream-spaced", "litellm")
STREAM_CHUNKS = 50
COMPLETION_TOKENS = 50  # >= STREAM_CHUNKS: the mock streams min(chunks, tokens) chunks
MIB = 1024 * 1024

# CPU per request is reported for the processes that serve a target; the others' CPU
# during the run is kept in cpu_seconds (ext_proc during Envoy alone should be ~0).
_SERVING = {
    "envoy": ("envoy", "mock", "ext_proc"),
    "gateway": ("ext_proc", "envoy", "mock"),
    "stream": ("ext_proc", "envoy", "mock"),
    "stream-spaced": ("ext_proc", "envoy", "mock"),
    "litellm": ("litellm", "mock"),
}


@dataclass
class Options:
    connections: list[int] = field(default_factory=lambda: [1, 4, 16, 64])
    duration: float = 10.0
    targets: list[str] = field(default_factory=lambda: list(TARGETS))
    smoke: bool = False
    soak: float | None = None
    soak_rate: float = 300.0
    soak_connections: int = 8
    ext_proc_processes: int = 1
    json_path: Path | None = None
    chunk_delay_ms: int = 2
    wrk_threads: int = 1
    warmup: float = 2.0
    keep_logs: bool = False
    load_generator: str | None = None  # None: wrk if installed, else h2load
    open_streams: int | None = None  # N streams held at once (bench/open_streams.py)
    stream_seconds: float = 30.0
    chunk_interval_ms: int = 50
    ramp_seconds: float | None = None
    probe_streams: int | None = None

    def open_streams_spec(self) -> open_streams_mode.OpenStreamsSpec | None:
        if self.open_streams is None:
            return None
        return open_streams_mode.OpenStreamsSpec(
            streams=self.open_streams,
            stream_seconds=self.stream_seconds,
            chunk_interval_ms=self.chunk_interval_ms,
            ramp_seconds=self.ramp_seconds,
            probe_streams=self.probe_streams,
            wrk_threads=self.wrk_threads,
        )


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 1,4,16: {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"connection counts must be >= 1: {text!r}")
    return values


def _targets(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in values if v not in TARGETS]
    if unknown or not values:
        raise argparse.ArgumentTypeError(
            f"unknown target(s) {', '.join(unknown) or '(none)'}; choose from {','.join(TARGETS)}"
        )
    return [t for t in TARGETS if t in values]  # fixed order: the interleaving


def parse_args(argv: Sequence[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark the gateway against Envoy alone and LiteLLM on the same mock.",
    )
    parser.add_argument(
        "--connections",
        type=_int_list,
        default=[1, 4, 16, 64],
        help="connection counts (default 1,4,16,64)",
    )
    parser.add_argument(
        "--duration",
        type=float,
        default=10.0,
        help="seconds of load per target and connection count (default 10)",
    )
    parser.add_argument(
        "--targets",
        type=_targets,
        default=list(TARGETS),
        help="any of envoy,gateway,stream,stream-spaced,litellm (default all; "
        "stream-spaced runs at 16 connections only, or the most given)",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="CI check: 1 and 4 connections, 1 s each, envoy+gateway; "
        "fails on any error or usage-row mismatch",
    )
    parser.add_argument(
        "--soak",
        type=float,
        metavar="SECONDS",
        help="run the gateway this long at a fixed rate; sample ext_proc RSS "
        "every 10 s; fail when usage rows != requests sent",
    )
    parser.add_argument(
        "--soak-rate", type=float, default=300.0, help="requests/s during --soak (default 300)"
    )
    parser.add_argument(
        "--soak-connections", type=int, default=8, help="connections during --soak (default 8)"
    )
    parser.add_argument(
        "--ext-proc-processes",
        type=int,
        default=1,
        metavar="N",
        help="ext_proc processes behind Envoy, each its own endpoint (default 1)",
    )
    parser.add_argument(
        "--json",
        dest="json_path",
        type=Path,
        help="write the JSON here (default bench/results/<timestamp>.json)",
    )
    parser.add_argument(
        "--chunk-delay-ms",
        type=int,
        default=2,
        help="stream-spaced: the mock's pause between the 50 chunks (default 2 ms: enough "
        "for each to reach ext_proc as its own message, like a real model's tokens)",
    )
    parser.add_argument(
        "--wrk-threads",
        type=int,
        default=1,
        help="wrk threads (default 1: leave the cores to the system under test)",
    )
    parser.add_argument(
        "--warmup",
        type=float,
        default=2.0,
        help="seconds of unrecorded load per target before measuring (default 2)",
    )
    parser.add_argument(
        "--load-generator",
        choices=("wrk", "h2load"),
        help="force one (default: wrk if installed, else h2load)",
    )
    parser.add_argument(
        "--open-streams",
        type=int,
        metavar="N",
        nargs="?",
        const=2000,
        help="hold N streaming requests open at once (default 2000), each "
        "--stream-seconds long with a chunk every --chunk-interval-ms; reports errors, pace, "
        "CPU and RSS per open stream of ext_proc and Envoy, usage rows (bench/open_streams.py)",
    )
    parser.add_argument(
        "--stream-seconds",
        type=float,
        default=30.0,
        help="--open-streams: length of each stream (default 30)",
    )
    parser.add_argument(
        "--chunk-interval-ms",
        type=int,
        default=50,
        help="--open-streams: the mock's schedule between chunks (default 50)",
    )
    parser.add_argument(
        "--ramp-seconds",
        type=float,
        help="--open-streams: spread the first requests over this long (default N/200 s, "
        "at least 2: the request side holds an ext_proc stream only briefly)",
    )
    parser.add_argument(
        "--probe-streams",
        type=int,
        help="--open-streams: streams whose inter-chunk gaps are timed in Python (default "
        "N/20, at most 50); wrk holds the rest",
    )
    parser.add_argument(
        "--keep-logs",
        action="store_true",
        help="keep the run's folder (process logs, configs) afterwards",
    )
    ns = parser.parse_args(argv)
    options = Options(
        connections=ns.connections,
        duration=ns.duration,
        targets=ns.targets,
        smoke=ns.smoke,
        soak=ns.soak,
        soak_rate=ns.soak_rate,
        soak_connections=ns.soak_connections,
        ext_proc_processes=ns.ext_proc_processes,
        json_path=ns.json_path,
        chunk_delay_ms=ns.chunk_delay_ms,
        wrk_threads=ns.wrk_threads,
        warmup=ns.warmup,
        keep_logs=ns.keep_logs,
        load_generator=ns.load_generator,
        open_streams=ns.open_streams,
        stream_seconds=ns.stream_seconds,
        chunk_interval_ms=ns.chunk_interval_ms,
        ramp_seconds=ns.ramp_seconds,
        probe_streams=ns.probe_streams,
    )
    if options.smoke:
        options.connections = [1, 4]
        options.duration = 1.0
        options.targets = ["envoy", "gateway"]
        options.warmup = 1.0
    if options.soak is not None:
        if options.soak < 10:
            parser.error("--soak takes at least 10 seconds")
        options.targets = ["gateway"]
    if options.open_streams is not None:
        if options.open_streams < 1:
            parser.error("--open-streams takes at least 1 stream")
        if options.stream_seconds <= 0 or options.chunk_interval_ms < 1:
            parser.error("--stream-seconds and --chunk-interval-ms must be positive")
        if options.soak is not None or options.smoke:
            parser.error("--open-streams runs alone (not with --soak or --smoke)")
        options.targets = ["gateway"]  # one checked request before the streams
        options.warmup = 0.0
    if options.duration < 1:
        parser.error("--duration must be at least 1 second")
    if options.ext_proc_processes < 1:
        parser.error("--ext-proc-processes must be at least 1")
    return options


# --------------------------------------------------------------------- helpers


def _say(message: str) -> None:
    print(message, flush=True)


def _loadavg() -> list[float]:
    with contextlib.suppress(OSError):
        return [round(v, 2) for v in os.getloadavg()]
    return []


def _git() -> dict[str, Any]:
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(
                ["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {
        "commit": git("rev-parse", "HEAD"),
        "dirty": bool(status) if status is not None else None,
    }


def _scrape_phases(metrics_ports: Sequence[int]) -> dict[str, tuple[float, float]]:
    """``ext_proc_phase_duration_seconds`` count and sum per phase, over the processes."""
    phases: dict[str, tuple[float, float]] = {}
    for port in metrics_ports:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
                text = resp.read().decode()
        except (OSError, urllib.error.URLError):
            continue
        for line in text.splitlines():
            if not line.startswith("ext_proc_phase_duration_seconds_"):
                continue
            name, _, value = line.rpartition(" ")
            kind = name.split("{", 1)[0].rsplit("_", 1)[-1]
            if kind not in ("count", "sum") or 'phase="' not in name:
                continue
            phase = name.split('phase="', 1)[1].split('"', 1)[0]
            count, total = phases.get(phase, (0.0, 0.0))
            if kind == "count":
                count += float(value)
            else:
                total += float(value)
            phases[phase] = (count, total)
    return phases


def _post(url: str, key: str | None) -> tuple[int, dict[str, str], bytes]:
    """POST the benchmark's body once: status, lower-cased headers, body."""
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(
        url, data=(BENCH_DIR / "request.json").read_bytes(), headers=headers
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            got = {k.lower(): v for k, v in response.headers.items()}
            return int(response.status), got, response.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), {k.lower(): v for k, v in exc.headers.items()}, exc.read()


class _Terminated(Exception):
    pass


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise _Terminated()


# ----------------------------------------------------------------------- bench


@dataclass(frozen=True, slots=True)
class Target:
    name: str
    url: str
    stream: bool
    key: str | None
    writes_rows: bool
    chunk_delay_ms: int = 0


class Bench:
    def __init__(self, options: Options, tool: str, say: Callable[[str], None] = _say) -> None:
        self.options = options
        self.tool = tool
        self.say = say
        self.run_id = uuid.uuid4().hex[:10]
        self.tmp = Path(tempfile.mkdtemp(prefix=f"bench-{self.run_id}-"))
        self.backends: Backends | None = None
        self.stack: Stack | None = None
        self.peer: LiteLLMPeer | None = None
        self.api_key: str | None = None
        self.notes: list[str] = []
        self.results: list[dict[str, Any]] = []
        self.rows_sent = 0  # every request sent to a gateway route (exactly, with wrk)
        self.rows_exact = True
        self.rows_final: int | None = None
        self.soak: dict[str, Any] | None = None
        self.open_streams: dict[str, Any] | None = None
        self.fd_limit: dict[str, int] | None = None
        self.litellm: dict[str, Any] = {"status": "not requested"}
        self.failures: list[str] = []

    # ------------------------------------------------------------------ setup

    def _stack_options(self, config_path: Path, mock_port: int) -> StackOptions:
        assert self.backends is not None
        # The Stack migrates, applies the config (`ext-proc apply`) and makes the key for
        # app `bench` (what `ext-proc keys create --app bench` does) before it starts.
        return StackOptions(
            config_path=config_path,
            data_dir=self.tmp / "data",
            listener_port=free_port(),
            envoy_admin_port=free_port(),
            grpc_port=free_port(),
            metrics_port=free_port(),
            admin_port=free_port(),
            mock_port=mock_port,
            start_mock=True,
            database_url=self.backends.database.url,
            redis_url=self.backends.redis_url,
            redis_prefix=self.backends.redis_prefix,
            log_level="warning",
            quiet=True,
            envoy_direct_provider="mock",
            key_app="bench",
            ext_proc_processes=self.options.ext_proc_processes,
        )

    def setup(self) -> None:
        say = self.say
        say(f"run {self.run_id}: folder {self.tmp}")
        self.backends = Backends.start(self.run_id, self.tmp, say)
        redis_kind = "shared server" if self.backends.redis_shared else "embedded"
        say(
            f"using {self.backends.database.describe()}, Redis prefix "
            f"{self.backends.redis_prefix!r} ({redis_kind})"
        )
        mock_port = free_port()
        config_path = self.tmp / "gateway.yaml"
        gateway_yaml = GATEWAY_TEMPLATE.read_text().replace("{mock_port}", str(mock_port))
        spec = self.options.open_streams_spec()
        if spec is not None:
            # Streams longer than the provider's 30 s route timeout would be cut by Envoy.
            gateway_yaml = open_streams_mode.with_provider_timeout(
                gateway_yaml, spec.provider_timeout_seconds
            )
            # Envoy holds two sockets per stream, the mock and wrk one: children inherit.
            needed = open_streams_mode.fds_needed(spec.streams)
            self.fd_limit = open_streams_mode.raise_fd_limit(needed)
            self.notes.append(
                f"provider timeout {spec.provider_timeout_seconds}s; open files limit "
                f"{self.fd_limit['soft']} (was {self.fd_limit['soft_before']})"
            )
        config_path.write_text(gateway_yaml)
        options = self._stack_options(config_path, mock_port)
        say("starting the stack (mock upstream, ext-proc serve, Envoy) ...")
        started = time.monotonic()
        self.stack = Stack(options)
        self.stack.start()
        self.api_key = self.stack.api_key
        self.notes.append("config applied; key created for app `bench`")
        say(f"stack up in {time.monotonic() - started:.1f}s: {self.stack.listener_url}")
        if "litellm" in self.options.targets:
            self._start_litellm(mock_port)

    def _start_litellm(self, mock_port: int) -> None:
        peer = LiteLLMPeer(self.tmp / "litellm", mock_port, self.say)
        started = time.monotonic()
        try:
            peer.start()
        except PeerUnavailable as exc:
            peer.stop()
            message = f"LiteLLM SKIPPED: {exc}"
            self.say(message)
            self.notes.append(message)
            self.litellm = {"status": "skipped", "reason": str(exc)}
            return
        self.peer = peer
        self.say(f"LiteLLM {peer.version} up in {time.monotonic() - started:.1f}s")
        self.say(NO_DATABASE_NOTE)
        self.notes.append(NO_DATABASE_NOTE)
        self.litellm = {
            "status": "ran",
            "version": peer.version,
            "workers": 2,
            "database": None,
            "note": NO_DATABASE_NOTE,
            "setup": "master key; rpm/tpm limits on the deployment (usage-based-routing-v2) "
            "counted in a private redis-server; same mock via its OpenAI-compatible /v1",
        }

    def targets(self) -> dict[str, Target]:
        assert self.stack is not None
        base = self.stack.listener_url
        found = {
            "envoy": Target(
                "envoy", f"{base}/__direct/v1/chat/completions", False, self.api_key, False
            ),
            "gateway": Target("gateway", f"{base}/v1/chat/completions", False, self.api_key, True),
            "stream": Target("stream", f"{base}/v1/chat/completions", True, self.api_key, True),
            "stream-spaced": Target(
                "stream-spaced",
                f"{base}/v1/chat/completions",
                True,
                self.api_key,
                True,
                chunk_delay_ms=self.options.chunk_delay_ms,
            ),
        }
        if self.peer is not None:
            found["litellm"] = Target("litellm", self.peer.url, False, self.peer.master_key, False)
        return {name: t for name, t in found.items() if name in self.options.targets}

    # ------------------------------------------------------------ processes

    def _groups(self) -> dict[str, list[int]]:
        assert self.stack is not None
        groups: dict[str, list[int]] = {"ext_proc": [], "envoy": [], "mock": []}
        for name, process in self.stack.processes:
            if name == "ext-proc" or name.startswith("ext-proc-"):
                groups["ext_proc"].append(process.pid)
            elif name == "envoy":
                groups["envoy"].append(process.pid)
            elif name == "mock-upstream":
                groups["mock"].append(process.pid)
        if self.peer is not None:
            groups["litellm"] = self.peer.pids()
        return groups

    def _metrics_ports(self) -> list[int]:
        assert self.stack is not None
        return [metrics_port for _, metrics_port, _ in self.stack.ext_proc_ports]

    def _check_alive(self) -> None:
        assert self.stack is not None
        dead = self.stack.check_alive()
        if dead:
            raise StackError(f"{dead} during the benchmark; see {self.stack.log_dir}/")

    # -------------------------------------------------------------- rows

    def _await_rows(self, expected: int, timeout: float = 30.0) -> int:
        """The usage-row count once it reaches ``expected`` or stops moving (bounded)."""
        assert self.backends is not None
        db = self.backends.database
        deadline = time.monotonic() + timeout
        last, last_change = -1, time.monotonic()
        while True:
            count = db.count_rows()
            now = time.monotonic()
            if count == expected:
                return count
            if count != last:
                last, last_change = count, now
            elif now - last_change > (1.0 if count > expected else 3.0) or now > deadline:
                return count
            time.sleep(0.1)

    def _count_sent(self, result: LoadResult) -> None:
        """Requests a load run sent to a gateway route: each must leave one usage row."""
        self.rows_sent += result.sent
        self.rows_exact = self.rows_exact and result.exact_count

    # ----------------------------------------------------------- measuring

    def _spec(self, target: Target, connections: int, duration: float) -> LoadSpec:
        return LoadSpec(
            url=target.url,
            connections=connections,
            duration=duration,
            api_key=target.key,
            stream=target.stream,
            chunks=STREAM_CHUNKS if target.stream else None,
            chunk_delay_ms=target.chunk_delay_ms,
            # Every target gets the same answer: 50 completion tokens (the stream's chunks).
            completion_tokens=COMPLETION_TOKENS,
            threads=self.options.wrk_threads,
            # LiteLLM's p99 passes a second at 64 connections: let its answers arrive.
            grace_seconds=3 if target.name == "litellm" else loadgen.GRACE_SECONDS,
        )

    def check_targets(self) -> None:
        """One request each: a clear error now beats minutes of 401s. And is the policy
        chain live? A limited app's responses carry OpenAI's rate-limit headers."""
        for target in self.targets().values():
            status, headers, body = _post(target.url, target.key)
            if target.writes_rows:
                self.rows_sent += 1
            if status != 200:
                raise StackError(
                    f"{target.name}: a single request got HTTP {status} from {target.url}: "
                    f"{body[:300]!r}"
                )
            if target.name == "gateway":
                limits = sorted(h for h in headers if h.startswith("x-ratelimit-"))
                if limits:
                    note = f"policy chain live: the gateway answered with {', '.join(limits)}"
                else:
                    note = (
                        "WARNING: the gateway's answer carried no x-ratelimit-* headers: "
                        "the rate/token limit policies may not be enforced yet"
                    )
                    self.say(note)
                self.notes.append(note)

    def warm_up(self) -> None:
        if self.options.warmup <= 0:
            return
        for target in self.targets().values():
            if target.name == "stream-spaced":
                continue  # slow by design; "stream" warms the same path
            self.say(f"warm-up: {target.name}, {self.options.warmup:g}s at 4 connections")
            result = loadgen.run_load(self.tool, self._spec(target, 4, self.options.warmup))
            if target.writes_rows:
                self._count_sent(result)
        self._check_alive()

    def measure(self, target: Target, connections: int) -> dict[str, Any]:
        assert self.backends is not None
        groups = self._groups()
        rows_before = self.backends.database.count_rows() if target.writes_rows else 0
        phases_before = _scrape_phases(self._metrics_ports()) if target.writes_rows else {}
        before = {g: procstat.sample_group(p) for g, p in groups.items()}
        load_before = _loadavg()
        result = loadgen.run_load(self.tool, self._spec(target, connections, self.options.duration))
        rows: dict[str, Any] | None = None
        if target.writes_rows:
            self._count_sent(result)
            count = self._await_rows(rows_before + result.sent) - rows_before
            if result.exact_count:
                ok = count == result.sent
            else:
                ok = result.requests <= count <= result.sent
            rows = {"sent": result.sent, "written": count, "ok": ok, "exact": result.exact_count}
        after = {g: procstat.sample_group(p) for g, p in groups.items()}
        self._check_alive()
        out = self._result(target, connections, result, before, after, rows)
        out["load_avg"] = {"start": load_before, "end": _loadavg()}
        if target.writes_rows and result.requests:
            out.update(_phase_stats(phases_before, _scrape_phases(self._metrics_ports()), result))
        return out

    def _result(
        self,
        target: Target,
        connections: int,
        load: LoadResult,
        before: dict[str, procstat.GroupSample],
        after: dict[str, procstat.GroupSample],
        rows: dict[str, Any] | None,
    ) -> dict[str, Any]:
        cpu_seconds = {g: round(after[g].cpu_seconds - before[g].cpu_seconds, 4) for g in before}
        per_request = {
            g: (round(cpu_seconds[g] * 1000.0 / load.requests, 4) if load.requests else None)
            for g in _SERVING[target.name]
            if g in cpu_seconds
        }
        rss = {
            g: {
                "start": round(before[g].rss_bytes / MIB, 1),
                "end": round(after[g].rss_bytes / MIB, 1),
            }
            for g in before
            if before[g].pids
        }
        data = load.to_json()
        return {
            "target": target.name,
            "connections": connections,
            "duration_s": self.options.duration,
            **data,
            "cpu_seconds": cpu_seconds,
            "cpu_ms_per_request": per_request,
            "rss_mib": rss,
            "rows": rows,
        }

    def spaced_connections(self) -> int:
        """stream-spaced runs once, where the goals are judged: 16, else the most."""
        counts = self.options.connections
        return report.GOAL_CONNECTIONS if report.GOAL_CONNECTIONS in counts else max(counts)

    def run_matrix(self) -> None:
        targets = self.targets()
        spaced_at = self.spaced_connections()
        for connections in self.options.connections:
            for target in targets.values():
                if target.name == "stream-spaced" and connections != spaced_at:
                    continue
                self.say(
                    f"measuring {target.name:<8} {connections:>3} connections, "
                    f"{self.options.duration:g}s ..."
                )
                result = self.measure(target, connections)
                self.results.append(result)
                lat = result["latency_ms"]
                self.say(
                    f"  {result['rps']:>9.1f} rps  p50 {lat['p50']:.2f} ms  p99 {lat['p99']:.2f} ms"
                    f"  errors {result['errors']['total']}"
                    + (
                        f"  ext_proc {result['cpu_ms_per_request']['ext_proc']:.3f} ms/req"
                        if result["cpu_ms_per_request"].get("ext_proc") is not None
                        and target.writes_rows
                        else ""
                    )
                )

    # ------------------------------------------------------------------ soak

    def run_soak(self) -> None:
        assert self.backends is not None and self.options.soak is not None
        target = self.targets()["gateway"]
        seconds = self.options.soak
        rows_before = self.backends.database.count_rows()
        groups = self._groups()
        samples: list[dict[str, float]] = []
        started = time.monotonic()

        def sample() -> None:
            elapsed = time.monotonic() - started
            ext = procstat.sample_group(groups["ext_proc"])
            envoy = procstat.sample_group(groups["envoy"])
            samples.append(
                {
                    "t_s": round(elapsed, 1),
                    "ext_proc_rss_mib": round(ext.rss_bytes / MIB, 2),
                    "envoy_rss_mib": round(envoy.rss_bytes / MIB, 2),
                    "ext_proc_cpu_s": round(ext.cpu_seconds, 2),
                }
            )
            if len(samples) % 6 == 1:
                self.say(
                    f"  soak {elapsed:>6.0f}/{seconds:g}s  ext_proc RSS "
                    f"{samples[-1]['ext_proc_rss_mib']:.1f} MiB"
                )

        spec = dataclasses.replace(
            self._spec(target, self.options.soak_connections, seconds),
            rate=self.options.soak_rate,
        )
        self.say(
            f"soak: {seconds:g}s at {self.options.soak_rate:g} rps over "
            f"{self.options.soak_connections} connections ({self.tool}"
            + (
                ", rate held by post.lua's per-thread delay() schedule)"
                if self.tool == "wrk"
                else ", rate held by h2load --rps per client)"
            )
        )
        cpu_before = procstat.sample_group(groups["ext_proc"])
        sample()
        result = loadgen.run_load(self.tool, spec, tick=sample, tick_seconds=10.0)
        self._count_sent(result)
        written_now = self._await_rows(rows_before + result.sent) - rows_before
        sample()
        cpu_after = procstat.sample_group(groups["ext_proc"])
        self._check_alive()
        self.soak = {
            "seconds": seconds,
            "rate_target_rps": self.options.soak_rate,
            "connections": self.options.soak_connections,
            "rate_method": "wrk post.lua per-thread delay() schedule"
            if self.tool == "wrk"
            else "h2load --rps (per client)",
            "load": result.to_json(),
            "ext_proc_cpu_ms_per_request": round(
                (cpu_after.cpu_seconds - cpu_before.cpu_seconds) * 1000.0 / result.requests, 4
            )
            if result.requests
            else None,
            "rss": rss_summary(samples, seconds),
            "samples": samples,
            "rows": {
                "sent": result.sent,
                "written_before_shutdown": written_now,
                "written": None,  # after the flush on shutdown (finish())
                "rows_before": rows_before,
                "ok": None,
            },
        }

    # ---------------------------------------------------------------- finish

    def stop_services(self) -> None:
        if self.peer is not None:
            self.peer.stop()
            self.peer = None
        if self.stack is not None:
            self.say("stopping: Envoy, ext_proc (flushing usage records), mock ...")
            self.stack.stop()
            self.stack = None

    def final_rows(self) -> None:
        """After ext_proc's flush on SIGTERM: every request sent left exactly one row."""
        assert self.backends is not None
        self.rows_final = self.backends.database.count_rows()
        if self.open_streams is not None:
            rows = self.open_streams["rows"]
            rows["written"] = self.rows_final - rows["rows_before"]
            rows["ok"] = rows["written"] == rows["sent"]
        if self.soak is not None:
            rows = self.soak["rows"]
            rows["written"] = self.rows_final - rows["rows_before"]
            rows["ok"] = (
                rows["written"] == rows["sent"]
                if self.rows_exact
                else self.soak["load"]["requests"] <= rows["written"] <= rows["sent"]
            )

    def cleanup(self, failed: bool) -> None:
        with contextlib.suppress(Exception):
            self.stop_services()
        if self.backends is not None:
            for problem in self.backends.close():
                self.say(f"WARNING: {problem}")
            self.backends = None
        if self.options.keep_logs or failed:
            shutil.rmtree(self.tmp / "postgres", ignore_errors=True)
            self.say(f"logs kept in {self.tmp}/ (data/logs/, litellm/)")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)


def _phase_stats(
    before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]], load: LoadResult
) -> dict[str, Any]:
    """ext_proc messages per request by phase, and the handlers' Python time per request
    (the rest of the process's CPU is grpc, protobuf, the event loop and the usage writer)."""
    messages: dict[str, float] = {}
    by_phase: dict[str, float] = {}
    handler_s = 0.0
    for phase, (count, total) in after.items():
        c0, s0 = before.get(phase, (0.0, 0.0))
        if count - c0 > 0:
            messages[phase] = round((count - c0) / load.requests, 3)
            # Wall time per message, awaits included (the Redis call of the request side).
            by_phase[phase] = round((total - s0) * 1000.0 / (count - c0), 4)
        handler_s += total - s0
    return {
        "ext_proc_messages_per_request": messages,
        "ext_proc_handler_ms_per_request": round(handler_s * 1000.0 / load.requests, 4),
        "ext_proc_handler_ms_per_message": by_phase,
    }


def _slope_per_hour(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, MiB) in MiB per hour."""
    if len(points) < 2:
        return 0.0
    mx = sum(x for x, _ in points) / len(points)
    my = sum(y for _, y in points) / len(points)
    var = sum((x - mx) ** 2 for x, _ in points)
    if var == 0:
        return 0.0
    return sum((x - mx) * (y - my) for x, y in points) / var * 3600.0


def rss_summary(samples: list[dict[str, float]], seconds: float) -> dict[str, Any]:
    """First/last/max ext_proc RSS, slopes, and whether it stayed flat.

    Flat: in the second half of the soak (after a warm-up of min(60 s, 10%) while caches
    and the allocator's arenas fill), RSS rises by at most 20 MiB per hour (least
    squares) or by at most 0.5 MiB in all. A bounded cache that fills early passes;
    anything still growing at the end (a leak) fails. A longer soak judges better.
    """
    rule = "second half of the soak: slope <= 20 MiB/h or growth <= 0.5 MiB"
    if not samples:
        return {
            "flat": False,
            "flat_rule": rule,
            "first_mib": 0.0,
            "last_mib": 0.0,
            "max_mib": 0.0,
            "slope_mib_per_hour": 0.0,
        }
    warm = min(60.0, 0.1 * seconds)
    steady = [(s["t_s"], s["ext_proc_rss_mib"]) for s in samples if s["t_s"] >= warm]
    steady = steady or [(s["t_s"], s["ext_proc_rss_mib"]) for s in samples]
    middle = (steady[0][0] + steady[-1][0]) / 2.0
    second = [p for p in steady if p[0] >= middle] or steady[-1:]
    growth = second[-1][1] - second[0][1]
    second_slope = _slope_per_hour(second)
    return {
        "flat": second_slope <= 20.0 or growth <= 0.5,
        "flat_rule": rule,
        "first_mib": samples[0]["ext_proc_rss_mib"],
        "last_mib": samples[-1]["ext_proc_rss_mib"],
        "max_mib": max(s["ext_proc_rss_mib"] for s in samples),
        "slope_mib_per_hour": round(_slope_per_hour(steady), 2),
        "second_half_growth_mib": round(growth, 2),
        "second_half_slope_mib_per_hour": round(second_slope, 2),
    }


# ------------------------------------------------------------------------ main


def _document(bench: Bench, options: Options, started: dt.datetime) -> dict[str, Any]:
    ratios = report.compute_ratios(bench.results, STREAM_CHUNKS)
    goals = report.evaluate_goals(bench.results, ratios, bench.soak)
    gateway_sent = bench.rows_sent
    rows_ok = None
    if bench.rows_final is not None and gateway_sent:
        rows_ok = bench.rows_final == gateway_sent if bench.rows_exact else None
    return {
        "schema": 1,
        "started_at": started.isoformat(timespec="seconds"),
        "finished_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "mode": "open-streams"
        if options.open_streams is not None
        else "soak"
        if options.soak is not None
        else ("smoke" if options.smoke else "matrix"),
        "host": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_avg_end": _loadavg(),
        },
        "git": _git(),
        "options": {
            "connections": options.connections,
            "duration_s": options.duration,
            "targets": options.targets,
            "ext_proc_processes": options.ext_proc_processes,
            "chunk_delay_ms": options.chunk_delay_ms,
            "streamed_chunks": STREAM_CHUNKS,
            "warmup_s": options.warmup,
            "wrk_threads": options.wrk_threads,
            "load_generator": f"{bench.tool} ({loadgen.tool_version(bench.tool)})",
            "request_body": "bench/request.json",
        },
        "setup": {
            "gateway_config": "bench/gateway.yaml",
            "api_key": "created with `ext-proc keys create --app bench`"
            if bench.api_key
            else "none",
            "litellm": bench.litellm,
            "notes": bench.notes,
        },
        "results": bench.results,
        "ratios": ratios,
        "goals": [g.to_json() for g in goals],
        "soak": bench.soak,
        "open_streams": bench.open_streams,
        "usage_rows": {
            "sent_to_gateway": gateway_sent,
            "written": bench.rows_final,
            "exact": bench.rows_exact,
            "ok": rows_ok,
        },
        "failures": bench.failures,
        "ok": not bench.failures,
    }


def _judge(bench: Bench, options: Options) -> None:
    """What fails the run: errors on our targets, usage rows != requests sent."""
    for r in bench.results:
        if r["errors"]["total"] and (r["target"] != "litellm"):
            bench.failures.append(
                f"{r['target']} @{r['connections']}: {r['errors']['total']} errors {r['errors']}"
            )
        if r["rows"] is not None and not r["rows"]["ok"]:
            bench.failures.append(
                f"{r['target']} @{r['connections']}: {r['rows']['written']} usage rows for "
                f"{r['rows']['sent']} requests sent"
            )
    if bench.rows_final is not None and bench.rows_exact and bench.rows_final != bench.rows_sent:
        bench.failures.append(
            f"after shutdown: {bench.rows_final} usage rows in total for "
            f"{bench.rows_sent} requests sent to the gateway"
        )
    if bench.open_streams is not None:
        bench.failures.extend(open_streams_mode.failures(bench.open_streams))
    if bench.soak is not None:
        load = bench.soak["load"]
        if load["errors"]["total"]:
            bench.failures.append(f"soak: {load['errors']['total']} errors {load['errors']}")
        if not bench.soak["rows"]["ok"]:
            bench.failures.append(
                f"soak: {bench.soak['rows']['written']} usage rows for "
                f"{bench.soak['rows']['sent']} requests sent"
            )


def _print_summary(doc: dict[str, Any], bench: Bench) -> None:
    say = bench.say
    say("")
    if bench.results:
        say(report.format_table(bench.results))
        say("")
        say(report.format_ratios(doc["ratios"]))
    if bench.soak is not None:
        soak = bench.soak
        rss, rows, load = soak["rss"], soak["rows"], soak["load"]
        say(
            f"soak {soak['seconds']:g}s @ {soak['rate_target_rps']:g} rps target: "
            f"{load['rps']:.1f} rps achieved, {load['requests']} requests, "
            f"{load['errors']['total']} errors, p50 {load['latency_ms']['p50']:.2f} ms, "
            f"p99 {load['latency_ms']['p99']:.2f} ms"
        )
        say(
            f"  ext_proc RSS: first {rss['first_mib']:.1f} MiB, last {rss['last_mib']:.1f} MiB, "
            f"max {rss['max_mib']:.1f} MiB, slope {rss['slope_mib_per_hour']:+.2f} MiB/h, "
            f"second half {rss['second_half_growth_mib']:+.2f} MiB "
            f"-> {'flat' if rss['flat'] else 'NOT flat'}"
        )
        say(f"  usage rows written {rows['written']} / requests sent {rows['sent']}")
        if soak["ext_proc_cpu_ms_per_request"] is not None:
            say(f"  ext_proc CPU {soak['ext_proc_cpu_ms_per_request']:.3f} ms per request")
    if bench.open_streams is not None:
        say(open_streams_mode.format_report(bench.open_streams))
    say("")
    say("notes:")
    for note in bench.notes:
        say(f"  - {note}")
    say(
        "  - CPU per request: utime+stime from /proc over the load and the usage-row flush "
        "after it, divided by the responses. 'errors' = status > 399 + socket errors."
    )
    say("")
    if bench.open_streams is None:  # the goals are judged on the matrix and the soak
        say("goals (ratios measured in this run; absolute numbers vary with machine load):")
        goals = report.evaluate_goals(bench.results, doc["ratios"], bench.soak)
        if bench.soak is not None:  # a soak measures nothing else
            goals = [g for g in goals if g.name.startswith("soak")]
        say(report.format_goals(goals))
        say("")
    if bench.failures:
        say("FAILED:")
        for failure in bench.failures:
            say(f"  - {failure}")
    else:
        say("OK: no errors; usage rows written = requests sent")
        if bench.soak is not None and not bench.soak["rss"]["flat"]:
            say("BUT: ext_proc RSS was still growing at the end of the soak (goal NOT met)")


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_args(argv)
    tool = loadgen.available_tool()
    if options.load_generator is not None:
        tool = options.load_generator if shutil.which(options.load_generator) else None
    if tool is None:
        print(
            "error: no load generator: install wrk (apt-get install -y wrk) or h2load "
            "(apt-get install -y nghttp2-client)",
            file=sys.stderr,
        )
        return 2
    if tool != "wrk":
        _say("NOTE: wrk not found; using h2load (usage rows can only be checked within a range)")
    started = dt.datetime.now(dt.UTC)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    bench = Bench(options, tool)
    failed = True
    try:
        try:
            bench.setup()
            bench.check_targets()
            bench.warm_up()
            spec = options.open_streams_spec()
            if spec is not None:
                bench.open_streams = open_streams_mode.run(bench, spec)
            elif options.soak is not None:
                bench.run_soak()
            else:
                bench.run_matrix()
            bench.stop_services()
            bench.final_rows()
        except (StackError, loadgen.LoadGenError, RuntimeError, OSError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except (KeyboardInterrupt, _Terminated):
            print("interrupted: stopping everything", file=sys.stderr)
            return 130
        _judge(bench, options)
        if bench.rows_final is not None:
            bench.notes.append(
                f"usage rows after shutdown: {bench.rows_final} for {bench.rows_sent} requests "
                "sent to the gateway (incl. checks and warm-up)"
            )
        doc = _document(bench, options, started)
        _print_summary(doc, bench)
        path = options.json_path or RESULTS_DIR / f"{started.strftime('%Y%m%dT%H%M%SZ')}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
        bench.say(f"JSON: {path}")
        failed = bool(bench.failures)
        return 1 if bench.failures else 0
    finally:
        bench.cleanup(failed)
        signal.signal(signal.SIGTERM, previous)

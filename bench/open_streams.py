"""``python -m bench --open-streams N``: N long streams held open through the gateway at once.

Issue 15, item 3: "2,000 concurrent streaming requests of 30 s each (a chunk every 50 ms)
held with no errors; report ext_proc CPU, RSS per open stream, and Envoy's."

The stack is the benchmark's (``bench/run.py``: Envoy, ext_proc with the full policy
chain, the mock upstream, the run's own Postgres database and Redis prefix); the
provider's route timeout is raised above the streams' length. The mock streams
``chunks = stream_seconds / chunk_interval`` content chunks on its own clock (chunk *i*
due ``i * interval`` after the first, ``ext_proc/mock/sse.py``), so a gateway that keeps
pace delivers each stream in ``(chunks - 1) * interval``.

Two clients, both started at t0 and sharing one ramp (first requests spread evenly over
``ramp_seconds``):

* ``wrk`` with ``open_streams.lua`` holds all streams but the probes (one request per
  connection; C, so 40,000 chunks/s cost it little). It reports each stream's status,
  whether its body ended with ``[DONE]`` after exactly ``chunks`` content events, and the
  streams' durations (its latency histogram: request sent to last byte).
* A few probe streams in this process (asyncio, raw HTTP/1.1) timestamp every content
  event as it arrives: the inter-chunk gaps the app would see.

Every second the sampler reads CPU and RSS of ext_proc, Envoy, the mock, wrk and this
process from ``/proc``, and Envoy's active-request gauges. When Envoy has no request
left (or the deadline passes) wrk gets SIGINT and prints its summary. Then the usage rows
are awaited (every request sent must leave exactly one row, checked again after the
shutdown flush in ``run.py``).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import resource
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from bench import procstat
from ext_proc.procutil import die_with_parent, stop_process

if TYPE_CHECKING:
    from bench.run import Bench

BENCH_DIR = Path(__file__).resolve().parent
LUA_SCRIPT = BENCH_DIR / "open_streams.lua"
REQUEST_BODY = BENCH_DIR / "request.json"
MIB = 1024 * 1024
_TICKS = os.sysconf("SC_CLK_TCK")
_MARKER = "BENCH_JSON "
_CONTENT = b'"delta":{"content":'
_DONE = b"data: [DONE]"
# Envoy stats read before and after (counters: the change) and sampled (gauges: the peak).
_ENVOY_STATS_FILTER = (
    r"^(http\.llm_gateway\.(downstream_rq_[2345]xx|downstream_rq_active|downstream_cx_active"
    r"|downstream_cx_overflow|ext_proc\..*)"
    r"|cluster\.[^.]+\.(upstream_rq_active|upstream_cx_active|upstream_rq_pending_overflow"
    r"|upstream_rq_pending_active|upstream_cx_overflow|upstream_rq_timeout|upstream_rq_total"
    r"|upstream_cx_total|upstream_rq_rx_reset|upstream_rq_tx_reset|upstream_cx_destroy_remote"
    r"|upstream_rq_per_try_timeout|[a-z_]*overflow|circuit_breakers\.default\.rq_open)"
    r"|overload\..*)$"
)
_ACTIVE = "http.llm_gateway.downstream_rq_active"
_PEAK_GAUGES = (
    _ACTIVE,
    "http.llm_gateway.downstream_cx_active",
    "cluster.ext_proc.upstream_rq_active",
    "cluster.ext_proc.upstream_cx_active",
    "cluster.ext_proc_response.upstream_rq_active",
    "cluster.ext_proc_response.upstream_cx_active",
    "cluster.ext_proc_response.upstream_rq_pending_active",
    "cluster.provider_mock.upstream_rq_active",
)
# Kept pace: every stream within this of the expected duration, and the probes' p99 gap
# at most this many intervals.
PACE_DURATION_SLACK = 0.05
PACE_GAP_INTERVALS = 3.0
# Envoy counters printed when they moved (all moved ones are in the JSON).
_NOTABLE = ("overflow", "timeout", "reset", "5xx", "4xx", "fail", "error")


@dataclass(frozen=True, slots=True)
class OpenStreamsSpec:
    streams: int = 2000
    stream_seconds: float = 30.0
    chunk_interval_ms: int = 50
    ramp_seconds: float | None = None  # None: N / 200 streams per second, at least 2 s
    probe_streams: int | None = None  # None: N / 20, at most 50, at least 1
    wrk_threads: int = 1

    @property
    def chunks(self) -> int:
        return max(1, round(self.stream_seconds * 1000.0 / self.chunk_interval_ms))

    @property
    def expected_seconds(self) -> float:
        """How long a stream takes when nothing lags: the mock's schedule."""
        return (self.chunks - 1) * self.chunk_interval_ms / 1000.0

    @property
    def ramp(self) -> float:
        return self.ramp_seconds if self.ramp_seconds is not None else max(2.0, self.streams / 200)

    @property
    def probes(self) -> int:
        """Probe streams; the rest (a multiple of wrk's threads) are wrk's."""
        wanted = self.probe_streams
        if wanted is None:
            wanted = max(1, min(50, self.streams // 20))
        wanted = min(wanted, self.streams)
        rest = self.streams - wanted
        return wanted + rest % max(1, self.wrk_threads)

    @property
    def wrk_streams(self) -> int:
        return self.streams - self.probes

    @property
    def grace_seconds(self) -> float:
        """How much longer than expected a stream may take before it counts as incomplete."""
        return max(15.0, 2 * self.expected_seconds)

    @property
    def deadline_seconds(self) -> float:
        return self.ramp + self.expected_seconds + self.grace_seconds

    @property
    def provider_timeout_seconds(self) -> int:
        """The provider's route timeout for the run: longer than any stream may take."""
        return math.ceil(self.deadline_seconds + 60)


def with_provider_timeout(gateway_yaml: str, seconds: int) -> str:
    """The bench's gateway.yaml with the mock provider's timeout set to ``seconds``."""
    old = "    timeout: 30s\n"
    if old not in gateway_yaml:
        raise RuntimeError("bench/gateway.yaml: the provider's `timeout: 30s` line is missing")
    return gateway_yaml.replace(old, f"    timeout: {seconds}s\n", 1)


def raise_fd_limit(needed: int) -> dict[str, int]:
    """Raise this process's soft RLIMIT_NOFILE (children inherit it) towards ``needed``."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = soft
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return {"needed": needed, "soft_before": soft, "soft": target, "hard": hard}


def fds_needed(streams: int) -> int:
    """Envoy holds two sockets per stream (app and mock), wrk and the mock one each."""
    return 2 * streams + 1024


# ------------------------------------------------------------------------- probes


@dataclass(slots=True)
class ProbeResult:
    status: int | None = None
    sent_at: float | None = None
    headers_at: float | None = None  # the status line arrived
    done_at: float | None = None
    arrivals: list[float] = field(default_factory=list)  # one per content event
    error: str | None = None

    @property
    def complete(self) -> bool:
        return self.status == 200 and self.done_at is not None


class _ProbeProtocol(asyncio.Protocol):
    """One streaming request over raw HTTP/1.1; timestamps each content event."""

    def __init__(self, request: bytes, result: ProbeResult, finished: asyncio.Future[None]):
        self._request = request
        self._result = result
        self._finished = finished
        self._transport: asyncio.Transport | None = None
        self._head = b""
        self._tail = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._result.sent_at = time.monotonic()
        transport.write(self._request)

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        result = self._result
        if result.status is None:
            self._head += data
            line_end = self._head.find(b"\r\n")
            if line_end < 0:
                return
            parts = self._head[:line_end].split(b" ", 2)
            result.status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
            result.headers_at = now
            data, self._head = self._head, b""
            if result.status != 200:
                self._finish(f"status {result.status}")
                return
        buf = self._tail + data
        result.arrivals.extend([now] * buf.count(_CONTENT))
        if _DONE in buf:
            result.done_at = now
            self._finish(None)
            return
        # Keep what could be the start of a marker split across two reads.
        self._tail = buf[-(len(_DONE) - 1) :]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._finished.done():
            self._result.error = f"connection lost: {exc or 'closed by peer'}"
            self._finished.set_result(None)

    def _finish(self, error: str | None) -> None:
        self._result.error = error
        if not self._finished.done():
            self._finished.set_result(None)
        if self._transport is not None:
            self._transport.close()


def _probe_request(url: str, api_key: str | None, chunks: int, interval_ms: int) -> bytes:
    """The same request wrk sends (``open_streams.lua`` builds it alike)."""
    body = json.loads(REQUEST_BODY.read_text())
    body["max_tokens"] = chunks
    body["stream"] = True
    payload = json.dumps(body, separators=(",", ":")).encode()
    parts = urlsplit(url)
    lines = [
        f"POST {parts.path} HTTP/1.1",
        f"Host: {parts.netloc}",
        "Content-Type: application/json",
        f"Content-Length: {len(payload)}",
        f"x-mock-chunks: {chunks}",
        f"x-mock-completion-tokens: {chunks}",
        f"x-mock-chunk-delay-ms: {interval_ms}",
    ]
    if api_key:
        lines.append(f"Authorization: Bearer {api_key}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + payload


async def _probe(
    host: str, port: int, request: bytes, start_in: float, limit: float
) -> ProbeResult:
    await asyncio.sleep(start_in)
    loop = asyncio.get_running_loop()
    result = ProbeResult()
    finished: asyncio.Future[None] = loop.create_future()
    try:
        transport, _ = await loop.create_connection(
            lambda: _ProbeProtocol(request, result, finished), host, port
        )
    except OSError as exc:
        result.error = f"connect: {exc}"
        return result
    try:
        await asyncio.wait_for(finished, limit - start_in)  # ends at the run's deadline
    except TimeoutError:
        result.error = "incomplete at the deadline"
    finally:
        transport.close()
    return result


# --------------------------------------------------------------------------- wrk


class _Wrk:
    """wrk holding ``spec.wrk_streams`` streams until SIGINT."""

    def __init__(self, spec: OpenStreamsSpec, url: str, api_key: str | None) -> None:
        self.spec = spec
        run_for = math.ceil(spec.deadline_seconds + 30)
        args = [
            f"chunks={spec.chunks}",
            f"chunk_delay_ms={spec.chunk_interval_ms}",
            f"ramp_ms={spec.ramp * 1000:.0f}",
            f"connections={spec.wrk_streams}",
            f"threads={spec.wrk_threads}",
        ]
        if api_key:
            args.append(f"key={api_key}")
        self.argv = [
            "wrk",
            f"-t{spec.wrk_threads}",
            f"-c{spec.wrk_streams}",
            f"-d{run_for}s",
            # wrk sizes its latency histogram by the timeout: one slot per microsecond.
            "--timeout",
            f"{run_for}s",
            "-s",
            str(LUA_SCRIPT),
            url,
            "--",
            *args,
        ]
        self.process = subprocess.Popen(
            self.argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            preexec_fn=die_with_parent,
        )

    def interrupt(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)

    def result(self, timeout: float = 30.0) -> dict[str, Any]:
        try:
            out, err = self.process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop_process(self.process, timeout=5)
            raise RuntimeError("wrk did not exit after SIGINT") from None
        line = next((ln for ln in out.splitlines() if ln.startswith(_MARKER)), None)
        if line is None:
            raise RuntimeError(f"wrk printed no summary (exit {self.process.returncode}): {err}")
        data: dict[str, Any] = json.loads(line[len(_MARKER) :])
        return data


# ------------------------------------------------------------------------ helpers


def _envoy_stats(admin_port: int) -> dict[str, int]:
    url = f"http://127.0.0.1:{admin_port}/stats?filter={urllib.parse.quote(_ENVOY_STATS_FILTER)}"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
    except (OSError, urllib.error.URLError):
        return {}
    stats: dict[str, int] = {}
    for line in text.splitlines():
        name, sep, value = line.partition(": ")
        if sep and value.strip().lstrip("-").isdigit():
            stats[name] = int(value)
    return stats


def _ext_proc_streams_active(metrics_ports: Sequence[int]) -> int | None:
    total, found = 0, False
    for port in metrics_ports:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
                text = resp.read().decode()
        except (OSError, urllib.error.URLError):
            continue
        for line in text.splitlines():
            if line.startswith("ext_proc_streams_active "):
                total += int(float(line.split()[1]))
                found = True
    return total if found else None


def _percentiles(values: Sequence[float], scale: float = 1.0) -> dict[str, float] | None:
    if not values:
        return None
    ordered = sorted(values)

    def pct(p: float) -> float:
        index = min(len(ordered) - 1, max(0, math.ceil(p / 100.0 * len(ordered)) - 1))
        return round(ordered[index] * scale, 3)

    return {
        "p50": pct(50),
        "p90": pct(90),
        "p99": pct(99),
        "max": round(ordered[-1] * scale, 3),
        "min": round(ordered[0] * scale, 3),
        "count": len(ordered),
    }


def machine_cpu() -> tuple[float, float]:
    """Busy and total CPU seconds of the whole machine so far (all cores, ``/proc/stat``)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    ticks = float(_TICKS)
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already counted in user
    return (total - idle) / ticks, total / ticks


def _self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# -------------------------------------------------------------------------- run


@dataclass(slots=True)
class _Sampler:
    groups: dict[str, list[int]]
    envoy_admin_port: int
    metrics_ports: list[int]
    started: float
    say: Callable[[str], None]
    samples: list[dict[str, Any]] = field(default_factory=list)
    peak_rss: dict[str, int] = field(default_factory=dict)
    peak_gauges: dict[str, int] = field(default_factory=dict)
    peak_ext_proc_streams: int = 0
    active: int | None = None  # Envoy's active downstream requests at the last sample
    _last: dict[str, float] = field(default_factory=dict)
    _last_t: float = 0.0
    _machine: tuple[float, float] | None = None

    def every_second(self, stop: threading.Event) -> None:
        while not stop.wait(1.0):
            self.sample()

    def sample(self) -> int | None:
        """One sample; Envoy's active downstream requests (None: could not ask)."""
        now = time.monotonic()
        t = now - self.started
        row: dict[str, Any] = {"t_s": round(t, 1)}
        for name, pids in self.groups.items():
            got = procstat.sample_group(pids)
            self.peak_rss[name] = max(self.peak_rss.get(name, 0), got.rss_bytes)
            if name in self._last and now > self._last_t:
                row[f"{name}_cpu_pct"] = round(
                    (got.cpu_seconds - self._last[name]) * 100.0 / (now - self._last_t), 1
                )
            row[f"{name}_rss_mib"] = round(got.rss_bytes / MIB, 1)
            self._last[name] = got.cpu_seconds
        self._last_t = now
        busy, total = machine_cpu()
        if self._machine is not None and total > self._machine[1]:
            cores = os.cpu_count() or 1
            row["machine_busy_pct"] = round(
                (busy - self._machine[0]) * 100.0 * cores / (total - self._machine[1]), 1
            )
        self._machine = (busy, total)
        stats = _envoy_stats(self.envoy_admin_port)
        for name in _PEAK_GAUGES:
            if name in stats:
                self.peak_gauges[name] = max(self.peak_gauges.get(name, 0), stats[name])
        active = stats.get(_ACTIVE)
        self.active = active
        row["envoy_active_requests"] = active
        streams = _ext_proc_streams_active(self.metrics_ports)
        row["ext_proc_streams_active"] = streams
        if streams is not None:
            self.peak_ext_proc_streams = max(self.peak_ext_proc_streams, streams)
        self.samples.append(row)
        if len(self.samples) % 5 == 1:
            self.say(
                f"  t={t:5.0f}s  open requests {active}  ext_proc streams {streams}  "
                f"CPU% ext_proc {row.get('ext_proc_cpu_pct', '-')} envoy "
                f"{row.get('envoy_cpu_pct', '-')} mock {row.get('mock_cpu_pct', '-')} "
                f"wrk {row.get('wrk_cpu_pct', '-')}  RSS ext_proc {row['ext_proc_rss_mib']} MiB"
            )
        return active


async def _hold(
    spec: OpenStreamsSpec,
    url: str,
    api_key: str | None,
    sampler: _Sampler,
    wrk: _Wrk | None,
) -> list[ProbeResult]:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    request = _probe_request(url, api_key, spec.chunks, spec.chunk_interval_ms)
    limit = spec.deadline_seconds
    probes = [
        asyncio.ensure_future(
            _probe(host, port, request, spec.ramp * (i + 0.5) / spec.probes, limit)
        )
        for i in range(spec.probes)
    ]
    # The sampler's reads block (urllib, /proc): its own thread, so that this loop stamps
    # the probes' chunks when they arrive.
    stop = threading.Event()
    thread = threading.Thread(target=sampler.every_second, args=(stop,), daemon=True)
    thread.start()
    try:
        while True:
            await asyncio.sleep(0.25)
            active = sampler.active
            elapsed = time.monotonic() - sampler.started
            if wrk is not None and wrk.process.poll() is not None:
                break  # wrk ended by itself (an error): its result says why
            if elapsed > spec.ramp + 1 and active == 0 and all(p.done() for p in probes):
                break
            if elapsed > limit:
                break
        if wrk is not None:
            wrk.interrupt()
        return list(await asyncio.gather(*probes))
    finally:
        for p in probes:
            p.cancel()
        stop.set()
        thread.join(timeout=30)


def run(bench: Bench, spec: OpenStreamsSpec) -> dict[str, Any]:
    """Open ``spec.streams`` streams through the gateway, hold them, measure; the report."""
    assert bench.stack is not None and bench.backends is not None and bench.api_key
    say = bench.say
    stack = bench.stack
    url = f"{stack.listener_url}/v1/chat/completions"
    metrics_ports = [m for _, m, _ in stack.ext_proc_ports]
    admin_port = stack.options.envoy_admin_port
    groups = bench._groups()
    # The rows of what was sent before (the check request) are written asynchronously.
    rows_before = bench._await_rows(bench.rows_sent)
    from bench.run import _scrape_phases  # run.py imports this module

    phases_before = _scrape_phases(metrics_ports)
    stats_before = _envoy_stats(admin_port)
    before = {g: procstat.sample_group(p) for g, p in groups.items()}
    self_before = _self_cpu()
    machine_before = machine_cpu()
    say(
        f"open streams: {spec.streams} ({spec.wrk_streams} wrk + {spec.probes} probes), "
        f"{spec.chunks} chunks {spec.chunk_interval_ms} ms apart (expected "
        f"{spec.expected_seconds:.2f} s each), ramp {spec.ramp:g} s, deadline "
        f"{spec.deadline_seconds:.0f} s"
    )
    started = time.monotonic()
    wrk = _Wrk(spec, url, bench.api_key) if spec.wrk_streams else None
    groups_sampled = dict(groups)
    if wrk is not None:
        groups_sampled["wrk"] = [wrk.process.pid]
    sampler = _Sampler(groups_sampled, admin_port, metrics_ports, started, say)
    sampler.sample()
    wrk_result: dict[str, Any] | None = None
    wrk_cpu = 0.0
    try:
        probes = asyncio.run(_hold(spec, url, bench.api_key, sampler, wrk))
        if wrk is not None:
            got = procstat.sample(wrk.process.pid)  # before it exits: /proc still has it
            wrk_result = wrk.result()
            wrk_cpu = got.cpu_seconds if got is not None else 0.0
    finally:
        if wrk is not None:
            stop_process(wrk.process, timeout=5)
    held_s = time.monotonic() - started
    self_cpu = _self_cpu() - self_before
    sent = (wrk_result["sent"] if wrk_result else 0) + sum(
        1 for p in probes if p.sent_at is not None
    )
    say(f"streams done after {held_s:.1f} s; waiting for {sent} usage rows ...")
    written = bench._await_rows(rows_before + sent, timeout=60.0) - rows_before
    after = {g: procstat.sample_group(p) for g, p in groups.items()}
    machine_busy_s = machine_cpu()[0] - machine_before[0]
    window_s = time.monotonic() - started  # what the CPU numbers are measured over
    stats_after = _envoy_stats(admin_port)
    phases_after = _scrape_phases(metrics_ports)
    bench._check_alive()
    bench.rows_sent += sent
    return _report(
        spec,
        probes=probes,
        wrk=wrk_result,
        wrk_cpu=wrk_cpu,
        self_cpu=self_cpu,
        before=before,
        after=after,
        sampler=sampler,
        held_s=held_s,
        window_s=window_s,
        rows={"sent": sent, "written_before_shutdown": written, "rows_before": rows_before},
        envoy_before=stats_before,
        envoy_after=stats_after,
        phases=(phases_before, phases_after),
        fd_limit=bench.fd_limit,
        machine_busy_s=machine_busy_s,
    )


def _report(
    spec: OpenStreamsSpec,
    *,
    probes: list[ProbeResult],
    wrk: dict[str, Any] | None,
    wrk_cpu: float,
    self_cpu: float,
    before: dict[str, procstat.GroupSample],
    after: dict[str, procstat.GroupSample],
    sampler: _Sampler,
    held_s: float,
    window_s: float,
    rows: dict[str, Any],
    envoy_before: dict[str, int],
    envoy_after: dict[str, int],
    phases: tuple[dict[str, tuple[float, float]], dict[str, tuple[float, float]]],
    fd_limit: dict[str, int] | None,
    machine_busy_s: float,
) -> dict[str, Any]:
    n = spec.streams
    w = wrk or {}
    w_errors = w.get("errors", {})
    statuses: dict[str, int] = {str(k): int(v) for k, v in w.get("statuses", {}).items()}
    probe_ok = sum(
        1 for p in probes if p.complete and len(p.arrivals) == spec.chunks and not p.error
    )
    for p in probes:
        if p.status is not None:
            statuses[str(p.status)] = statuses.get(str(p.status), 0) + 1
    completed_ok = int(w.get("body_ok", 0)) + probe_ok
    responses = int(w.get("completed", 0)) + sum(1 for p in probes if p.status is not None)
    sent = rows["sent"]
    non_200 = sum(v for k, v in statuses.items() if k != "200")
    socket_errors = {
        "connect": int(w_errors.get("connect", 0)),
        "read": int(w_errors.get("read", 0)),
        "write": int(w_errors.get("write", 0)),
        "timeout": int(w_errors.get("timeout", 0)),
        "probe": sum(1 for p in probes if p.error and p.status in (None, 200)),
    }
    streams = {
        "requested": n,
        "sent": sent,
        "resent_after_socket_error": int(w.get("resent", 0)),
        "completed_ok": completed_ok,
        "responses": responses,
        "statuses": dict(sorted(statuses.items())),
        "non_200": non_200,
        "socket_errors": socket_errors,
        "socket_errors_total": sum(socket_errors.values()),
        "body_short": int(w.get("body_short", 0))
        + sum(1 for p in probes if p.complete and len(p.arrivals) != spec.chunks),
        "body_without_done": int(w.get("body_no_done", 0)),
        "incomplete": sent - responses,
        "ok": completed_ok == n and sent == n,
    }
    # Pace: stream durations (wrk: request sent .. last byte; probes the same) and the
    # probes' gaps between content events.
    gaps: list[float] = []
    probe_durations: list[float] = []
    first_chunk: list[float] = []  # request sent .. first content event
    headers: list[float] = []  # request sent .. the response's status line
    for p in probes:
        if p.headers_at is not None and p.sent_at is not None:
            headers.append(p.headers_at - p.sent_at)
        if p.arrivals and p.sent_at is not None:
            first_chunk.append(p.arrivals[0] - p.sent_at)
        gaps.extend(b - a for a, b in zip(p.arrivals, p.arrivals[1:], strict=False))
        if p.complete and p.sent_at is not None and p.done_at is not None:
            probe_durations.append(p.done_at - p.sent_at)
    lat = w.get("latency_us")
    wrk_durations = (
        {k: round(float(lat[k]) / 1e6, 3) for k in ("min", "p50", "p90", "p99", "max")}
        if lat and int(w.get("completed", 0))
        else None
    )
    gap_ms = _percentiles(gaps, 1000.0)
    expected = spec.expected_seconds
    probe_pct = _percentiles(probe_durations)
    slowest = max(([wrk_durations["max"]] if wrk_durations else []) + probe_durations, default=0.0)
    p99 = max(
        wrk_durations["p99"] if wrk_durations else 0.0, probe_pct["p99"] if probe_pct else 0.0
    )
    interval = spec.chunk_interval_ms
    pace_rule = (
        f"all streams complete, p99 duration <= expected x {1 + PACE_DURATION_SLACK:g}, "
        f"probe gap p99 <= {PACE_GAP_INTERVALS:g} x interval"
    )
    missed: list[str] = []
    if not streams["ok"]:
        missed.append("not every stream completed")
    if p99 > expected * (1 + PACE_DURATION_SLACK) + 0.1:
        missed.append(f"p99 duration {p99:.2f} s")
    if gap_ms is not None and gap_ms["p99"] > PACE_GAP_INTERVALS * interval:
        missed.append(f"probe gap p99 {gap_ms['p99']:.0f} ms")
    kept_pace = not missed
    pace = {
        "expected_stream_s": round(expected, 3),
        "stream_duration_s_wrk": wrk_durations,
        "stream_duration_s_probes": probe_pct,
        "slowest_stream_s": round(slowest, 3),
        "lag_p99_s": round(p99 - expected, 3),
        "probe_headers_s": _percentiles(headers),
        "probe_first_chunk_s": _percentiles(first_chunk),
        "probe_gap_ms": gap_ms,
        "probe_gaps_over_2x_interval": sum(1 for g in gaps if g * 1000.0 > 2 * interval),
        "kept_pace": kept_pace,
        "missed": missed,
        "rule": pace_rule,
    }
    chunks = int(w.get("chunks_seen", 0)) + sum(len(p.arrivals) for p in probes)
    messages = _response_messages(*phases)

    def proc(name: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        cpu = after[name].cpu_seconds - before[name].cpu_seconds
        rss0, rss1 = before[name].rss_bytes, after[name].rss_bytes
        peak = max(sampler.peak_rss.get(name, 0), rss0, rss1)
        return {
            "cpu_s": round(cpu, 2),
            "cpu_pct_of_one_core": round(cpu * 100.0 / window_s, 1) if window_s else None,
            "cpu_ms_per_stream": round(cpu * 1000.0 / n, 3),
            "cpu_us_per_chunk": round(cpu * 1e6 / chunks, 2) if chunks else None,
            "rss_mib": {
                "before": round(rss0 / MIB, 1),
                "peak": round(peak / MIB, 1),
                "after": round(rss1 / MIB, 1),
            },
            "rss_kib_per_open_stream": round((peak - rss0) / 1024.0 / n, 2),
            **(extra or {}),
        }

    processes = {
        "ext_proc": proc(
            "ext_proc",
            {
                "response_body_messages": messages,
                "cpu_us_per_message": round(
                    (after["ext_proc"].cpu_seconds - before["ext_proc"].cpu_seconds)
                    * 1e6
                    / messages,
                    2,
                )
                if messages
                else None,
                # Below 1: chunks the observer never got to (Envoy does not wait for it).
                "messages_per_chunk_delivered": round(messages / chunks, 3) if chunks else None,
                "peak_streams_active": sampler.peak_ext_proc_streams,
            },
        ),
        "envoy": proc("envoy"),
        "mock": proc("mock"),
    }
    clients = {
        "wrk_cpu_s": round(wrk_cpu, 2),
        "wrk_peak_rss_mib": round(sampler.peak_rss.get("wrk", 0) / MIB, 1),
        "bench_process_cpu_s": round(self_cpu, 2),  # the probes and the sampler
        "cpu_pct_of_one_core": round((wrk_cpu + self_cpu) * 100.0 / window_s, 1)
        if window_s
        else None,
    }
    ours = (
        wrk_cpu
        + self_cpu
        + sum(after[g].cpu_seconds - before[g].cpu_seconds for g in ("ext_proc", "envoy", "mock"))
    )
    # The machine is shared: what the rest of it (other work, Postgres, Redis) used over
    # the same window as the processes' CPU (the streams and the usage rows' wait).
    machine = {
        "cores": os.cpu_count(),
        "window_s": round(window_s, 1),
        "busy_cores": round(machine_busy_s / window_s, 2) if window_s else None,
        "ours_cores": round(ours / window_s, 2) if window_s else None,
        "others_cores": round((machine_busy_s - ours) / window_s, 2) if window_s else None,
    }
    envoy_stats = {
        name: envoy_after[name] - envoy_before.get(name, 0)
        for name in sorted(envoy_after)
        if envoy_after[name] != envoy_before.get(name, 0)
        and not any(name == g for g in _PEAK_GAUGES)
    }
    return {
        "spec": {
            "streams": n,
            "stream_seconds": spec.stream_seconds,
            "chunk_interval_ms": spec.chunk_interval_ms,
            "chunks_per_stream": spec.chunks,
            "ramp_seconds": spec.ramp,
            "probe_streams": spec.probes,
            "wrk_streams": spec.wrk_streams,
            "wrk_threads": spec.wrk_threads,
            "deadline_s": round(spec.deadline_seconds, 1),
        },
        "held_seconds": round(held_s, 2),
        "streams": streams,
        "chunks_delivered": chunks,
        "chunks_expected": n * spec.chunks,
        "pace": pace,
        "processes": processes,
        "clients": clients,
        "machine": machine,
        "rows": {**rows, "written": None, "ok": None},  # after the shutdown flush: run.py
        "envoy_peaks": dict(sorted(sampler.peak_gauges.items())),
        "envoy_stats_delta": envoy_stats,
        "fd_limit": fd_limit,
        "samples": sampler.samples,
    }


def _response_messages(
    before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]]
) -> int:
    """ext_proc messages of the response body phase over the run."""
    total = 0.0
    for phase, (count, _) in after.items():
        if "response_body" in phase:
            total += count - before.get(phase, (0.0, 0.0))[0]
    return int(total)


def failures(report: dict[str, Any]) -> list[str]:
    """What fails the run: a stream not complete, an error, rows != requests sent."""
    out: list[str] = []
    s = report["streams"]
    if not s["ok"]:
        out.append(
            f"open streams: {s['completed_ok']}/{s['requested']} complete "
            f"(statuses {s['statuses']}, socket errors {s['socket_errors']}, "
            f"incomplete {s['incomplete']}, short bodies {s['body_short']}, "
            f"without [DONE] {s['body_without_done']}, resent {s['resent_after_socket_error']})"
        )
    rows = report["rows"]
    if rows["ok"] is False:
        out.append(f"open streams: {rows['written']} usage rows for {rows['sent']} requests sent")
    return out


def format_report(report: dict[str, Any]) -> str:
    """The printed table."""
    spec, s, pace = report["spec"], report["streams"], report["pace"]
    lines = [
        f"open streams: {spec['streams']} x {spec['stream_seconds']:g} s, a chunk every "
        f"{spec['chunk_interval_ms']} ms ({spec['chunks_per_stream']} chunks), ramp "
        f"{spec['ramp_seconds']:g} s; held {report['held_seconds']:.1f} s",
        f"  streams: {s['completed_ok']} complete / {s['requested']}; statuses {s['statuses']}; "
        f"socket errors {s['socket_errors_total']} {s['socket_errors']}; incomplete "
        f"{s['incomplete']}; short {s['body_short']}; no [DONE] {s['body_without_done']}; "
        f"resent {s['resent_after_socket_error']}",
        f"  chunks delivered {report['chunks_delivered']:,} of {report['chunks_expected']:,}",
    ]
    wd, pd = pace["stream_duration_s_wrk"], pace["stream_duration_s_probes"]
    gap = pace["probe_gap_ms"]
    if wd:
        lines.append(
            f"  stream duration (wrk) s: min {wd['min']:.2f} p50 {wd['p50']:.2f} p99 "
            f"{wd['p99']:.2f} max {wd['max']:.2f} (expected {pace['expected_stream_s']:.2f})"
        )
    if pd:
        lines.append(
            f"  stream duration (probes) s: p50 {pd['p50']:.2f} p99 {pd['p99']:.2f} max "
            f"{pd['max']:.2f}"
        )
    first, head = pace["probe_first_chunk_s"], pace["probe_headers_s"]
    if first and head:
        lines.append(
            f"  response headers after (probes) s: p50 {head['p50']:.3f} max {head['max']:.3f}; "
            f"first chunk after: p50 {first['p50']:.3f} p99 {first['p99']:.3f} "
            f"max {first['max']:.3f}"
        )
    if gap:
        lines.append(
            f"  inter-chunk gap (probes) ms: p50 {gap['p50']:.1f} p90 {gap['p90']:.1f} p99 "
            f"{gap['p99']:.1f} max {gap['max']:.1f}; gaps > 2x interval "
            f"{pace['probe_gaps_over_2x_interval']}"
        )
    verdict = "yes" if pace["kept_pace"] else "NO: " + "; ".join(pace["missed"])
    lines.append(f"  kept pace: {verdict} (rule: {pace['rule']})")
    lines.append("")
    lines.append(
        "| process | CPU s | % of a core | ms/stream | µs/chunk | RSS before | peak | after "
        "| KiB per open stream |"
    )
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for name, p in report["processes"].items():
        rss = p["rss_mib"]
        per_chunk = "-" if p["cpu_us_per_chunk"] is None else f"{p['cpu_us_per_chunk']:.1f}"
        lines.append(
            f"| {name} | {p['cpu_s']:.1f} | {p['cpu_pct_of_one_core']} | "
            f"{p['cpu_ms_per_stream']:.1f} | {per_chunk} | {rss['before']:.1f} | "
            f"{rss['peak']:.1f} | {rss['after']:.1f} | {p['rss_kib_per_open_stream']:.1f} |"
        )
    e = report["processes"]["ext_proc"]
    c = report["clients"]
    lines.append(
        f"  ext_proc: {e['response_body_messages']:,} response-body messages, "
        f"{e['cpu_us_per_message']} µs CPU each ({e['messages_per_chunk_delivered']} per chunk "
        f"delivered); peak {e['peak_streams_active']} gRPC streams open"
    )
    lines.append(
        f"  clients: wrk {c['wrk_cpu_s']:.1f} s CPU, bench process (probes, sampler) "
        f"{c['bench_process_cpu_s']:.1f} s ({c['cpu_pct_of_one_core']}% of a core together)"
    )
    m = report["machine"]
    lines.append(
        f"  machine ({m['cores']} cores, shared): {m['busy_cores']} cores busy on average "
        f"over {m['window_s']} s, {m['ours_cores']} of them this run's processes, "
        f"{m['others_cores']} everything else (Postgres, Redis, other work)"
    )
    rows = report["rows"]
    lines.append(
        f"  usage rows: {rows['written']} written for {rows['sent']} requests sent "
        f"({'ok' if rows['ok'] else 'MISMATCH' if rows['ok'] is False else 'not checked'})"
    )
    if report["envoy_peaks"]:
        lines.append(
            "  Envoy peaks: "
            + ", ".join(f"{k.split('.', 1)[1]} {v}" for k, v in report["envoy_peaks"].items())
        )
    notable = {
        k: v for k, v in report["envoy_stats_delta"].items() if any(word in k for word in _NOTABLE)
    }
    if notable:
        listed = ", ".join(f"{k} +{v}" for k, v in notable.items())
        lines.append(f"  Envoy counters of note: {listed}")
    return "\n".join(lines)

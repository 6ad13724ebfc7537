"""The load generators: ``wrk`` with ``post.lua`` / ``stream.lua``, else ``h2load``.

Never a Python client: at a few thousand requests per second it would be the bottleneck
and would steal the cores the system under test needs.

wrk (preferred): the Lua script counts every request it sends, holds an optional fixed
rate (wrk2 is not available: a per-thread schedule in ``delay()``), and stops sending
``duration`` seconds after it starts, then idles until wrk's ``-d`` (one second longer)
ends. So nothing is in flight when wrk exits and ``sent`` is exact: the gateway must have
written exactly that many usage rows.

h2load (fallback when wrk is missing): ``--h1``, ``-D`` for the duration, ``--rps`` per
client for a fixed rate, percentiles from its ``--log-file``. It stops with requests in
flight, so ``sent`` is "started" and the row count can only be checked within the range
[done, started] (``exact_count`` is False).
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ext_proc.procutil import die_with_parent, stop_process

BENCH_DIR = Path(__file__).resolve().parent
POST_SCRIPT = BENCH_DIR / "post.lua"
STREAM_SCRIPT = BENCH_DIR / "stream.lua"
REQUEST_BODY = BENCH_DIR / "request.json"
GRACE_SECONDS = 1  # wrk runs this much longer than it sends: in-flight requests finish
REQUEST_TIMEOUT = "30s"  # slower than this counts as a wrk timeout error

_MARKER = "BENCH_JSON "


class LoadGenError(RuntimeError):
    pass


@dataclass(frozen=True, slots=True)
class LoadSpec:
    url: str
    connections: int
    duration: float  # seconds of sending
    api_key: str | None = None
    stream: bool = False
    chunks: int | None = None  # x-mock-chunks (streams)
    chunk_delay_ms: int = 0  # x-mock-chunk-delay-ms (streams)
    completion_tokens: int | None = None  # x-mock-completion-tokens (the answer's length)
    rate: float | None = None  # fixed total requests/s; None: as fast as it goes
    threads: int = 1
    grace_seconds: int = GRACE_SECONDS  # wrk's -d is this much longer than it sends


@dataclass(slots=True)
class LoadResult:
    tool: str
    sent: int  # requests sent (wrk: exact; h2load: started)
    requests: int  # responses received (any status)
    active_seconds: float  # first request sent .. last response (about)
    latency_ms: dict[str, float]
    errors: dict[str, int]
    exact_count: bool  # True when nothing was in flight at the end (wrk)

    @property
    def rps(self) -> float:
        return self.requests / self.active_seconds if self.active_seconds > 0 else 0.0

    @property
    def error_total(self) -> int:
        return sum(self.errors.values())

    def to_json(self) -> dict[str, object]:
        return {
            "tool": self.tool,
            "sent": self.sent,
            "requests": self.requests,
            "unanswered": self.sent - self.requests,
            "active_seconds": round(self.active_seconds, 4),
            "rps": round(self.rps, 1),
            "latency_ms": self.latency_ms,
            "errors": {**self.errors, "total": self.error_total},
            "exact_count": self.exact_count,
        }


def available_tool() -> str | None:
    """``wrk`` if installed, else ``h2load``, else None."""
    for tool in ("wrk", "h2load"):
        if shutil.which(tool):
            return tool
    return None


def tool_version(tool: str) -> str:
    try:
        argv = [tool, "-v"] if tool == "wrk" else [tool, "--version"]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return tool
    line = (out.stdout or out.stderr).strip().splitlines()
    return line[0] if line else tool


class LoadRun:
    """One running load generator; ``wait()`` returns its result."""

    def __init__(self, tool: str, spec: LoadSpec) -> None:
        self.tool = tool
        self.spec = spec
        self._tmp = tempfile.TemporaryDirectory(prefix="bench-load-")
        self._log_file = Path(self._tmp.name) / "requests.log"
        self.argv = self._wrk_argv() if tool == "wrk" else self._h2load_argv()
        self.started = time.monotonic()
        self._process = subprocess.Popen(
            self.argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            preexec_fn=die_with_parent,
        )

    # ----------------------------------------------------------------- argv

    def _wrk_argv(self) -> list[str]:
        spec = self.spec
        threads = max(1, min(spec.threads, spec.connections))
        args = [f"stop_after={spec.duration:g}", f"threads={threads}"]
        if spec.api_key:
            args.append(f"key={spec.api_key}")
        if spec.completion_tokens is not None:
            args.append(f"completion_tokens={spec.completion_tokens}")
        if spec.stream:
            args.append(f"chunks={spec.chunks or 50}")
            if spec.chunk_delay_ms:
                args.append(f"chunk_delay_ms={spec.chunk_delay_ms}")
        if spec.rate:
            args.append(f"rate={spec.rate:g}")
        return [
            "wrk",
            f"-t{threads}",
            f"-c{spec.connections}",
            f"-d{math.ceil(spec.duration) + spec.grace_seconds}s",
            "--latency",
            "--timeout",
            REQUEST_TIMEOUT,
            "-s",
            str(STREAM_SCRIPT if spec.stream else POST_SCRIPT),
            spec.url,
            "--",
            *args,
        ]

    def _h2load_argv(self) -> list[str]:
        spec = self.spec
        body = REQUEST_BODY.read_text().strip()
        if spec.stream:
            body = body[:-1] + ',"stream":true}'
        body_path = Path(self._tmp.name) / "body.json"
        body_path.write_text(body)
        argv = [
            "h2load",
            "--h1",
            f"-c{spec.connections}",
            f"-t{max(1, min(spec.threads, spec.connections))}",
            f"-D{max(1, round(spec.duration))}",
            "-d",
            str(body_path),
            "-H",
            "content-type: application/json",
            "--log-file",
            str(self._log_file),
        ]
        if spec.api_key:
            argv += ["-H", f"authorization: Bearer {spec.api_key}"]
        if spec.completion_tokens is not None:
            argv += ["-H", f"x-mock-completion-tokens: {spec.completion_tokens}"]
        if spec.stream:
            argv += ["-H", f"x-mock-chunks: {spec.chunks or 50}"]
            if spec.chunk_delay_ms:
                argv += ["-H", f"x-mock-chunk-delay-ms: {spec.chunk_delay_ms}"]
        if spec.rate:
            argv.append(f"--rps={spec.rate / spec.connections:g}")
        argv.append(spec.url)
        return argv

    # ----------------------------------------------------------------- wait

    def wait(
        self, tick: Callable[[], None] | None = None, tick_seconds: float = 10.0
    ) -> LoadResult:
        """Wait for the end (calling ``tick`` every ``tick_seconds`` meanwhile); parse."""
        limit = self.spec.duration + self.spec.grace_seconds + 60
        next_tick = time.monotonic() + tick_seconds
        try:
            while self._process.poll() is None:
                if time.monotonic() - self.started > limit:
                    raise LoadGenError(f"{self.tool} did not finish within {limit:.0f}s")
                if tick is not None and time.monotonic() >= next_tick:
                    tick()
                    next_tick += tick_seconds
                time.sleep(0.1)
            out, err = self._process.communicate()
            if self._process.returncode != 0:
                raise LoadGenError(
                    f"{self.tool} exited with {self._process.returncode}: "
                    f"{(err or out).strip()[-2000:]}"
                )
            if self.tool == "wrk":
                return self._parse_wrk(out, err)
            return self._parse_h2load(out)
        finally:
            self.stop()

    def stop(self) -> None:
        stop_process(self._process, timeout=5)
        with contextlib.suppress(OSError):
            self._tmp.cleanup()

    def _parse_wrk(self, out: str, err: str) -> LoadResult:
        line = next((ln for ln in out.splitlines() if ln.startswith(_MARKER)), None)
        if line is None:
            raise LoadGenError(
                f"wrk printed no summary line; stdout:\n{out[-2000:]}\n{err[-2000:]}"
            )
        data = json.loads(line[len(_MARKER) :])
        lat = data["latency_us"]
        errors = data["errors"]
        requests = int(data["requests"])
        sent = int(data["sent"])
        # Requests were sent over send_window_ms; the last response came about one mean
        # latency later. wrk's own rate divides by -d, which includes the idle grace.
        active = data["send_window_ms"] / 1000.0 + lat["mean"] / 1e6
        if requests == 0 or active <= 0:
            active = data["duration_us"] / 1e6
        return LoadResult(
            tool="wrk",
            sent=sent,
            requests=requests,
            active_seconds=active,
            latency_ms={
                k: round(lat[k] / 1000.0, 3)
                for k in ("p50", "p90", "p99", "p999", "max", "mean", "min")
            },
            errors={
                "non_2xx": int(errors["status"]),  # wrk counts status > 399
                "connect": int(errors["connect"]),
                "read": int(errors["read"]),
                "write": int(errors["write"]),
                "timeout": int(errors["timeout"]),
            },
            # Unanswered when wrk exited (slower than the grace, or lost to a socket
            # error): those may or may not have reached the gateway.
            exact_count=sent == requests,
        )

    def _parse_h2load(self, out: str) -> LoadResult:
        m = re.search(
            r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, "
            r"(\d+) failed, (\d+) errored, (\d+) timeout",
            out,
        )
        codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
        if m is None or codes is None:
            raise LoadGenError(f"cannot parse h2load output:\n{out[-2000:]}")
        _total, started, done, _ok, _failed, errored, timeout = (int(g) for g in m.groups())
        latencies: list[int] = []
        first_start, last_end = None, None
        with contextlib.suppress(FileNotFoundError):
            for row in self._log_file.read_text().splitlines():
                parts = row.split("\t")
                if len(parts) < 3:
                    continue
                start_us, elapsed_us = int(parts[0]), int(parts[2])
                latencies.append(elapsed_us)
                first_start = start_us if first_start is None else min(first_start, start_us)
                end = start_us + elapsed_us
                last_end = end if last_end is None else max(last_end, end)
        latencies.sort()
        active = (
            (last_end - first_start) / 1e6
            if first_start is not None and last_end is not None
            else self.spec.duration
        )
        return LoadResult(
            tool="h2load",
            sent=started,
            requests=done,
            active_seconds=active,
            latency_ms=percentiles_ms(latencies),
            errors={
                "non_2xx": int(codes.group(3)) + int(codes.group(4)),
                "connect": 0,
                "read": errored,
                "write": 0,
                "timeout": timeout,
            },
            exact_count=False,
        )


def percentiles_ms(sorted_us: list[int]) -> dict[str, float]:
    """Latency percentiles in ms of sorted microsecond samples (zeros when none)."""
    if not sorted_us:
        return {k: 0.0 for k in ("p50", "p90", "p99", "p999", "max", "mean", "min")}

    def pct(p: float) -> float:
        index = min(len(sorted_us) - 1, max(0, math.ceil(p / 100.0 * len(sorted_us)) - 1))
        return round(sorted_us[index] / 1000.0, 3)

    return {
        "p50": pct(50),
        "p90": pct(90),
        "p99": pct(99),
        "p999": pct(99.9),
        "max": round(sorted_us[-1] / 1000.0, 3),
        "mean": round(sum(sorted_us) / len(sorted_us) / 1000.0, 3),
        "min": round(sorted_us[0] / 1000.0, 3),
    }


def run_load(
    tool: str,
    spec: LoadSpec,
    tick: Callable[[], None] | None = None,
    tick_seconds: float = 10.0,
) -> LoadResult:
    return LoadRun(tool, spec).wait(tick, tick_seconds)

"""Ratios, goals and the printed table, computed from one run's results.

Only ratios between targets measured in the same run mean anything on a shared 2-core
machine; absolute numbers move ±30% with whatever else runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

Result = dict[str, Any]

# The goals.
GOAL_RPS_16 = 2500.0
GOAL_RPS_OVER_ENVOY = 0.15
GOAL_CPU_MS_PER_REQUEST = 0.35
GOAL_CPU_US_PER_CHUNK = 20.0
GOAL_ADDED_P50_MS = 1.0
GOAL_ADDED_P99_MS = 3.0
GOAL_OVER_LITELLM = 15.0
GOAL_CONNECTIONS = 16


def find(results: list[Result], target: str, connections: int) -> Result | None:
    for r in results:
        if r["target"] == target and r["connections"] == connections:
            return r
    return None


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def _rps(r: Result | None) -> float | None:
    return None if r is None else float(r["rps"])


def _cpu_ms(r: Result | None, process: str) -> float | None:
    if r is None:
        return None
    value = r["cpu_ms_per_request"].get(process)
    return None if value is None else float(value)


def _body_messages(r: Result | None) -> float | None:
    if r is None:
        return None
    value = (r.get("ext_proc_messages_per_request") or {}).get("response_body")
    return None if value is None else float(value)


def compute_ratios(results: list[Result], chunks: int) -> dict[str, Any]:
    """Per connection count: gateway vs Envoy alone and vs LiteLLM, ext_proc CPU per
    request and per streamed chunk; and the latency the gateway adds at 1 connection."""
    per_conn: dict[str, dict[str, float | None]] = {}
    for c in sorted({int(r["connections"]) for r in results}):
        envoy = find(results, "envoy", c)
        gateway = find(results, "gateway", c)
        stream = find(results, "stream", c)
        litellm = find(results, "litellm", c)
        gw_cpu = _cpu_ms(gateway, "ext_proc")
        st_cpu = _cpu_ms(stream, "ext_proc")
        per_chunk = per_message = None
        if gw_cpu is not None and st_cpu is not None and chunks > 0:
            per_chunk = (st_cpu - gw_cpu) * 1000.0 / chunks
        # How many response-body messages the 50 chunks really took: a mock answering at
        # once lets Envoy coalesce them, a real model spaces them (one message each).
        st_msgs = _body_messages(stream)
        gw_msgs = _body_messages(gateway)
        if st_cpu is not None and gw_cpu is not None and st_msgs is not None:
            extra = st_msgs - (gw_msgs if gw_msgs is not None else 1.0)
            if extra > 0.05:
                per_message = (st_cpu - gw_cpu) * 1000.0 / extra
        per_conn[str(c)] = {
            "gateway_over_envoy_rps": _ratio(_rps(gateway), _rps(envoy)),
            "stream_over_envoy_rps": _ratio(_rps(stream), _rps(envoy)),
            "gateway_over_litellm_rps": _ratio(_rps(gateway), _rps(litellm)),
            "ext_proc_cpu_ms_per_request": gw_cpu,
            "ext_proc_cpu_ms_per_stream_request": st_cpu,
            "ext_proc_cpu_us_per_streamed_chunk": per_chunk,
            "stream_response_body_messages_per_request": st_msgs,
            "ext_proc_cpu_us_per_extra_response_body_message": per_message,
            "envoy_cpu_ms_per_request_alone": _cpu_ms(envoy, "envoy"),
            "envoy_cpu_ms_per_request_with_ext_proc": _cpu_ms(gateway, "envoy"),
            "litellm_cpu_ms_per_request": _cpu_ms(litellm, "litellm"),
        }
    added: dict[str, float | None] = {"p50": None, "p99": None}
    envoy1, gateway1 = find(results, "envoy", 1), find(results, "gateway", 1)
    if envoy1 is not None and gateway1 is not None:
        for p in ("p50", "p99"):
            added[p] = float(gateway1["latency_ms"][p]) - float(envoy1["latency_ms"][p])
    return {
        "by_connections": per_conn,
        "added_latency_ms_at_1_connection": added,
        "streamed_chunks_per_request": chunks,
    }


@dataclass(frozen=True, slots=True)
class Goal:
    name: str
    target: str
    value: str
    met: bool | None  # None: not measured in this run

    def to_json(self) -> dict[str, Any]:
        return {"goal": self.name, "target": self.target, "measured": self.value, "met": self.met}


def _fmt(value: float | None, unit: str = "", digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}{unit}"


def _goal_conns(results: list[Result]) -> int | None:
    measured = sorted({int(r["connections"]) for r in results if r["target"] == "gateway"})
    if not measured:
        return None
    return GOAL_CONNECTIONS if GOAL_CONNECTIONS in measured else measured[-1]


def evaluate_goals(
    results: list[Result], ratios: dict[str, Any], soak: dict[str, Any] | None
) -> list[Goal]:
    goals: list[Goal] = []
    c = _goal_conns(results)
    at = f" @{c} conns" if c is not None and c != GOAL_CONNECTIONS else ""
    gateway = find(results, "gateway", c) if c is not None else None
    row = ratios["by_connections"].get(str(c), {}) if c is not None else {}

    rps = _rps(gateway)
    over_envoy = row.get("gateway_over_envoy_rps")
    share = None if over_envoy is None else over_envoy * 100
    met = None
    if rps is not None and over_envoy is not None and c == GOAL_CONNECTIONS:
        met = rps >= GOAL_RPS_16 and over_envoy >= GOAL_RPS_OVER_ENVOY
    goals.append(
        Goal(
            "throughput, full policy chain, non-streaming, 16 connections",
            f">= {GOAL_RPS_16:,.0f} rps and >= {GOAL_RPS_OVER_ENVOY:.0%} of Envoy alone",
            f"{_fmt(rps, ' rps', 0)}, {_fmt(share, '%', 1)} of Envoy alone{at}",
            met,
        )
    )
    cpu = row.get("ext_proc_cpu_ms_per_request")
    goals.append(
        Goal(
            "ext_proc CPU per non-streaming request",
            f"<= {GOAL_CPU_MS_PER_REQUEST} ms",
            _fmt(cpu, " ms", 3) + at,
            None if cpu is None else cpu <= GOAL_CPU_MS_PER_REQUEST,
        )
    )
    chunk = row.get("ext_proc_cpu_us_per_streamed_chunk")
    value = _fmt(chunk, " us", 1) + at
    messages = row.get("stream_response_body_messages_per_request")
    chunks = int(ratios.get("streamed_chunks_per_request") or 0)
    if chunk is not None and messages is not None and messages < 0.9 * chunks:
        per_message = row.get("ext_proc_cpu_us_per_extra_response_body_message")
        value += (
            f" (CAVEAT: the {chunks} chunks reached ext_proc in {messages:.1f} response-body "
            f"messages; per message {_fmt(per_message, ' us', 0)}; see --chunk-delay-ms)"
        )
    goals.append(
        Goal(
            "ext_proc CPU per streamed chunk",
            f"<= {GOAL_CPU_US_PER_CHUNK:g} us",
            value,
            None if chunk is None else chunk <= GOAL_CPU_US_PER_CHUNK,
        )
    )
    added = ratios["added_latency_ms_at_1_connection"]
    for p, limit in (("p50", GOAL_ADDED_P50_MS), ("p99", GOAL_ADDED_P99_MS)):
        value = added.get(p)
        goals.append(
            Goal(
                f"added latency over Envoy alone, 1 connection, {p}",
                f"<= {limit:g} ms",
                _fmt(value, " ms", 3),
                None if value is None else value <= limit,
            )
        )
    over_litellm = row.get("gateway_over_litellm_rps")
    goals.append(
        Goal(
            "throughput vs LiteLLM (same mock, same connections)",
            f">= {GOAL_OVER_LITELLM:g}x",
            _fmt(over_litellm, "x", 1) + at,
            None if over_litellm is None else over_litellm >= GOAL_OVER_LITELLM,
        )
    )
    if soak is None:
        goals.append(Goal("soak: RSS flat", "flat", "not run (--soak SECONDS)", None))
        goals.append(Goal("soak: rows written = requests sent", "equal", "not run", None))
    else:
        rss = soak["rss"]
        goals.append(
            Goal(
                "soak: ext_proc RSS flat",
                rss["flat_rule"],
                f"first {rss['first_mib']:.1f} MiB, last {rss['last_mib']:.1f} MiB, "
                f"max {rss['max_mib']:.1f} MiB, slope {rss['slope_mib_per_hour']:+.1f} MiB/h",
                bool(rss["flat"]),
            )
        )
        rows = soak["rows"]
        goals.append(
            Goal(
                "soak: rows written = requests sent",
                "equal",
                f"{rows['written']} rows, {rows['sent']} sent",
                bool(rows["ok"]),
            )
        )
    return goals


# ----------------------------------------------------------------- printing

_COLUMNS = (
    ("target", 8, "<"),
    ("conns", 5, ">"),
    ("rps", 8, ">"),
    ("p50 ms", 7, ">"),
    ("p99 ms", 7, ">"),
    ("max ms", 8, ">"),
    ("errors", 6, ">"),
    ("ext_proc ms/req", 15, ">"),
    ("envoy ms/req", 12, ">"),
    ("litellm ms/req", 14, ">"),
    ("ext_proc RSS MiB", 16, ">"),
    ("rows", 9, ">"),
)


def _cell(value: object, width: int, align: str) -> str:
    text = str(value)
    return f"{text:{align}{width}}"


def format_table(results: list[Result]) -> str:
    header = "  ".join(_cell(name, w, a) for name, w, a in _COLUMNS)
    lines = [header, "-" * len(header)]
    for r in results:
        cpu = r["cpu_ms_per_request"]
        rss = r["rss_mib"].get("ext_proc")
        rows = r.get("rows")
        values = (
            r["target"],
            r["connections"],
            f"{r['rps']:.0f}",
            f"{r['latency_ms']['p50']:.2f}",
            f"{r['latency_ms']['p99']:.2f}",
            f"{r['latency_ms']['max']:.1f}",
            r["errors"]["total"],
            _fmt(cpu.get("ext_proc"), "", 3),
            _fmt(cpu.get("envoy"), "", 3),
            _fmt(cpu.get("litellm"), "", 2),
            "-" if rss is None else f"{rss['start']:.0f}->{rss['end']:.0f}",
            "-" if rows is None else ("ok" if rows["ok"] else f"{rows['written']}!={rows['sent']}"),
        )
        lines.append(
            "  ".join(_cell(v, w, a) for v, (_, w, a) in zip(values, _COLUMNS, strict=True))
        )
    return "\n".join(lines)


def format_ratios(ratios: dict[str, Any]) -> str:
    lines = []
    for c, row in ratios["by_connections"].items():
        parts = [f"{c:>3} conns:"]
        if row["gateway_over_envoy_rps"] is not None:
            parts.append(f"gateway/Envoy-alone {row['gateway_over_envoy_rps']:.3f}")
        if row["stream_over_envoy_rps"] is not None:
            parts.append(f"stream/Envoy-alone {row['stream_over_envoy_rps']:.3f}")
        if row["gateway_over_litellm_rps"] is not None:
            parts.append(f"gateway/LiteLLM {row['gateway_over_litellm_rps']:.1f}x")
        if row["ext_proc_cpu_ms_per_request"] is not None:
            parts.append(f"ext_proc {row['ext_proc_cpu_ms_per_request']:.3f} ms/req")
        if row["ext_proc_cpu_us_per_streamed_chunk"] is not None:
            parts.append(f"{row['ext_proc_cpu_us_per_streamed_chunk']:.1f} us/chunk")
        if row["stream_response_body_messages_per_request"] is not None:
            parts.append(
                f"({row['stream_response_body_messages_per_request']:.1f} body msgs/stream"
                + (
                    f", {row['ext_proc_cpu_us_per_extra_response_body_message']:.0f} us/msg)"
                    if row["ext_proc_cpu_us_per_extra_response_body_message"] is not None
                    else ")"
                )
            )
        lines.append("  ".join(parts))
    added = ratios["added_latency_ms_at_1_connection"]
    if added["p50"] is not None:
        lines.append(
            f"added latency at 1 connection: p50 {added['p50']:+.3f} ms, p99 {added['p99']:+.3f} ms"
        )
    return "\n".join(lines)


def format_goals(goals: list[Goal]) -> str:
    lines = []
    for g in goals:
        mark = {True: "MET    ", False: "NOT MET", None: "n/a    "}[g.met]
        lines.append(f"  [{mark}] {g.name}: {g.value}  (goal {g.target})")
    return "\n".join(lines)

"""One table from the results: every system side by side, ratios to the floor and to ttyd, and
the performance targets judged."""

from __future__ import annotations

from typing import Any

COLUMNS = ("web", "ssh", "ssh_openssh", "floor_attach", "floor_ssh", "ttyd")
FLOOR = "floor_ssh"  # the floor for our design: asyncssh straight into the container's sshd
# (label, result key, statistic, unit, higher is better)
ROWS = (
    ("connect→prompt, cold (median of {runs})", "connect", "median_ms", "ms", False),
    ("connect→prompt, warm pool (median of {runs})", "pool_connect", "median_ms", "ms", False),
    ("keystroke echo (median of {echo_samples})", "echo", "median_ms", "ms", False),
    ("keystroke echo (p99 of {echo_samples})", "echo", "p99_ms", "ms", False),
    ("throughput, {megabytes:g} MB of base64 (median of {rounds})", "throughput", "mb_per_s", "MB/s", True),
    ("close→container gone (median of {runs})", "close_gone", "median_ms", "ms", False),
)


def value(systems: dict[str, Any], key: str, row_key: str, stat: str) -> float | None:
    entry = systems.get(key) or {}
    cell = entry.get(row_key)
    if isinstance(cell, dict) and stat in cell:
        return float(cell[stat])
    return None


def _fmt(v: float | None, unit: str) -> str:
    if v is None:
        return ""
    return f"{v:.3g} {unit}" if v < 10 else f"{v:.0f} {unit}"


def cell(systems: dict[str, Any], key: str, row_key: str, stat: str, unit: str) -> str:
    entry = systems.get(key) or {}
    if "skipped" in entry:
        return entry["skipped"]
    if "error" in entry:
        return "error"
    if row_key == "pool_connect":
        if key not in ("web", "ssh"):
            return "—"
        if "pool_skipped" in entry:
            return entry["pool_skipped"]
    return _fmt(value(systems, key, row_key, stat), unit) or "—"


def ratio(systems: dict[str, Any], key: str, ref: str, row_key: str, stat: str) -> str:
    mine = value(systems, key, row_key, stat)
    ref_key = "connect" if row_key == "pool_connect" else row_key
    theirs = value(systems, ref, ref_key, stat)
    if mine is None or not theirs:
        return ""
    return f"{mine / theirs:.2f}×"


def table(results: dict[str, Any]) -> str:
    systems = results["systems"]
    header = ["", *(systems.get(k, {}).get("title", k) for k in COLUMNS),
              "web ÷ floor", "web ÷ ttyd", "ssh ÷ floor", "ssh ÷ ttyd"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, row_key, stat, unit, _ in ROWS:
        cells = [label.format(**results["settings"]), *(cell(systems, k, row_key, stat, unit) for k in COLUMNS)]
        cells += [ratio(systems, door, ref, row_key, stat) for door in ("web", "ssh") for ref in (FLOOR, "ttyd")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The performance targets, each met, missed, or not judged (and why)."""
    systems = results["systems"]
    out: list[dict[str, Any]] = []

    def judge(name: str, mine: float | None, ref: float | None, limit: float, higher: bool, why: str) -> None:
        if mine is None or not ref:
            out.append({"target": name, "status": "not judged", "why": why})
            return
        r = mine / ref
        met = r >= limit if higher else r <= limit
        out.append({"target": name, "status": "met" if met else "MISSED", "ratio": round(r, 2)})

    for door in ("web", "ssh"):
        if "connect" not in (systems.get(door) or {}):
            continue
        v = lambda k, rk, st: value(systems, k, rk, st)  # noqa: E731
        judge(f"{door}: cold connect→prompt ≤ 1.25× the SSH floor",
              v(door, "connect", "median_ms"), v(FLOOR, "connect", "median_ms"), 1.25, False, "floor not measured")
        judge(f"{door}: connect→prompt with the pool ≤ 0.5× ttyd",
              v(door, "pool_connect", "median_ms"), v("ttyd", "connect", "median_ms"), 0.5, False,
              (systems.get(door) or {}).get("pool_skipped") or "ttyd not measured")
        judge(f"{door}: echo median ≤ ttyd's",
              v(door, "echo", "median_ms"), v("ttyd", "echo", "median_ms"), 1.0, False, "ttyd not measured")
        judge(f"{door}: throughput ≥ 1.2× ttyd",
              v(door, "throughput", "mb_per_s"), v("ttyd", "throughput", "mb_per_s"), 1.2, True, "ttyd not measured")
    for door in ("ssh", "ssh_openssh"):  # the SSH door at the web door's speed, with either client
        if "echo" not in (systems.get(door) or {}):
            continue
        judge(f"{door}: echo median ≤ 1.0× ttyd's", value(systems, door, "echo", "median_ms"),
              value(systems, "ttyd", "echo", "median_ms"), 1.0, False, "ttyd not measured")
        judge(f"{door}: throughput ≥ 0.95× the web door's", value(systems, door, "throughput", "mb_per_s"),
              value(systems, "web", "throughput", "mb_per_s"), 0.95, True, "web door not measured")
    scale = results.get("scale") or {}
    if "idle_echo" in scale:
        name = "scale: 250 live sessions, idle echo p99 ≤ 5 ms, gateway RSS ≤ 300 MB"
        if scale["sessions"] < 250:
            out.append({"target": name, "status": "not judged", "why": f"ran {scale['sessions']} sessions"})
        else:
            p99 = scale["idle_echo"]["p99_ms"]
            rss = max(scale["gateway_rss_mb"].values())
            met = p99 <= 5 and rss <= 300
            out.append({"target": name, "status": "met" if met else "MISSED", "p99_ms": p99, "rss_mb": rss})
        if "floor_idle_echo" in scale:
            name = "scale: the gateway's own part of idle echo p99 (gateway − straight into containers) ≤ 1 ms"
            own = round(scale["idle_echo"]["p99_ms"] - scale["floor_idle_echo"]["p99_ms"], 2)
            out.append({"target": name, "status": "met" if own <= 1 else "MISSED", "own_p99_ms": own})
    return out


def scale_text(scale: dict[str, Any]) -> str:
    if "error" in scale:
        return f"scale run failed: {scale['error']}"
    echo = scale["idle_echo"]
    jitter = scale.get("host_jitter", {})
    rss = scale["gateway_rss_mb"]
    lines = [
        f"scale: {scale['sessions']} live web sessions ({scale['streaming']} streaming, {scale['stream']}); "
        f"all started in {scale['all_started_s']} s, all containers gone {scale['all_gone_s']} s after exit",
        f"  idle echo: p50 {echo['median_ms']} ms, p99 {echo['p99_ms']} ms, max {echo['max_ms']} ms ({echo['n']} probes)",
        *([f"  floor (straight into containers, same moment): p50 {scale['floor_idle_echo']['median_ms']} ms, "
           f"p99 {scale['floor_idle_echo']['p99_ms']} ms, max {scale['floor_idle_echo']['max_ms']} ms"]
          if "floor_idle_echo" in scale else []),
        f"  host scheduling (a 1 ms sleep's lateness meanwhile): p50 {jitter.get('median_ms')} ms, "
        f"p99 {jitter.get('p99_ms')} ms, max {jitter.get('max_ms')} ms; all CPUs {scale.get('host_cpu_busy_percent')}% busy",
        f"  gateway: RSS {rss['before']} MB before, {rss['live']} MB live, {rss['after_probes']} MB after probes "
        f"({scale['gateway_rss_per_session_kb']} kB/session); CPU {scale['gateway_cpu_percent']}% of one core while probing",
        f"  host memory: {scale['host_mem_per_session_mb']} MB/session (MemAvailable drop); "
        f"container cgroup: {scale['container_cgroup_mem_per_session_mb']} MB/session",
    ]
    if "streamed" in scale:
        s = scale["streamed"]
        lines.append(f"  streamed: {s.get('mb_per_s', '?')} MB/s in total over {s.get('seconds', '?')} s"
                     + (f" ({s['error']})" if "error" in s else ""))
    return "\n".join(lines)

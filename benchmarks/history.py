"""Results kept: every run appends one line of JSON to a history (benchmarks/results/, ignored by
git), so `python -m benchmarks report` can show the latest numbers beside the previous
comparable run's and a regression is visible rather than remembered.

Comparable means the same machine (CPU model, core count, memory) and the same kind of run
measuring the same systems: a table's change against a run on other hardware, or against a run
that skipped ttyd, would say nothing.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

from . import report
from .harness import ROOT

HISTORY = ROOT / "benchmarks" / "results" / "history.jsonl"
REGRESSION = 10.0  # percent worse than the previous run before a cell is flagged


def git_commit() -> str:
    """The checkout's commit, `+dirty` when the tree has changes (the numbers are of that code)."""
    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "--short=12", "HEAD") or "unknown"
    return commit + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def append(results: dict[str, Any], kind: str, path: Path = HISTORY) -> dict[str, Any]:
    """One history line: the results with what makes them comparable (kind, machine, commit,
    command, time)."""
    entry = {"kind": kind, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "commit": git_commit(), **results}
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as out:
        out.write(json.dumps(entry) + "\n")
    return entry


def load(path: Path = HISTORY) -> list[dict[str, Any]]:
    """Every entry, oldest first; a line that does not parse (an interrupted write) is skipped."""
    if not path.exists():
        return []
    entries = []
    for line in path.read_text().splitlines():
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return entries


def _machine_key(entry: dict[str, Any]) -> tuple[Any, ...]:
    m = entry.get("machine_before") or {}
    return m.get("cpu"), m.get("cpus"), m.get("mem_total_mb")


def measured(entry: dict[str, Any]) -> frozenset[str]:
    """The systems a compare run actually measured (not skipped, not failed)."""
    return frozenset(k for k, v in (entry.get("systems") or {}).items() if "skipped" not in v and "error" not in v)


def comparable(a: dict[str, Any], b: dict[str, Any]) -> bool:
    if a.get("kind") != b.get("kind") or _machine_key(a) != _machine_key(b):
        return False
    if a.get("kind") == "burst":
        keys = ("n", "one_address")
        return all(a.get("settings", {}).get(k) == b.get("settings", {}).get(k) for k in keys)
    if a.get("kind") == "watch" and a.get("settings", {}).get("across") != b.get("settings", {}).get("across"):
        return False
    return measured(a) == measured(b)


def latest_pair(entries: list[dict[str, Any]], kind: str) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """The newest entry of `kind` and the newest earlier one comparable with it."""
    of_kind = [e for e in entries if e.get("kind") == kind]
    if not of_kind:
        return None, None
    latest = of_kind[-1]
    previous = next((e for e in reversed(of_kind[:-1]) if comparable(latest, e)), None)
    return latest, previous


def change(now: float | None, before: float | None, higher_is_better: bool) -> str:
    """`+12%` (and `⚠` when that is more than REGRESSION percent worse)."""
    if now is None or not before:
        return ""
    pct = (now - before) / before * 100
    worse = -pct if higher_is_better else pct
    return f"{pct:+.0f}%" + (" ⚠" if worse > REGRESSION else "")


def compare_table(latest: dict[str, Any], previous: dict[str, Any] | None) -> str:
    """The latest table; with a previous comparable run, each cell carries its change."""
    text = report.table(latest)
    if previous is None:
        return text
    lines = text.splitlines()
    out = lines[:2]
    for line, (_, row_key, stat, _unit, higher) in zip(lines[2:], report.ROWS):
        cells = line.strip("|").split(" | ")
        for i, key in enumerate(report.COLUMNS, start=1):
            delta = change(report.value(latest["systems"], key, row_key, stat),
                           report.value(previous["systems"], key, row_key, stat), higher)
            if delta:
                cells[i] = f"{cells[i].strip()} ({delta})"
        out.append("| " + " | ".join(c.strip() for c in cells) + " |")
    return "\n".join(out)


def burst_lines(latest: dict[str, Any], previous: dict[str, Any] | None) -> list[str]:
    """One line per burst (pool size, or ttyd) with its change in p95 against the previous run."""
    lines = []
    before = {b["label"]: b for b in (previous or {}).get("bursts", [])}
    for burst in latest.get("bursts", []):
        if "skipped" in burst:
            lines.append(f"- {burst['label']}: {burst['skipped']}")
            continue
        t = burst.get("login_prompt") or {}
        old = (before.get(burst["label"]) or {}).get("login_prompt") or {}
        delta = change(t.get("p95_ms"), old.get("p95_ms"), False)
        lines.append(
            f"- {burst['label']}: p50 {t.get('median_ms')} ms, p95 {t.get('p95_ms')} ms, max {t.get('max_ms')} ms"
            f"{f' (p95 {delta})' if delta else ''}; {burst['failed']} failed of {burst['n']}; "
            f"load {burst['load_before']} → {burst['load_after']}"
        )
    return lines


def watch_lines(entry: dict[str, Any], previous: dict[str, Any] | None = None) -> list[str]:
    """The watch run: owner's keystroke → admin's screen, and the owner's own echo beside it."""
    lines = []
    view = "admin's watch view on another gateway (relayed over Redis)" if (entry.get("settings") or {}).get("across") \
        else "admin's watch view"
    for key, label in (("owner_keystroke_to_admin_screen", f"owner's keystroke → {view}"),
                       ("owner_echo", "owner's own echo (same keystrokes)")):
        t = entry.get(key) or {}
        old = (previous or {}).get(key) or {}
        delta = change(t.get("median_ms"), old.get("median_ms"), False)
        lines.append(f"- {label}: median {t.get('median_ms')} ms, p95 {t.get('p95_ms')} ms, max {t.get('max_ms')} ms "
                     f"(n={t.get('n')}){f' (median {delta})' if delta else ''}")
    return lines


def describe(entry: dict[str, Any]) -> str:
    m = entry.get("machine_before") or {}
    return (f"{entry.get('time')}, commit {entry.get('commit')}, `{entry.get('command')}`; "
            f"{m.get('cpus')} × {m.get('cpu', '?')}, {m.get('mem_total_mb')} MB, Docker {m.get('docker')}, "
            f"load average {m.get('load_avg')} before")


def text(entries: list[dict[str, Any]]) -> str:
    """What `report` prints: the latest compare table and burst, each against its previous run."""
    parts = []
    latest, previous = latest_pair(entries, "compare")
    if latest is not None:
        parts += [f"Latest run: {describe(latest)}",
                  f"Change against: {describe(previous)}" if previous else "No earlier comparable run.",
                  "", compare_table(latest, previous)]
    burst, burst_before = latest_pair(entries, "burst")
    if burst is not None:
        parts += ["" if parts else "", f"Latest burst: {describe(burst)}",
                  f"Change against: {describe(burst_before)}" if burst_before else "No earlier comparable burst.",
                  *burst_lines(burst, burst_before)]
    watch, watch_before = latest_pair(entries, "watch")
    if watch is not None:
        parts += ["", f"Latest watch latency: {describe(watch)}", *watch_lines(watch, watch_before)]
    return "\n".join(parts).strip() if parts else "No benchmark results yet: run `python -m benchmarks`."


def _about(entry: dict[str, Any]) -> list[str]:
    m = entry.get("machine_before") or {}
    return [
        f"Command: `{entry.get('command')}` (commit {entry.get('commit')}, {entry.get('time')}).",
        f"Machine: {m.get('cpus')} × {m.get('cpu', '?')}, {m.get('mem_total_mb')} MB, kernel {m.get('kernel')}, "
        f"Docker {m.get('docker')}; load average {m.get('load_avg')} before.",
    ]


def burst_table(entry: dict[str, Any]) -> str:
    """A burst run as a table: login→prompt per burst, failures, the host's load."""
    n = entry.get("settings", {}).get("n")
    lines = [f"| {n} logins at once | p50 | p95 | max | failed | load before → after |", "|---|---|---|---|---|---|"]
    seconds = lambda ms: f"{ms / 1000:.2f} s" if ms is not None else "—"  # noqa: E731
    for burst in entry.get("bursts", []):
        if "skipped" in burst:
            lines.append(f"| {burst['label']} | {burst['skipped']} | | | | |")
            continue
        t = burst.get("login_prompt") or {}
        lines.append(f"| {burst['label']} | {seconds(t.get('median_ms'))} | {seconds(t.get('p95_ms'))} | "
                     f"{seconds(t.get('max_ms'))} | {burst['failed']} | {burst['load_before'][0]} → {burst['load_after'][0]} |")
    return "\n".join(lines)


def markdown(entries: list[dict[str, Any]]) -> str:
    """The README's blocks: the latest compare table and the latest burst, each with its machine
    and command."""
    latest, _ = latest_pair(entries, "compare")
    burst, _ = latest_pair(entries, "burst")
    if latest is None and burst is None:
        return "No run in the history yet."
    parts: list[str] = []
    if latest is not None:
        parts += [*_about(latest), "", report.table(latest)]
    if burst is not None:
        parts += ["" if parts else "", *_about(burst), "", burst_table(burst)]
    return "\n".join(parts[1:] if parts[0] == "" else parts)

"""The benchmark cannot rot: its quick mode runs here, through the real gateway, Docker and PAM.
No timing is asserted (speed belongs to benchmarks/); only that every column measured what it
says, or says plainly why it did not."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import history, report, ttyd
from benchmarks.harness import BENCH_LABEL, containers, percentile, summary
from helpers import ROOT, TEST_IMAGE

PROMPT_LIMIT_MS = 120_000  # burst's own timeout: a slower login counts as failed


def test_quick_mode_measures_every_column(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--json", str(out), "--history", str(tmp_path / "h.jsonl")],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads(out.read_text())
    systems = results["systems"]

    for key in ["web", "ssh", "ssh_openssh", "floor_attach", "floor_ssh"]:
        entry = systems[key]
        assert entry["connect"]["n"] == 2 and entry["close_gone"]["n"] == 2, (key, entry)
        assert entry["echo"]["n"] == 20, (key, entry)
        assert entry["throughput"]["bytes"] >= 2_000_000, (key, entry)
        assert 0 < entry["connect"]["median_ms"] < 60_000 and entry["close_gone"]["median_ms"] > 0
    for door in ["web", "ssh"]:  # the warm pool, through both doors
        assert systems[door]["pool_connect"]["n"] == 2, systems[door]
    # Quick mode never builds ttyd: it is measured only where a ttyd is already installed.
    if ttyd.find() is None:
        assert "ttyd not built" in systems["ttyd"]["skipped"], systems["ttyd"]
    else:
        assert systems["ttyd"]["echo"]["n"] == 20, systems["ttyd"]

    scale = results["scale"]
    assert scale["sessions"] == 4 and scale["containers_live"] == 4, scale
    assert scale["idle_echo"]["n"] == 20 and scale["streamed"]["bytes"] > 0, scale
    assert scale["gateway_rss_mb"]["live"] > 0

    assert "| connect→prompt, cold (median of 2) |" in done.stdout
    # The run is kept: one history entry with what makes it comparable.
    [entry] = history.load(tmp_path / "h.jsonl")
    assert entry["kind"] == "compare" and entry["run"] == results["run"] and entry["command"].endswith("h.jsonl")
    assert entry["machine_before"]["cpu"] and entry["machine_before"]["docker"] and entry["commit"]
    assert len(entry["machine_before"]["load_avg"]) == 3 and entry["time"]
    # Everything it started is gone: its gateways' containers, its floors', ttyd's.
    assert not containers(**{BENCH_LABEL: results["run"]})
    assert not containers(**{"termbridge.gateway": f"bench-{results['run']}"})
    for instance in results["gateways"]:
        assert not containers(**{"termbridge.gateway": instance})


def test_percentiles_are_nearest_rank() -> None:
    samples = [i / 1000 for i in range(1, 201)]  # 1..200 ms
    assert percentile(samples, 50) == 0.1
    assert percentile(samples, 99) == 0.198
    stats = summary(list(reversed(samples)))
    assert stats["n"] == 200 and stats["median_ms"] == 100.5 and stats["p99_ms"] == 198 and stats["max_ms"] == 200


def test_ratios_and_targets() -> None:
    results = {
        "settings": {"runs": 10, "echo_samples": 200, "megabytes": 50, "rounds": 3},
        "systems": {
            "web": {"title": "web", "connect": {"median_ms": 400}, "echo": {"median_ms": 0.5, "p99_ms": 2},
                    "throughput": {"mb_per_s": 30}, "close_gone": {"median_ms": 100},
                    "pool_skipped": "n/a (--pool 0)"},
            "ssh": {"title": "ssh", "skipped": "n/a (not in --systems)"},
            "floor_ssh": {"title": "floor", "connect": {"median_ms": 300}},
            "ttyd": {"title": "ttyd", "connect": {"median_ms": 200}, "echo": {"median_ms": 0.6},
                     "throughput": {"mb_per_s": 20}},
        }
    }
    verdicts = {t["target"]: t for t in report.targets(results)}
    assert verdicts["web: cold connect→prompt ≤ 1.25× the SSH floor"]["status"] == "MISSED"
    assert verdicts["web: cold connect→prompt ≤ 1.25× the SSH floor"]["ratio"] == 1.33
    assert verdicts["web: echo median ≤ ttyd's"]["status"] == "met"
    assert verdicts["web: throughput ≥ 1.2× ttyd"]["status"] == "met"
    assert verdicts["web: connect→prompt with the pool ≤ 0.5× ttyd"] == {
        "target": "web: connect→prompt with the pool ≤ 0.5× ttyd", "status": "not judged", "why": "n/a (--pool 0)"
    }
    assert not any(t.startswith("ssh:") for t in verdicts)
    results["systems"]["ssh_openssh"] = {"title": "ssh, OpenSSH client", "echo": {"median_ms": 0.7},
                                         "throughput": {"mb_per_s": 29}}
    verdicts = {t["target"]: t for t in report.targets(results)}
    assert verdicts["ssh_openssh: echo median ≤ 1.0× ttyd's"] == {
        "target": "ssh_openssh: echo median ≤ 1.0× ttyd's", "status": "MISSED", "ratio": 1.17}
    assert verdicts["ssh_openssh: throughput ≥ 0.95× the web door's"]["status"] == "met"
    results["scale"] = {"sessions": 250, "idle_echo": {"p99_ms": 2.2}, "floor_idle_echo": {"p99_ms": 0.9},
                        "gateway_rss_mb": {"live": 96}}
    [own] = [t for t in report.targets(results) if "own part" in t["target"]]
    assert own["status"] == "MISSED" and own["own_p99_ms"] == 1.3
    text = report.table(results)
    assert "| connect→prompt, cold (median of 10) | 400 ms | n/a (not in --systems) |" in text
    assert "| throughput, 50 MB of base64 (median of 3) | 30 MB/s |" in text
    assert "| 1.33× | 2.00× |" in text


@pytest.mark.parametrize(
    "files",
    [
        {"sources.list.d/debian.sources": "Types: deb\nURIs: http://mirror.test/debian/\nSuites: bookworm bookworm-updates\n"
                                          "Components: main\n\nTypes: deb\nURIs: http://mirror.test/debian-security\n"
                                          "Suites: bookworm-security\nComponents: main\n"},
        {"sources.list": "# comment\ndeb http://mirror.test/debian-security bookworm-security main\n"
                         "deb [arch=amd64] http://mirror.test/debian bookworm main\n"},
    ],
    ids=["deb822", "one-line"],
)
def test_debian_mirror_comes_from_the_configured_sources(tmp_path: Path, files: dict[str, str]) -> None:
    (tmp_path / "sources.list.d").mkdir()
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    assert ttyd.debian_mirror(tmp_path) == "http://mirror.test/debian"


def test_no_debian_sources_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "sources.list.d").mkdir()
    with pytest.raises(RuntimeError, match="no Debian archive entry"):
        ttyd.debian_mirror(tmp_path)


def test_holder_benchmark_measures_both_paths() -> None:
    """`python -m benchmarks.holder`: the same container straight through sshd's pty and through
    the session holder, both measured, the cost computed."""
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.holder", "--image", TEST_IMAGE, "--runs", "1", "--echo-samples", "10",
         "--megabytes", "1", "--rounds", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = json.loads(done.stdout)
    for key in ("floor_ssh", "holder_ssh"):
        entry = out["results"][key]
        assert entry["echo"]["n"] == 10 and entry["throughput"]["bytes"] >= 1_000_000, entry
    assert set(out["holder_cost"]) == {"echo_median_pct", "echo_p99_pct", "throughput_pct"}


@pytest.mark.parametrize("across", [False, True], ids=["one gateway", "across two gateways"])
def test_watch_benchmark_times_the_admins_view(tmp_path, across) -> None:
    """`python -m benchmarks watch`: each keystroke timed to the admin's view and to the owner,
    printed and appended to the history, which `report` then shows. `--across`: the admin
    watches through a second gateway process, the bytes relayed over a real redis-server."""
    path = tmp_path / "h.jsonl"
    done = subprocess.run([sys.executable, "-m", "benchmarks", "watch", "--samples", "5", "--history", str(path),
                           *(["--across"] if across else [])],
                          cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    view = "admin's watch view on another gateway (relayed over Redis)" if across else "admin's watch view"
    assert f"owner's keystroke → {view}: median" in done.stdout
    [entry] = history.load(path)
    assert entry["kind"] == "watch" and entry["settings"]["across"] is across
    assert entry["owner_keystroke_to_admin_screen"]["n"] == entry["owner_echo"]["n"] == 5
    shown = subprocess.run([sys.executable, "-m", "benchmarks", "report", "--history", str(path)],
                           cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert "Latest watch latency" in shown.stdout


def _entry(load: float, web_connect: float, ttyd_connect: float | None, cpu: str = "Test CPU") -> dict:
    systems = {"web": {"title": "web door", "connect": {"median_ms": web_connect}, "echo": {"median_ms": 0.5},
                       "throughput": {"mb_per_s": 20.0}}}
    systems["ttyd"] = ({"title": "ttyd", "connect": {"median_ms": ttyd_connect}} if ttyd_connect
                       else {"title": "ttyd", "skipped": "skipped (--no-ttyd)"})
    return {"command": "python -m benchmarks", "settings": {"runs": 10, "echo_samples": 200, "megabytes": 50, "rounds": 3},
            "machine_before": {"cpu": cpu, "cpus": 2, "mem_total_mb": 1000, "docker": "20.10", "load_avg": [load, 0, 0]},
            "systems": systems}


def _burst(n: int, p95: float, failed: int = 0) -> dict:
    stats = {"n": n - failed, "median_ms": p95 / 2, "p95_ms": p95, "max_ms": p95 + 1}
    return {"command": "python -m benchmarks burst", "settings": {"n": n, "pools": [0, n], "one_address": False},
            "machine_before": {"cpu": "Test CPU", "cpus": 2, "mem_total_mb": 1000, "load_avg": [1.0, 0, 0]},
            "bursts": [{"label": f"web door, pool {n}", "n": n, "failed": failed, "login_prompt": stats,
                        "load_before": [1.0], "load_after": [2.0]}]}


def test_report_shows_the_change_against_the_previous_comparable_run(tmp_path: Path) -> None:
    """Two runs on one machine: `report` prints the latest table with each cell's change, a
    regression flagged; runs on other hardware, or measuring other systems, are not compared."""
    path = tmp_path / "history.jsonl"
    history.append(_entry(1.0, 400, 250), "compare", path)
    history.append(_entry(1.0, 100, 250, cpu="Other CPU"), "compare", path)  # other machine
    history.append(_entry(1.0, 100, None), "compare", path)  # ttyd skipped: other systems
    history.append(_entry(2.5, 500, 240), "compare", path)
    history.append(_burst(10, 2000), "burst", path)
    history.append(_burst(5, 100), "burst", path)  # another burst size
    history.append(_burst(10, 1500, failed=1), "burst", path)
    with path.open("a") as out:
        out.write('{"kind": "compare", "interrupt\n')  # a torn last line is skipped

    done = subprocess.run([sys.executable, "-m", "benchmarks", "report", "--history", str(path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "| connect→prompt, cold (median of 10) | 500 ms (+25% ⚠) |" in out
    assert "| 240 ms (-4%) |" in out  # ttyd got faster: no flag
    assert "| throughput, 50 MB of base64 (median of 3) | 20 MB/s (+0%) |" in out
    assert "load average [2.5, 0, 0] before" in out and "load average [1.0, 0, 0] before" in out
    assert "web door, pool 10: p50 750.0 ms, p95 1500 ms, max 1501 ms (p95 -25%); 1 failed of 10" in out

    entries = history.load(path)
    assert len(entries) == 7 and all(e["commit"] and e["time"] for e in entries)
    latest, previous = history.latest_pair(entries, "compare")
    assert previous is entries[0] and latest is entries[3]
    alone = history.text(entries[:1])
    assert "No earlier comparable run." in alone and "(+" not in alone

    markdown = subprocess.run([sys.executable, "-m", "benchmarks", "report", "--markdown", "--history", str(path)],
                              cwd=ROOT, capture_output=True, text=True, timeout=60).stdout
    assert markdown.startswith("Command: `python -m benchmarks` (commit ")
    assert "Machine: 2 × Test CPU, 1000 MB" in markdown and "| 500 ms |" in markdown and "⚠" not in markdown
    assert "| 10 logins at once | p50 | p95 | max | failed | load before → after |" in markdown
    assert "| web door, pool 10 | 0.75 s | 1.50 s | 1.50 s | 1 | 1.0 → 2.0 |" in markdown


def test_report_without_history_says_so(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "benchmarks", "report", "--history", str(tmp_path / "none.jsonl")],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "No benchmark results yet" in done.stdout


def test_burst_releases_logins_together(tmp_path: Path) -> None:
    """`burst`: three distinct PAM accounts log in through the web door at once, cold and with
    the pool sized to the burst; the Docker floor takes the same burst; all in the history."""
    path = tmp_path / "history.jsonl"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "burst", "--n", "3", "--pools", "0,3", "--history", str(path)],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    [entry] = history.load(path)
    assert entry["kind"] == "burst" and entry["settings"]["n"] == 3
    bursts = {b["label"]: b for b in entry["bursts"]}
    for label in ("web door, pool 0", "web door, pool 3", "floor: docker attach"):
        burst = bursts[label]
        assert burst["failed"] == 0 and burst["login_prompt"]["n"] == 3, burst
        assert 0 < burst["login_prompt"]["p95_ms"] < PROMPT_LIMIT_MS and len(burst["load_before"]) == 3
    for label in ("web door, pool 0", "web door, pool 3"):  # the audit log saw three logins and starts
        assert bursts[label]["release_to_pam_ok"]["n"] == 3 and bursts[label]["session_startup"]["n"] == 3
    if ttyd.find() is None:
        assert "not built" in bursts["ttyd + docker run"]["skipped"]
    assert "web door, pool 3: p50" in done.stdout
    assert not containers(**{BENCH_LABEL: entry["run"]})
    for instance in entry["gateways"]:
        assert not containers(**{"termbridge.gateway": instance})

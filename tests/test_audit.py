"""Audit events and session recording, through the real gateway, real PAM users, real containers
and real files."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import stat
import sys
from pathlib import Path
from urllib.parse import urlencode

import asyncssh
import pytest
from aiohttp import web

from bridge.app import SSH_DOOR, build_app
from bridge.audit import AsciicastRecorder, AuditLog
from bridge import logsafe
from bridge.auth import AuthenticatedUser
from bridge.config import SessionConfig, load_config
from bridge.backends.docker import DockerBackend
from bridge.errors import ConfigError
from bridge.logsafe import SafeFormatter
from bridge.session import Session
from bridge.web.keys import MANAGER
from helpers import (
    PROMPT, TEST_IMAGE, containers_gone, csrf_token, free_port, metric, scrape, wait_for, write_config,
)

TS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def events(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


async def event(path: Path, kind: str, **match) -> dict:
    """The first audit event of `kind` whose fields include `match` (waits for it)."""
    found: list[dict] = []

    def look() -> bool:
        found[:] = [e for e in events(path) if e["event"] == kind and all(e.get(k) == v for k, v in match.items())]
        return bool(found)

    await wait_for(look, what=f"audit event {kind} {match}")
    return found[0]


async def echo_and_exit(term, word: str, exit_command: str) -> None:
    await term.send(f"echo {word}\r")
    await term.expect(f"{word}\r\n".encode())
    await term.send(exit_command + "\r")
    await term.control("exit")


async def test_logins_and_a_session_are_audited(start_gateway, user, tmp_path):
    log = tmp_path / "audit" / "audit.log"
    log.parent.mkdir()
    gateway = await start_gateway(audit={"log": str(log)})
    assert stat.S_IMODE(log.stat().st_mode) == 0o640

    assert await gateway.attempt_login(user.name, "wrong-" + user.password) == 401
    denied = await event(log, "login", ok=False)
    assert denied["user"] == user.name and denied["door"] == "web" and denied["rhost"] == "127.0.0.1"
    assert denied["result"] == "denied" and "Authentication failure" in denied["reason"]

    async with await gateway.login(user) as http:
        accepted = await event(log, "login", ok=True)
        assert accepted["result"] == "ok" and accepted["reason"] == "" and accepted["user"] == user.name
        term = await gateway.terminal(http)
        session = await term.control("session")
        await term.expect(PROMPT)
        await echo_and_exit(term, "hello-audit", "exit 3")
        end = await event(log, "session_end", session=session["id"])

    start = await event(log, "session_start", session=session["id"])
    assert start["user"] == user.name and start["door"] == "web" and start["image"] == TEST_IMAGE
    assert re.fullmatch(r"[0-9a-f]{64}", start["container"])
    assert start["container_name"] == f"termbridge-{session['id'][:8]}"
    assert start["startup_ms"] > 0
    assert end["container"] == start["container"] and end["image"] == TEST_IMAGE
    assert (end["reason"], end["code"]) == ("exit", 3)
    assert end["bytes_in"] == len(b"echo hello-audit\rexit 3\r")
    assert end["bytes_out"] >= len(b"hello-audit\r\n") and end["duration"] > 0
    gateway_id = (gateway.config.state_dir / "instance-id").read_text().strip()
    for e in events(log):
        assert TS.match(e["ts"]) and e["gateway"] == gateway_id
    assert user.password not in log.read_text()


async def test_refusals_and_kills_are_audited_and_counted(start_gateway, user, tmp_path):
    log = tmp_path / "audit.log"
    gateway = await start_gateway(audit={"log": str(log)}, session={"max_per_user": 1})
    async with await gateway.login(user) as http:
        first = await gateway.terminal(http)
        session = await first.control("session")
        second = await gateway.terminal(http)
        await second.control("error")
        refused = await event(log, "session_refused")
        assert refused["user"] == user.name and refused["door"] == "web"
        assert "session.max_per_user=1" in refused["reason"]
        samples = await scrape(gateway.url)
        assert metric(samples, "termbridge_session_starts_total", door="web", result="refused") == 1

        token = await csrf_token(http, "/")
        resp = await http.post("/logout", data={"csrf": token}, headers={"Origin": gateway.origin}, allow_redirects=False)
        assert resp.status == 303
        kill = await event(log, "session_kill", session=session["id"])
        assert kill["by"] == "logout" and kill["user"] == user.name
        end = await event(log, "session_end", session=session["id"])
        assert end["reason"] == "killed" and end["code"] is None
        samples = await scrape(gateway.url)
        assert metric(samples, "termbridge_session_ends_total", door="web", reason="killed") == 1
    await containers_gone(**{"termbridge.session": session["id"]})


async def test_empty_audit_log_goes_to_the_termbridge_audit_logger(gateway, user, caplog):
    caplog.set_level(logging.INFO, logger="termbridge.audit")
    async with await gateway.login(user):
        pass
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "termbridge.audit"]
    assert [(e["event"], e["user"], e["ok"]) for e in lines] == [("login", user.name, True)]


def test_audit_file_is_reopened_after_logrotate_moves_it(tmp_path):
    path = tmp_path / "audit.log"
    audit = AuditLog(str(path), gateway="g1")
    audit.login("alice", "192.0.2.7", "ssh", "denied", "no such user")
    path.rename(tmp_path / "audit.log.1")
    audit.emit("containers_reaped", count=2)
    audit.close()
    [old] = events(tmp_path / "audit.log.1")
    assert old["event"] == "login" and old["door"] == "ssh" and old["rhost"] == "192.0.2.7"
    [new] = events(path)
    assert new == {"ts": new["ts"], "event": "containers_reaped", "gateway": "g1", "count": 2}


async def test_unwritable_audit_log_stops_the_gateway_with_the_key(tmp_path, pam_service, state_dir):
    path = write_config(tmp_path / "gw.toml", state_dir(), pam_service, audit={"log": "/proc/termbridge/audit.log"})
    runner = web.AppRunner(build_app(load_config(path, env={})))
    with pytest.raises(ConfigError, match="'audit.log'"):
        await runner.setup()
    await runner.cleanup()


# -- recording ------------------------------------------------------------------------------------


def read_cast(path: Path) -> tuple[dict, list[list]]:
    header, *lines = path.read_text(encoding="utf-8").splitlines()
    return json.loads(header), [json.loads(line) for line in lines]


async def test_a_web_session_is_recorded_as_asciicast_v2(start_gateway, user, tmp_path):
    record_dir = tmp_path / "casts"
    gateway = await start_gateway(audit={"record_dir": str(record_dir)})
    assert stat.S_IMODE(record_dir.stat().st_mode) == 0o700
    async with await gateway.login(user) as http:
        term = await gateway.terminal(http, cols=100, rows=30)
        session = await term.control("session")
        await term.expect(PROMPT)
        await term.resize(120, 40)
        assert (await term.run("stty size")).strip() == "40 120"
        # multibyte characters, split over chunks by the shell, come out whole
        await term.send("printf 'gr\\303\\274\\303\\237e \\342\\202\\254 %.0s' $(seq 300); echo; exit\r")
        await term.control("exit")
        await term.drain_until_closed()
    await containers_gone(**{"termbridge.session": session["id"]})

    path = record_dir / f"{session['id']}.cast"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    header, items = read_cast(path)
    assert header["version"] == 2 and (header["width"], header["height"]) == (100, 30)
    assert abs(header["timestamp"] - path.stat().st_mtime) < 600
    assert user.name in header["title"]
    shown = "".join(data for _, code, data in items if code == "o")
    assert shown == term.transcript.decode("utf-8")
    assert "grüße € " * 300 in shown
    assert [data for _, code, data in items if code == "r"] == ["120x40"]
    assert not [item for item in items if item[1] == "i"]
    times = [t for t, _, _ in items]
    assert times == sorted(times) and times[0] >= 0


async def test_input_is_recorded_only_when_configured(start_gateway, user, tmp_path):
    record_dir = tmp_path / "casts"
    gateway = await start_gateway(audit={"record_dir": str(record_dir), "record_input": True})
    async with await gateway.login(user) as http:
        term = await gateway.terminal(http)
        session = await term.control("session")
        await term.expect(PROMPT)
        await echo_and_exit(term, "typed-here", "exit")
    await containers_gone(**{"termbridge.session": session["id"]})
    _, items = read_cast(record_dir / f"{session['id']}.cast")
    assert "".join(data for _, code, data in items if code == "i") == "echo typed-here\rexit\r"


def _session() -> Session:
    return Session(AuthenticatedUser("alice", 1000, 1000), "ssh", sink=None)  # type: ignore[arg-type]


async def test_recorder_through_the_note_seam_a_door_without_a_pty_size_at_start(tmp_path):
    """Doors feed recordings only through Session.note_*: here as a door that learns its pty size
    late (the SSH door) would. The header takes the first size; later sizes are `r` events."""
    session = _session()
    recorder = AsciicastRecorder(tmp_path / "s.cast", session, limit=10_000)
    session.taps.append(recorder)
    session.note_resize(132, 43)
    session.note_output("caf\u00e9 ".encode()[:4])  # the é is split across two chunks
    session.note_output("caf\u00e9 ".encode()[4:])
    session.note_input(b"secret\r")
    session.note_resize(80, 24)
    session.note_output(b"\xff\r\n")  # not UTF-8: recorded as U+FFFD, never dropped
    recorder.close()
    header, items = read_cast(tmp_path / "s.cast")
    assert (header["width"], header["height"]) == (132, 43)
    assert [(code, data) for _, code, data in items] == [("o", "caf"), ("o", "\u00e9 "), ("r", "80x24"), ("o", "\ufffd\r\n")]


async def test_recording_stops_at_its_limit_and_the_session_goes_on(tmp_path):
    session = _session()
    recorder = AsciicastRecorder(tmp_path / "s.cast", session, limit=2000)
    for _ in range(100):
        recorder.output(b"x" * 100)
    assert not recorder.recording
    recorder.close()
    _, items = read_cast(tmp_path / "s.cast")
    assert items[-1][1:] == ["m", "recording stopped: audit.record_limit reached"]
    assert sum(len(d) for _, c, d in items if c == "o") < 2000
    assert os.path.getsize(tmp_path / "s.cast") <= 2000


def test_the_record_limit_counts_bytes_on_disk_not_characters(tmp_path):
    """Bytes that are not UTF-8 are recorded as U+FFFD, three bytes each: 20 MB of them once made
    a 60 MB file, and a 1 MiB limit let the file reach 3 MB."""
    recorder = AsciicastRecorder(tmp_path / "s.cast", _session(), limit=1024**2)
    chunk = b"\x80" * 65536
    for _ in range(20_000_000 // len(chunk)):
        recorder.output(chunk)
    recorder.close()
    assert os.path.getsize(tmp_path / "s.cast") <= 1024**2
    _, items = read_cast(tmp_path / "s.cast")
    assert items[-1][1:] == ["m", "recording stopped: audit.record_limit reached"]


async def test_recording_flushes_while_the_session_runs(tmp_path):
    session = _session()
    recorder = AsciicastRecorder(tmp_path / "s.cast", session)
    recorder.output(b"still running\r\n")
    await wait_for(lambda: "still running" in (tmp_path / "s.cast").read_text(), timeout=5, what="flush")
    recorder.close()
    await asyncio.sleep(0)


async def test_an_admin_kill_is_audited(start_gateway, user, tmp_path):
    log = tmp_path / "audit.log"
    gateway = await start_gateway(audit={"log": str(log)})
    async with await gateway.login(user) as http:
        term = await gateway.terminal(http)
        session = await term.control("session")
        manager = gateway.app[MANAGER]
        await manager.kill(manager.get(session["id"]))  # what `termbridge sessions kill` does
        exit_message = await term.control("exit")
        assert exit_message["reason"] == "killed" and "administrator" in exit_message["message"]
    kill = await event(log, "session_kill", session=session["id"])
    assert kill["by"] == "admin"
    assert (await event(log, "session_end", session=session["id"]))["reason"] == "killed"


async def test_a_start_that_fails_is_audited_with_its_detail(start_gateway, user, tmp_path):
    log = tmp_path / "audit.log"
    nowhere = f"unix://{tmp_path}/no-docker.sock"
    backend = DockerBackend(SessionConfig(image=TEST_IMAGE), "unreachable", base_url=nowhere)
    gateway = await start_gateway(backend=backend, audit={"log": str(log)})
    async with await gateway.login(user) as http:
        term = await gateway.terminal(http)
        assert (await term.control("exit"))["reason"] == "error"
    failed = await event(log, "session_failed")
    assert failed["user"] == user.name and failed["door"] == "web" and failed["reason"] == "error"
    assert failed["container"] is None and "Docker engine unreachable" in failed["detail"]
    assert not [e for e in events(log) if e["event"] in ("session_start", "session_end")]


# -- exit statuses, at both doors -------------------------------------------------------------------


async def ssh_client(port: int, user, *args: str, known_hosts: Path) -> tuple[int, str]:
    """Debian's OpenSSH client through sshpass: (its exit status, its stderr)."""
    proc = await asyncio.create_subprocess_exec(
        "sshpass", "-e", "ssh", "-F", "/dev/null", "-o", f"UserKnownHostsFile={known_hosts}",
        "-o", "StrictHostKeyChecking=no", "-p", str(port), f"{user.name}@127.0.0.1", *args,
        env={**os.environ, "SSHPASS": user.password}, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode, err.decode(errors="replace")


async def test_ssh_exit_status_and_signal_reach_session_end(start_gateway, user, tmp_path):
    log = tmp_path / "audit.log"
    gateway = await start_gateway(audit={"log": str(log)}, ssh={"listen": "127.0.0.1:0"})
    port = gateway.app[SSH_DOOR].port
    status, err = await ssh_client(port, user, "exit 3", known_hosts=tmp_path / "kh")
    assert status == 3, err
    end = await event(log, "session_end", door="ssh")
    assert (end["reason"], end["code"], end["signal"]) == ("exit", 3, None)
    assert end["channels"] == [{"kind": "exec", "ended": "exit", "code": 3, "signal": None}]

    status, err = await ssh_client(port, user, "kill -TERM $$", known_hosts=tmp_path / "kh")
    assert status == 255, err  # how OpenSSH reports a remote command killed by a signal
    await wait_for(lambda: len([e for e in events(log) if e["event"] == "session_end"]) == 2, what="second end")
    end = [e for e in events(log) if e["event"] == "session_end"][-1]
    assert (end["reason"], end["code"], end["signal"]) == ("exit", None, "TERM")


async def test_ssh_session_end_takes_the_last_command_of_several_channels(start_gateway, user, tmp_path):
    """One connection, one session, three channels: sftp, then two commands; the session's code is
    the last command's, and every channel's end is in the record. A client that drops the
    connection while a command still runs is `disconnected`."""
    log = tmp_path / "audit.log"
    gateway = await start_gateway(audit={"log": str(log)}, ssh={"listen": "127.0.0.1:0"})
    port = gateway.app[SSH_DOOR].port
    options = {"username": user.name, "password": user.password, "known_hosts": None, "client_keys": None,
               "agent_path": None, "config": [], "preferred_auth": "password"}
    async with asyncssh.connect("127.0.0.1", port, **options) as conn:
        async with conn.start_sftp_client() as sftp:
            await sftp.listdir(".")
        assert (await conn.run("exit 1")).exit_status == 1
        assert (await conn.run("echo hi; exit 4")).exit_status == 4
    end = await event(log, "session_end", door="ssh")
    assert (end["reason"], end["code"]) == ("exit", 4)
    assert [(c["kind"], c["ended"], c["code"]) for c in end["channels"]] == [
        ("sftp", "exit", 0), ("exec", "exit", 1), ("exec", "exit", 4)
    ]

    async with asyncssh.connect("127.0.0.1", port, **options) as conn:
        process = await conn.create_process("sleep 60")
        await wait_for(lambda: len([e for e in events(log) if e["event"] == "session_start"]) == 2,
                       what="second session")
        assert (await conn.run("exit 2")).exit_status == 2  # a later command ended, the first runs on
        conn.abort()
        del process
    await wait_for(lambda: len([e for e in events(log) if e["event"] == "session_end"]) == 2, what="second end")
    end = [e for e in events(log) if e["event"] == "session_end"][-1]
    assert (end["reason"], end["code"]) == ("disconnected", None)

    async with asyncssh.connect("127.0.0.1", port, **options) as conn:  # more channels than are kept
        for i in range(70):
            assert (await conn.run(f"exit {i % 7}")).exit_status == i % 7
    await wait_for(lambda: len([e for e in events(log) if e["event"] == "session_end"]) == 3, what="third end")
    end = [e for e in events(log) if e["event"] == "session_end"][-1]
    assert (end["reason"], end["code"]) == ("exit", 69 % 7)
    assert [c["code"] for c in end["channels"]] == [i % 7 for i in range(6, 70)]


async def web_session_end(gateway, http, log: Path, command: str) -> dict:
    """Run `command` at a fresh shell of the web door; the session's `session_end` event."""
    term = await gateway.terminal(http)
    session = await term.control("session")
    await term.expect(PROMPT)
    await term.send(command + "\r")
    await term.control("exit")
    return await event(log, "session_end", session=session["id"])


async def test_web_exit_status_and_signal_reach_session_end(start_gateway, user, tmp_path):
    log = tmp_path / "audit.log"
    gateway = await start_gateway(audit={"log": str(log)})
    async with await gateway.login(user) as http:
        end = await web_session_end(gateway, http, log, "exit 5")
        assert (end["reason"], end["code"], end["signal"], end["channels"]) == ("exit", 5, None, [])
        end = await web_session_end(gateway, http, log, "kill -KILL $$")
        assert (end["reason"], end["code"], end["signal"]) == ("exit", None, "KILL")


# -- recordings on disk: bytes, and the directory as a whole -------------------------------------

NOT_UTF8 = "head -c 5000000 /dev/zero | tr '\\0' '\\200'"


def cast_sizes(record_dir: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in record_dir.glob("*.cast")}


async def test_a_recording_stays_under_its_limit_in_bytes_at_both_doors(start_gateway, user, tmp_path):
    """5 MB of bytes that are not UTF-8, with `record_limit = "1m"`: each door's recording ends
    at most 1 MiB on disk, with its marker, and the audit trail says the recording stopped."""
    record_dir, log = tmp_path / "casts", tmp_path / "audit.log"
    gateway = await start_gateway(audit={"record_dir": str(record_dir), "record_limit": "1m", "log": str(log)},
                                  ssh={"listen": "127.0.0.1:0"})
    async with await gateway.login(user) as http:
        end = await web_session_end(gateway, http, log, f"{NOT_UTF8}; exit")
    status, err = await ssh_client(gateway.app[SSH_DOOR].port, user, NOT_UTF8, known_hosts=tmp_path / "kh")
    assert status == 0, err
    ssh_end = await event(log, "session_end", door="ssh")
    for session in (end["session"], ssh_end["session"]):
        await containers_gone(**{"termbridge.session": session})
        path = record_dir / f"{session}.cast"
        assert 512 * 1024 < path.stat().st_size <= 1024**2, path.stat().st_size
        _, items = read_cast(path)
        assert items[-1][1:] == ["m", "recording stopped: audit.record_limit reached"]
        stopped = await event(log, "recording_stopped", session=session)
        assert stopped["reason"] == "audit.record_limit" and stopped["file"] == path.name
    assert end["bytes_out"] >= 5_000_000 and ssh_end["bytes_out"] >= 5_000_000  # the sessions went on


async def test_the_recordings_directory_keeps_under_its_limit(start_gateway, user, tmp_path):
    """`record_dir_limit = "600k"`: a new recording makes room by removing the oldest finished
    ones (an audit event each); a live recording that alone would cross the cap stops there."""
    record_dir, log = tmp_path / "casts", tmp_path / "audit.log"
    gateway = await start_gateway(
        audit={"record_dir": str(record_dir), "record_dir_limit": "600k", "log": str(log)},
        ssh={"listen": "127.0.0.1:0"},
    )
    cap = 600 * 1024
    async with await gateway.login(user) as http:
        first = await web_session_end(gateway, http, log, "head -c 300000 /dev/zero | tr '\\0' a; exit")
        await containers_gone(**{"termbridge.session": first["session"]})
        assert list(cast_sizes(record_dir)) == [f"{first['session']}.cast"]
        second = await web_session_end(gateway, http, log, "head -c 400000 /dev/zero | tr '\\0' b; exit")
        await containers_gone(**{"termbridge.session": second["session"]})
    sizes = cast_sizes(record_dir)
    assert list(sizes) == [f"{second['session']}.cast"] and sum(sizes.values()) <= cap
    removed = await event(log, "recording_removed", file=f"{first['session']}.cast")
    assert removed["reason"] == "audit.record_dir_limit" and removed["bytes"] > 300_000

    # through the SSH door: a recording larger than the whole cap
    status, err = await ssh_client(gateway.app[SSH_DOOR].port, user, "head -c 900000 /dev/zero | tr '\\0' c",
                                   known_hosts=tmp_path / "kh")
    assert status == 0, err
    third = await event(log, "session_end", door="ssh")
    await containers_gone(**{"termbridge.session": third["session"]})
    sizes = cast_sizes(record_dir)
    assert list(sizes) == [f"{third['session']}.cast"] and sum(sizes.values()) <= cap
    await event(log, "recording_removed", file=f"{second['session']}.cast")
    stopped = await event(log, "recording_stopped", session=third["session"])
    assert stopped["reason"] == "audit.record_dir_limit"
    _, items = read_cast(record_dir / f"{third['session']}.cast")
    assert items[-1][1:] == ["m", "recording stopped: audit.record_dir_limit reached"]


# -- the text log cannot be forged -------------------------------------------------------------------

LOG_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: ")
RAW_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
FORGED = "2026-01-01 00:00:00,000 ERROR termbridge: [fake]"


def forged_lines(text: str) -> list[str]:
    """Lines of a gateway log that are neither a record's first line nor a traceback's `| ` line,
    and raw control characters anywhere (split on \\n only, as a log reader would)."""
    bad = [line for line in text.split("\n") if line and not LOG_LINE.match(line) and not line.startswith("| ")]
    return bad + RAW_CONTROLS.findall(text)


def test_safe_formatter_escapes_the_message_and_marks_traceback_lines():
    formatter = SafeFormatter(logsafe.FORMAT)
    try:
        raise ValueError(f"bad name\n{FORGED}\x1b[2J")
    except ValueError:
        record = logging.LogRecord("termbridge.x", logging.WARNING, __file__, 1, "upload of %r: %s",
                                   ("a\u2028b", "c\x85d\ne\x9bf\x7f\tg\u202eh"), sys.exc_info())
    text = formatter.format(record)
    first, *rest = text.split("\n")
    assert first.endswith("upload of 'a\\u2028b': c\\x85d\\ne\\x9bf\\x7f\tg\\u202eh")
    assert rest[0] == "| Traceback (most recent call last):"
    assert rest[-2:] == ["| ValueError: bad name", f"| {FORGED}\\x1b[2J"]
    assert forged_lines(text.replace(first, "2026-01-01 00:00:00,000 WARNING termbridge.x: -")) == []
    assert "c\x85d\ne" in record.getMessage()  # other handlers see the record as it was


async def test_untrusted_text_cannot_forge_gateway_log_lines(gateway_process, user, tmp_path):
    """`termbridge serve` with its log on a file; what people control reaches it: an SSH client's
    disconnect reason, a login name, file names with C1 controls and line separators (uploaded
    and downloaded), a query parameter. Every line of the log is still one of the gateway's."""
    ssh_port = free_port()
    process = gateway_process(ssh={"listen": f"127.0.0.1:{ssh_port}"}, audit={"log": str(tmp_path / "audit.log")})
    await process.start()
    gateway = process.gateway

    assert await gateway.attempt_login(f"nobody\n{FORGED} login", "x") == 401
    name = f"up\x85{FORGED}\x9b2J\u2028{FORGED}\u2029\u202e.txt"
    async with await gateway.login(user) as http:
        term = await gateway.terminal(http, path="/ws?" + urlencode({"session": "\n[fake]\x1b[2J"}))
        session = (await term.control("session"))["id"]
        await term.expect(PROMPT)
        params = {"session": session, "path": name}
        resp = await http.put("/files/upload", params=params, data=b"x", headers={"Origin": gateway.origin})
        assert resp.status == 201, await resp.text()
        resp = await http.get("/files/download", params=params)
        assert resp.status == 200 and await resp.read() == b"x"
        resp = await http.get("/files/download", params={"session": session, "path": f"a\n{FORGED}"})
        assert resp.status == 400
        await term.send("exit\r")
        await term.control("exit")

    options = {"username": user.name, "password": user.password, "known_hosts": None, "client_keys": None,
               "agent_path": None, "config": [], "preferred_auth": "password"}
    async with asyncssh.connect("127.0.0.1", ssh_port, **options) as conn:
        await conn.create_process("sleep 60")
        await wait_for(lambda: "channel opened: exec" in process.log(), what="the ssh session")
        conn.disconnect(asyncssh.DISC_CONNECTION_LOST, f"bye\n{FORGED} disconnect\r\x1b[1A\x85\u2028")
    await wait_for(lambda: "ssh connection from 127.0.0.1 closed" in process.log(), what="the disconnect logged")
    await wait_for(lambda: process.log().count("ended: reason=") == 2, what="both sessions ended")

    text = process.log()
    assert forged_lines(text) == [], text[-4000:]
    # what was sent is still there for the admin to read, escaped
    assert f"bye\\n{FORGED} disconnect\\r\\x1b[1A\\x85\\u2028" in text
    assert f"up\\x85{FORGED}\\x9b2J\\u2028" in text
    assert "reattach of" in text and "\\n[fake]\\x1b[2J" in text
    audit = (tmp_path / "audit.log").read_text()
    assert not RAW_CONTROLS.search(audit) and all(json.loads(line) for line in audit.split("\n") if line)
    typed = f"nobody\n{FORGED} login"  # no account's name: audited by its length only
    assert any(e["event"] == "login" and e["user"] == f"<unknown name, {len(typed)} chars>"
               for e in events(tmp_path / "audit.log"))

"""The audit trail and session recording: who logged in, who ran which session, and what it showed.

Audit events are JSON lines with stable field names (README, "Audit log"), written to
`audit.log` or, when that is empty, through the `termbridge.audit` logger. Recordings are
asciicast v2 files, one per session, fed by the doors' `Session.note_*` calls, so every door is
recorded alike. Both are `SessionObserver`s, attached by the composition root.
"""

from __future__ import annotations

import asyncio
import codecs
import json
import logging
import logging.handlers
import os
import re
import stat
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO

from .auth import AuthenticatedUser
from .config import DEFAULT_PROFILE
from .errors import ConfigError
from .logsafe import SafeFormatter
from .observers import SessionObserver
from .session import Session, Viewer
from .vocab import Actor, AdminEvent, Door, LoginResult

log = logging.getLogger("termbridge.audit")

MAX_NAME = 64
FLUSH_AFTER = 1.0


def utc_now() -> str:
    """RFC 3339 in UTC with milliseconds, e.g. 2025-11-27T04:10:00.123Z."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _open_private(path: Path, mode: int) -> None:
    """Create `path` with `mode` if it is missing, so that a new log or recording is never world-readable."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, mode)
    os.close(fd)


class AuditLog:
    """Writes one JSON object per line. A file target is reopened when logrotate moves it."""

    def __init__(self, target: str, gateway: str = "") -> None:
        self.gateway = gateway
        self.target = target
        self._handler: logging.Handler | None = None
        if target:
            path = Path(target)
            try:
                _open_private(path, 0o640)
                self._handler = logging.handlers.WatchedFileHandler(path, encoding="utf-8")
            except OSError as exc:
                raise ConfigError(f"'audit.log' {target!r} cannot be opened: {exc.strerror}") from None
            self._handler.setFormatter(SafeFormatter("%(message)s"))
            # A logger of its own, outside the logging tree: audit lines go to the file only.
            self._logger = logging.Logger("termbridge.audit.file", logging.INFO)
            self._logger.addHandler(self._handler)
        else:
            self._logger = log

    def emit(self, event: str, **fields: Any) -> dict[str, Any]:
        """One JSON line; json.dumps's ASCII output escapes every control and line separator."""
        record = {"ts": utc_now(), "event": event, "gateway": self.gateway, **fields}
        self._logger.info("%s", json.dumps(record, default=str))
        return record

    def login(self, user: str, rhost: str | None, door: Door, result: LoginResult, reason: str = "") -> None:
        """One login attempt at any door. Never give it the password."""
        self.emit("login", user=user[:MAX_NAME], rhost=rhost or "", door=door, ok=result == LoginResult.OK,
                  result=result, reason=reason)

    def close(self) -> None:
        if self._handler is not None:
            self._logger.removeHandler(self._handler)
            self._handler.close()
            self._handler = None


def _session_fields(session: Session) -> dict[str, Any]:
    return {
        "session": session.id,
        "user": session.user.name,
        "door": session.door,
        "profile": session.profile,
        "container": session.container.id if session.container else None,
    }


class AuditObserver(SessionObserver):
    """Turns the session manager's events into audit lines."""

    def __init__(self, audit: AuditLog, image: str) -> None:
        """`image`: [session]'s, for sessions that carry no profile settings of their own."""
        self.audit = audit
        self.image = image

    def _image(self, session: Session) -> str:
        return session.settings.image if session.settings is not None else self.image

    def login(self, user: str, rhost: str | None, door: Door, result: LoginResult, reason: str) -> None:
        self.audit.login(user, rhost, door, result, reason)

    def session_started(self, session: Session, seconds: float) -> None:
        self.audit.emit(
            "session_start", **_session_fields(session), image=self._image(session),
            container_name=session.container.name if session.container else None,
            started=session.started_at.isoformat(timespec="seconds"), startup_ms=round(seconds * 1000),
        )

    def session_failed(self, session: Session, detail: str) -> None:
        self.audit.emit("session_failed", **_session_fields(session), image=self._image(session),
                        reason=session.end_reason, detail=detail)

    def session_ended(self, session: Session) -> None:
        lived = time.monotonic() - session.ready_at if session.ready_at is not None else 0.0
        self.audit.emit(
            "session_end", **_session_fields(session), image=self._image(session), reason=session.end_reason,
            code=session.exit_code, signal=session.exit_signal, channels=session.channels, duration=round(lived, 3), bytes_in=session.bytes_in, bytes_out=session.bytes_out,
        )

    def session_refused(self, user: AuthenticatedUser, door: Door, detail: str, profile: str = DEFAULT_PROFILE) -> None:
        self.audit.emit("session_refused", user=user.name, door=door, profile=profile, reason=detail)

    def session_killed(self, session: Session, actor: Actor) -> None:
        self.audit.emit("session_kill", **_session_fields(session), by=actor)

    def viewer_started(self, session: Session, viewer: Viewer) -> None:
        self.audit.emit(f"{viewer.mode}_start", **_session_fields(session), admin=viewer.admin)

    def viewer_ended(self, session: Session, viewer: Viewer) -> None:
        self.audit.emit(f"{viewer.mode}_end", **_session_fields(session), admin=viewer.admin,
                        duration=round(time.monotonic() - viewer.since, 3))

    def containers_reaped(self, count: int) -> None:
        self.audit.emit("containers_reaped", count=count)

    def admin_viewed(self, admin: str, rhost: str, door: Door, what: str) -> None:
        self.audit.emit(AdminEvent.VIEW, admin=admin, rhost=rhost, door=door, what=what)

    def admin_killed(self, admin: str, rhost: str, session_id: str, owner: str) -> None:
        self.audit.emit(AdminEvent.KILL, admin=admin, rhost=rhost, session=session_id, user=owner)


# -- recording ------------------------------------------------------------------------------------

# Kept free under both limits for the marker line that says why a recording stopped.
MARKER_ROOM = 256
CAST_SUFFIX = ".cast"
# JSON leaves these raw inside strings, but line-oriented readers (str.splitlines) break lines on them.
_LINE_BREAKERS = {0x85: "\\u0085", 0x2028: "\\u2028", 0x2029: "\\u2029"}


class RecordDir:
    """The recordings directory as a whole, kept under `audit.record_dir_limit` bytes on disk.

    When a recording would cross the cap, the oldest finished recordings are removed first (each
    removal is an audit event); when only live recordings are left, the one that would cross it
    stops instead. Sizes are what is on disk plus what live recorders wrote, counted in bytes."""

    def __init__(self, path: Path, limit: int, audit: AuditLog | None = None) -> None:
        self.path = path
        self.limit = limit
        self.audit = audit
        self.live: dict[Path, AsciicastRecorder] = {}
        self.used = self._finished_bytes()[1]

    def _finished_bytes(self) -> tuple[list[os.DirEntry[str]], int]:
        """The finished recordings, oldest first, and their total size."""
        finished: list[tuple[float, os.DirEntry[str], int]] = []
        with os.scandir(self.path) as entries:
            for entry in entries:
                if not entry.name.endswith(CAST_SUFFIX) or Path(entry.path) in self.live:
                    continue
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                finished.append((st.st_mtime, entry, st.st_size))
        finished.sort(key=lambda item: item[0])
        return [entry for _, entry, _ in finished], sum(size for _, _, size in finished)

    def has_room(self, size: int) -> bool:
        """Whether `size` more bytes fit, after removing the oldest finished recordings if needed."""
        if self.used + size <= self.limit:
            return True
        finished, on_disk = self._finished_bytes()
        self.used = on_disk + sum(recorder.written for recorder in self.live.values())
        for entry in finished:
            if self.used + size <= self.limit:
                break
            try:
                freed = entry.stat(follow_symlinks=False).st_size
                os.unlink(entry.path)
            except FileNotFoundError:
                continue
            except OSError as exc:
                log.error("cannot remove recording %s to keep audit.record_dir_limit: %s", entry.path, exc)
                continue
            self.used -= freed
            log.info("removed recording %s (%d bytes): audit.record_dir_limit (%d bytes) reached",
                      entry.path, freed, self.limit)
            if self.audit is not None:
                self.audit.emit("recording_removed", file=entry.name, bytes=freed, reason="audit.record_dir_limit")
        return self.used + size <= self.limit

    def grew(self, size: int) -> None:
        self.used += size

    def started(self, recorder: AsciicastRecorder) -> None:
        self.live[recorder.path] = recorder

    def finished(self, recorder: AsciicastRecorder) -> None:
        self.live.pop(recorder.path, None)

    def stopped(self, recorder: AsciicastRecorder, reason: str) -> None:
        """A recording stopped early while its session goes on: the audit trail says so."""
        if self.audit is not None:
            self.audit.emit("recording_stopped", **_session_fields(recorder.session), file=recorder.path.name,
                            bytes=recorder.written, reason=reason)


class AsciicastRecorder:
    """One session's terminal as asciicast v2 (header line, then `[time, code, data]` lines).

    A StreamTap: the session calls it for every chunk, on the loop. Output goes through an
    incremental UTF-8 decoder, so a character split across chunks is recorded whole. Limits count
    the bytes that reach the disk (a byte that is not UTF-8 is recorded as U+FFFD, three bytes):
    `limit` for this file, `space` for the directory. Writes are buffered and flushed within a
    second; a failing disk stops the recording, not the session.
    """

    def __init__(
        self,
        path: Path,
        session: Session,
        *,
        record_input: bool = False,
        limit: int | None = None,
        space: RecordDir | None = None,
    ) -> None:
        self.path = path
        self.session = session
        self.record_input = record_input
        self.limit = limit
        self.space = space
        self.written = 0
        self._t0 = time.monotonic()
        self._timestamp = int(time.time())
        self._size = session.term_size
        self._header_written = False
        self._out = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._in = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._flush_handle: asyncio.TimerHandle | None = None
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self._file: BinaryIO | None = os.fdopen(fd, "wb", buffering=64 * 1024)
        if space is not None:
            space.started(self)

    @property
    def recording(self) -> bool:
        return self._file is not None

    def _header(self) -> dict[str, Any]:
        cols, rows = self._size or (80, 24)
        return {
            "version": 2,
            "width": cols,
            "height": rows,
            "timestamp": self._timestamp,
            "env": {"TERM": "xterm-256color", "SHELL": "/bin/bash"},
            "title": f"termbridge session {self.session.id} ({self.session.user.name}, {self.session.door})",
        }

    def _over_limit(self, size: int) -> str | None:
        """Which limit `size` more bytes (and room for the marker) would cross, if any."""
        if self.limit is not None and self.written + size + MARKER_ROOM > self.limit:
            return "audit.record_limit"
        if self.space is not None and not self.space.has_room(size + MARKER_ROOM):
            return "audit.record_dir_limit"
        return None

    def _line(self, item: Any | None, *, marker: bool = False) -> None:
        """Write `item` as one line, after the header if that is still due (`None`: header only).
        A line that would cross a limit stops the recording instead, with a marker saying why."""
        if self._file is None:
            return
        data = b"" if self._header_written else json.dumps(self._header()).encode() + b"\n"
        if item is not None:
            data += json.dumps(item, ensure_ascii=False).translate(_LINE_BREAKERS).encode() + b"\n"
        if not marker:
            crossed = self._over_limit(len(data))
            if crossed is not None:
                self._stop(crossed)
                return
        try:
            self._file.write(data)
        except OSError as exc:
            self._failed(exc)
            return
        self._header_written = True
        self.written += len(data)
        if self.space is not None:
            self.space.grew(len(data))
        self._schedule_flush()

    def _stop(self, limit: str) -> None:
        self.session.log.warning("recording reached %s; recording stops", limit)
        self._line([self._elapsed(), "m", f"recording stopped: {limit} reached"], marker=True)
        self._close_file()
        if self.space is not None:
            self.space.stopped(self, limit)

    def _failed(self, exc: OSError) -> None:
        self.session.log.error("recording to %s failed, recording stops: %s", self.path, exc)
        self._close_file()
        if self.space is not None:
            self.space.stopped(self, f"write error: {exc.strerror or exc}")

    def _event(self, code: str, data: str) -> None:
        if data and self._file is not None:
            self._line([self._elapsed(), code, data])

    def _elapsed(self) -> float:
        return round(time.monotonic() - self._t0, 6)

    def output(self, data: bytes) -> None:
        self._event("o", self._out.decode(data))

    def input(self, data: bytes, by: str | None = None) -> None:
        """The owner's keystrokes when `record_input` is on; a joined admin's always, as an input
        event with a fourth element `{"by": ADMIN}` (players read the first three)."""
        if by is not None:
            text = codecs.decode(data, "utf-8", errors="replace")
            if text and self._file is not None:
                self._line([self._elapsed(), "i", text, {"by": by}])
        elif self.record_input:
            self._event("i", self._in.decode(data))

    def mark(self, text: str) -> None:
        self._event("m", text)

    def resize(self, cols: int, rows: int) -> None:
        if not self._header_written:
            # Nothing shown yet: the header carries the size (a door may report its pty late).
            self._size = (cols, rows)
            return
        self._event("r", f"{cols}x{rows}")

    def _schedule_flush(self) -> None:
        if self._flush_handle is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.flush()
                return
            self._flush_handle = loop.call_later(FLUSH_AFTER, self.flush)

    def flush(self) -> None:
        self._flush_handle = None
        if self._file is not None:
            try:
                self._file.flush()
            except OSError as exc:
                self._failed(exc)

    def _close_file(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        file, self._file = self._file, None
        if file is not None:
            try:
                file.close()
            except OSError as exc:
                self.session.log.error("closing recording %s failed: %s", self.path, exc)
        if self.space is not None:
            self.space.finished(self)

    def close(self) -> None:
        """Write what the decoders still hold, and the header if nothing was shown at all."""
        if self._file is None:
            return
        self._event("o", self._out.decode(b"", final=True))
        if not self._header_written:
            self._line(None)
        self._close_file()


# -- reading back, for the admin console ------------------------------------------------------------

SESSION_ID = re.compile(r"[0-9a-f]{32}")  # what `Session` ids look like; nothing else names a file
TAIL_BYTES = 64 * 1024
HEADER_BYTES = 4096
_TITLE = re.compile(r"termbridge session [0-9a-f]+ \((?P<user>[^,()]*), (?P<door>[a-z]+)\)$")


def audit_tail(path: Path, count: int) -> list[dict[str, Any]]:
    """The last `count` events of an audit file (read from its last 64 KiB: blocking, call it in
    a thread). A line that does not parse is shown as its text."""
    try:
        with open(path, "rb") as fh:
            fh.seek(max(0, os.fstat(fh.fileno()).st_size - TAIL_BYTES))
            lines = fh.read(TAIL_BYTES).decode("utf-8", "replace").splitlines()[-count:]
    except FileNotFoundError:
        return []
    events = []
    for line in lines:
        try:
            event = json.loads(line)
        except ValueError:
            event = None
        events.append(event if isinstance(event, dict) else {"event": "?", "text": line[:500]})
    return events


def recording_file(record_dir: Path, session_id: str) -> Path | None:
    """The recording of session `session_id`, if it has one: only a session id names a file,
    so no other path can be asked for; a symlink is not followed."""
    if not SESSION_ID.fullmatch(session_id):
        return None
    path = record_dir / f"{session_id}{CAST_SUFFIX}"
    try:
        st = path.lstat()
    except FileNotFoundError:
        return None
    return path if stat.S_ISREG(st.st_mode) else None


def list_recordings(record_dir: Path, count: int) -> list[dict[str, Any]]:
    """The `count` newest recordings: session id, user and door (from the header), size and
    when last written. Blocking: call it in a thread."""
    found = []
    with os.scandir(record_dir) as entries:
        for entry in entries:
            session_id = entry.name.removesuffix(CAST_SUFFIX)
            if entry.name.endswith(CAST_SUFFIX) and SESSION_ID.fullmatch(session_id) and entry.is_file(follow_symlinks=False):
                st = entry.stat(follow_symlinks=False)
                found.append((st.st_mtime, session_id, st.st_size, entry.path))
    found.sort(reverse=True)
    listed = []
    for mtime, session_id, size, path in found[:count]:
        listed.append({
            "session": session_id, "bytes": size,
            "modified": datetime.fromtimestamp(mtime, timezone.utc).isoformat(timespec="seconds"),
            **_header_of(Path(path)),
        })
    return listed


def _header_of(path: Path) -> dict[str, str]:
    """User and door from a recording's header line (empty when it has none yet)."""
    try:
        with open(path, "rb") as fh:
            header = json.loads(fh.readline(HEADER_BYTES))
        match = _TITLE.match(str(header.get("title", "")))
    except (OSError, ValueError, AttributeError):
        return {"user": "", "door": ""}
    return {"user": match["user"], "door": match["door"]} if match else {"user": "", "door": ""}


class SessionRecorder(SessionObserver):
    """Starts an `AsciicastRecorder` for every session that becomes ready."""

    def __init__(
        self,
        record_dir: Path,
        *,
        record_input: bool = False,
        limit: int | None = None,
        dir_limit: int | None = None,
        audit: AuditLog | None = None,
    ) -> None:
        self.record_dir = record_dir
        self.record_input = record_input
        self.limit = limit
        self.space = RecordDir(record_dir, dir_limit, audit) if dir_limit is not None else None

    @staticmethod
    def prepare(record_dir: Path) -> None:
        """Create the directory (0700) at start, so a bad path stops the gateway, not a session."""
        try:
            record_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            probe = record_dir / f".probe-{os.getpid()}"
            probe.touch()
            probe.unlink()
        except OSError as exc:
            raise ConfigError(f"'audit.record_dir' {str(record_dir)!r} is not writable: {exc.strerror}") from None

    def path_for(self, session: Session) -> Path:
        return self.record_dir / f"{session.id}{CAST_SUFFIX}"

    def session_started(self, session: Session, seconds: float) -> None:
        path = self.path_for(session)
        try:
            recorder = AsciicastRecorder(
                path, session, record_input=self.record_input, limit=self.limit, space=self.space
            )
        except OSError as exc:
            session.log.error("cannot record to %s: %s; the session goes on unrecorded", path, exc)
            return
        session.taps.append(recorder)
        session.log.info("recording to %s", path)

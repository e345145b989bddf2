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
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

from .auth import AuthenticatedUser
from .errors import ConfigError
from .sessions import Session, SessionObserver

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
            self._handler.setFormatter(logging.Formatter("%(message)s"))
            # A logger of its own, outside the logging tree: audit lines go to the file only.
            self._logger = logging.Logger("termbridge.audit.file", logging.INFO)
            self._logger.addHandler(self._handler)
        else:
            self._logger = log

    def emit(self, event: str, **fields: Any) -> dict[str, Any]:
        record = {"ts": utc_now(), "event": event, "gateway": self.gateway, **fields}
        self._logger.info("%s", json.dumps(record, default=str))
        return record

    def login(self, user: str, rhost: str | None, door: str, result: str, reason: str = "") -> None:
        """One login attempt at any door. Never give it the password."""
        self.emit("login", user=user[:MAX_NAME], rhost=rhost or "", door=door, ok=result == "ok",
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
        "container": session.container.id if session.container else None,
    }


class AuditObserver(SessionObserver):
    """Turns the session manager's events into audit lines."""

    def __init__(self, audit: AuditLog, image: str) -> None:
        self.audit = audit
        self.image = image

    def login(self, user: str, rhost: str | None, door: str, result: str, reason: str) -> None:
        self.audit.login(user, rhost, door, result, reason)

    def session_started(self, session: Session, seconds: float) -> None:
        self.audit.emit(
            "session_start", **_session_fields(session), image=self.image,
            container_name=session.container.name if session.container else None,
            started=session.started_at.isoformat(timespec="seconds"), startup_ms=round(seconds * 1000),
        )

    def session_failed(self, session: Session, detail: str) -> None:
        self.audit.emit("session_failed", **_session_fields(session), image=self.image,
                        reason=session.end_reason, detail=detail)

    def session_ended(self, session: Session) -> None:
        lived = time.monotonic() - session.ready_at if session.ready_at is not None else 0.0
        self.audit.emit(
            "session_end", **_session_fields(session), image=self.image, reason=session.end_reason,
            code=session.exit_code, signal=session.exit_signal, channels=session.channels, duration=round(lived, 3), bytes_in=session.bytes_in, bytes_out=session.bytes_out,
        )

    def session_refused(self, user: AuthenticatedUser, door: str, detail: str) -> None:
        self.audit.emit("session_refused", user=user.name, door=door, reason=detail)

    def session_killed(self, session: Session, actor: str) -> None:
        self.audit.emit("session_kill", **_session_fields(session), by=actor)

    def containers_reaped(self, count: int) -> None:
        self.audit.emit("containers_reaped", count=count)


# -- recording ------------------------------------------------------------------------------------


class AsciicastRecorder:
    """One session's terminal as asciicast v2 (header line, then `[time, code, data]` lines).

    A StreamTap: the session calls it for every chunk, on the loop. Output goes through an
    incremental UTF-8 decoder, so a character split across chunks is recorded whole. Writes are
    buffered and flushed within a second; a failing disk stops the recording, not the session.
    """

    def __init__(
        self,
        path: Path,
        session: Session,
        *,
        record_input: bool = False,
        limit: int | None = None,
    ) -> None:
        self.path = path
        self.session = session
        self.record_input = record_input
        self.limit = limit
        self.written = 0
        self._t0 = time.monotonic()
        self._timestamp = int(time.time())
        self._size = session.term_size
        self._header_written = False
        self._out = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._in = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._flush_handle: asyncio.TimerHandle | None = None
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self._file: TextIO | None = os.fdopen(fd, "w", encoding="utf-8", buffering=64 * 1024)

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

    def _line(self, item: Any | None) -> None:
        """Write `item` as one line, after the header if that is still due (`None`: header only)."""
        if self._file is None:
            return
        try:
            if not self._header_written:
                self._header_written = True
                self._file.write(json.dumps(self._header()) + "\n")
            if item is not None:
                text = json.dumps(item, ensure_ascii=False) + "\n"
                self._file.write(text)
                self.written += len(text)
            self._schedule_flush()
        except OSError as exc:
            self.session.log.error("recording to %s failed, recording stops: %s", self.path, exc)
            self._close_file()

    def _event(self, code: str, data: str) -> None:
        if not data or self._file is None:
            return
        if self.limit is not None and self.written + len(data) > self.limit:
            self.session.log.warning("recording reached audit.record_limit (%d bytes); recording stops", self.limit)
            self._line([self._elapsed(), "m", "recording stopped: audit.record_limit reached"])
            self._close_file()
            return
        self._line([self._elapsed(), code, data])

    def _elapsed(self) -> float:
        return round(time.monotonic() - self._t0, 6)

    def output(self, data: bytes) -> None:
        self._event("o", self._out.decode(data))

    def input(self, data: bytes) -> None:
        if self.record_input:
            self._event("i", self._in.decode(data))

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
                self.session.log.error("recording to %s failed, recording stops: %s", self.path, exc)
                self._close_file()

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

    def close(self) -> None:
        """Write what the decoders still hold, and the header if nothing was shown at all."""
        if self._file is None:
            return
        self._event("o", self._out.decode(b"", final=True))
        if not self._header_written:
            self._line(None)
        self._close_file()


class SessionRecorder(SessionObserver):
    """Starts an `AsciicastRecorder` for every session that becomes ready."""

    def __init__(self, record_dir: Path, *, record_input: bool = False, limit: int | None = None) -> None:
        self.record_dir = record_dir
        self.record_input = record_input
        self.limit = limit

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
        return self.record_dir / f"{session.id}.cast"

    def session_started(self, session: Session, seconds: float) -> None:
        path = self.path_for(session)
        try:
            recorder = AsciicastRecorder(path, session, record_input=self.record_input, limit=self.limit)
        except OSError as exc:
            session.log.error("cannot record to %s: %s; the session goes on unrecorded", path, exc)
            return
        session.taps.append(recorder)
        session.log.info("recording to %s", path)

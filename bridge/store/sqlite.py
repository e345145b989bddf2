"""The SQLite store: one file in state_dir, for one host; survives restarts, nothing to install.

One connection, used only by one dedicated thread, so that the event loop never waits on disk
and the connection is never shared. WAL mode with a busy timeout lets several gateway processes
on the same host use one file; every check-then-write runs in a `BEGIN IMMEDIATE` transaction,
which takes the write lock first, so the caps hold across processes.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from ..errors import StoreUnavailable
from .base import KEY_CHECK, LoginRecord, Refusal, SecretBox, SessionRecord, Slot, Store, check_update

T = TypeVar("T")

BUSY_TIMEOUT_MS = 5000
# Expired throttle rows and locks are purged at most this often (and expired logins on each
# new login): the file stays bounded by what happened within one window.
PURGE_EVERY = 60.0

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS sessions (id TEXT PRIMARY KEY, user TEXT NOT NULL, data TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS sessions_user ON sessions (user);
CREATE TABLE IF NOT EXISTS secrets (id TEXT PRIMARY KEY, client_key BLOB NOT NULL, host_key BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS slots (id TEXT PRIMARY KEY, user TEXT, since REAL NOT NULL);
CREATE INDEX IF NOT EXISTS slots_user ON slots (user);
CREATE TABLE IF NOT EXISTS logins (
    id TEXT PRIMARY KEY, user TEXT NOT NULL, uid INTEGER NOT NULL, gid INTEGER NOT NULL, expires REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS logins_user ON logins (user);
CREATE INDEX IF NOT EXISTS logins_expires ON logins (expires);
CREATE TABLE IF NOT EXISTS failures (key TEXT NOT NULL, at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS failures_key_at ON failures (key, at);
CREATE INDEX IF NOT EXISTS failures_at ON failures (at);
CREATE TABLE IF NOT EXISTS locks (key TEXT PRIMARY KEY, until REAL NOT NULL);
CREATE TABLE IF NOT EXISTS profile_choices (user TEXT PRIMARY KEY, profile TEXT NOT NULL);
"""


def _private_file(path: Path) -> None:
    """Create the database file 0600 before SQLite opens it (SQLite gives its -wal and -shm files
    the database's mode), and tighten one an older version or an admin left wider."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


class SqliteStore(Store):
    def __init__(self, path: Path, box: SecretBox) -> None:
        super().__init__(box)
        self.path = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="termbridge-store")
        self._conn: sqlite3.Connection | None = None
        self._purged = 0.0

    @classmethod
    async def open(cls, path: Path, box: SecretBox) -> SqliteStore:
        store = cls(path, box)
        try:
            await store._run(lambda _: store._connect())
            await store._check_key()
        except BaseException:
            await store.close()
            raise
        return store

    def _connect(self) -> None:
        _private_file(self.path)
        self._conn = conn = sqlite3.connect(self.path, isolation_level=None)  # closed by close()
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.executescript(SCHEMA)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(conn, *args)` on the store's thread; SQLite errors become StoreUnavailable."""

        def call() -> T:
            try:
                return fn(self._conn, *args)
            except sqlite3.Error as exc:
                raise StoreUnavailable(detail=f"state database {str(self.path)!r}: {exc}") from None
            except OSError as exc:
                raise StoreUnavailable(detail=f"state database {str(self.path)!r}: {exc.strerror}") from None

        if self._executor is None:
            raise StoreUnavailable(detail="the state store is closed")
        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    async def _tx(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn` inside BEGIN IMMEDIATE: the write lock first, so its reads stay true until commit."""

        def tx(conn: sqlite3.Connection, *args: Any) -> T:
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = fn(conn, *args)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            return result

        return await self._run(tx, *args)

    # -- sessions ------------------------------------------------------------------------------

    async def put_session(self, rec: SessionRecord) -> None:
        await self._run(
            lambda c: c.execute(
                "INSERT OR REPLACE INTO sessions (id, user, data) VALUES (?, ?, ?)",
                (rec.id, rec.user, json.dumps(rec.to_dict())),
            )
        )

    async def get_session(self, session_id: str) -> SessionRecord | None:
        row = await self._run(lambda c: c.execute("SELECT data FROM sessions WHERE id = ?", (session_id,)).fetchone())
        return SessionRecord.from_dict(json.loads(row[0])) if row else None

    async def list_sessions(self, user: str | None = None) -> list[SessionRecord]:
        if user is None:
            rows = await self._run(lambda c: c.execute("SELECT data FROM sessions ORDER BY id").fetchall())
        else:
            rows = await self._run(
                lambda c: c.execute("SELECT data FROM sessions WHERE user = ? ORDER BY id", (user,)).fetchall()
            )
        return [SessionRecord.from_dict(json.loads(row[0])) for row in rows]

    async def update_session(
        self, session_id: str, *, expect: Mapping[str, Any] | None = None, **fields: Any
    ) -> bool:
        expect = expect or {}
        check_update(fields, expect)

        def update(c: sqlite3.Connection) -> bool:
            row = c.execute("SELECT data FROM sessions WHERE id = ?", (session_id,)).fetchone()
            if row is None:
                return False
            data = json.loads(row[0])
            if any(data.get(name) != value for name, value in expect.items()):
                return False
            data |= fields
            c.execute(
                "UPDATE sessions SET user = ?, data = ? WHERE id = ?", (data["user"], json.dumps(data), session_id)
            )
            return True

        return await self._tx(update)

    async def delete_session(self, session_id: str) -> None:
        def delete(c: sqlite3.Connection) -> None:
            for table in ("sessions", "secrets", "slots"):
                c.execute(f"DELETE FROM {table} WHERE id = ?", (session_id,))

        await self._tx(delete)

    # -- slots ---------------------------------------------------------------------------------

    async def reserve_slot(
        self, slot_id: str, user: str | None, max_per_user: int, max_total: int
    ) -> Refusal | None:
        def reserve(c: sqlite3.Connection) -> Refusal | None:
            if c.execute("SELECT 1 FROM slots WHERE id = ?", (slot_id,)).fetchone():
                return None
            if c.execute("SELECT COUNT(*) FROM slots").fetchone()[0] >= max_total:
                return "max_total"
            if user is not None and _user_slots(c, user) >= max_per_user:
                return "max_per_user"
            c.execute("INSERT INTO slots (id, user, since) VALUES (?, ?, ?)", (slot_id, user, time.time()))
            return None

        return await self._tx(reserve)

    async def claim_slot(
        self, pool_slot_id: str, slot_id: str, user: str, max_per_user: int, max_total: int
    ) -> Refusal | None:
        def claim(c: sqlite3.Connection) -> Refusal | None:
            if c.execute("SELECT 1 FROM slots WHERE id = ?", (slot_id,)).fetchone():
                c.execute("DELETE FROM slots WHERE id = ?", (pool_slot_id,))
                return None
            if _user_slots(c, user) >= max_per_user:
                return "max_per_user"
            freed = c.execute("DELETE FROM slots WHERE id = ?", (pool_slot_id,)).rowcount
            if not freed and c.execute("SELECT COUNT(*) FROM slots").fetchone()[0] >= max_total:
                return "max_total"
            c.execute("INSERT INTO slots (id, user, since) VALUES (?, ?, ?)", (slot_id, user, time.time()))
            return None

        return await self._tx(claim)

    async def release_slot(self, slot_id: str) -> None:
        await self._run(lambda c: c.execute("DELETE FROM slots WHERE id = ?", (slot_id,)))

    async def list_slots(self) -> dict[str, Slot]:
        rows = await self._run(lambda c: c.execute("SELECT id, user, since FROM slots").fetchall())
        return {slot_id: Slot(user, since) for slot_id, user, since in rows}

    # -- logins --------------------------------------------------------------------------------

    async def put_login(self, login: LoginRecord) -> None:
        def put(c: sqlite3.Connection) -> None:
            c.execute("DELETE FROM logins WHERE expires <= ?", (time.time(),))
            c.execute(
                "INSERT OR REPLACE INTO logins (id, user, uid, gid, expires) VALUES (?, ?, ?, ?, ?)",
                (login.id, login.user, login.uid, login.gid, login.expires),
            )

        await self._tx(put)

    async def get_login(self, login_id: str, now: float) -> LoginRecord | None:
        row = await self._run(
            lambda c: c.execute(
                "SELECT id, user, uid, gid, expires FROM logins WHERE id = ? AND expires > ?", (login_id, now)
            ).fetchone()
        )
        return LoginRecord(*row) if row else None

    async def delete_login(self, login_id: str) -> None:
        await self._run(lambda c: c.execute("DELETE FROM logins WHERE id = ?", (login_id,)))

    async def delete_logins_of(self, user: str) -> int:
        return await self._run(lambda c: c.execute("DELETE FROM logins WHERE user = ?", (user,)).rowcount)

    # -- throttle counters ---------------------------------------------------------------------

    async def add_failure(self, key: str, now: float, window: float) -> int:
        def add(c: sqlite3.Connection) -> int:
            if now - self._purged >= PURGE_EVERY:
                self._purged = now
                c.execute("DELETE FROM failures WHERE at <= ?", (now - window,))
                c.execute("DELETE FROM locks WHERE until <= ?", (now,))
            c.execute("DELETE FROM failures WHERE key = ? AND at <= ?", (key, now - window))
            c.execute("INSERT INTO failures (key, at) VALUES (?, ?)", (key, now))
            count = c.execute("SELECT COUNT(*) FROM failures WHERE key = ? AND at > ?", (key, now - window))
            return count.fetchone()[0]

        return await self._tx(add)

    async def failures(self, key: str, now: float, window: float) -> int:
        return await self._run(
            lambda c: c.execute(
                "SELECT COUNT(*) FROM failures WHERE key = ? AND at > ? AND at <= ?", (key, now - window, now)
            ).fetchone()[0]
        )

    async def lock(self, key: str, until: float) -> None:
        await self._run(
            lambda c: c.execute(
                "INSERT INTO locks (key, until) VALUES (?, ?) "
                "ON CONFLICT (key) DO UPDATE SET until = max(until, excluded.until)",
                (key, until),
            )
        )

    async def locked_until(self, key: str, now: float) -> float | None:
        row = await self._run(
            lambda c: c.execute("SELECT until FROM locks WHERE key = ? AND until > ?", (key, now)).fetchone()
        )
        return row[0] if row else None

    async def clear(self, key: str) -> None:
        def clear(c: sqlite3.Connection) -> None:
            c.execute("DELETE FROM failures WHERE key = ?", (key,))
            c.execute("DELETE FROM locks WHERE key = ?", (key,))

        await self._tx(clear)

    # -- profile choices -----------------------------------------------------------------------

    async def get_profile_choice(self, user: str) -> str | None:
        row = await self._run(
            lambda c: c.execute("SELECT profile FROM profile_choices WHERE user = ?", (user,)).fetchone()
        )
        return row[0] if row else None

    async def put_profile_choice(self, user: str, profile: str) -> None:
        await self._run(
            lambda c: c.execute(
                "INSERT OR REPLACE INTO profile_choices (user, profile) VALUES (?, ?)", (user, profile)
            )
        )

    # -- secrets, meta, lifecycle --------------------------------------------------------------

    async def _put_secret(self, session_id: str, sealed_key: bytes, host_key: bytes) -> None:
        await self._run(
            lambda c: c.execute(
                "INSERT OR REPLACE INTO secrets (id, client_key, host_key) VALUES (?, ?, ?)",
                (session_id, sealed_key, host_key),
            )
        )

    async def _get_secret(self, session_id: str) -> tuple[bytes, bytes] | None:
        row = await self._run(
            lambda c: c.execute("SELECT client_key, host_key FROM secrets WHERE id = ?", (session_id,)).fetchone()
        )
        return (bytes(row[0]), bytes(row[1])) if row else None

    async def _meta_setdefault(self, name: str, value: str) -> str:
        def setdefault(c: sqlite3.Connection) -> str:
            c.execute("INSERT OR IGNORE INTO meta (name, value) VALUES (?, ?)", (name, value))
            return c.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()[0]

        return await self._tx(setdefault)

    async def ping(self) -> None:
        await self._run(lambda c: c.execute("SELECT value FROM meta WHERE name = ?", (KEY_CHECK,)).fetchone())

    async def close(self) -> None:
        executor, self._executor = self._executor, None
        if executor is None:
            return

        def shut(conn: sqlite3.Connection | None) -> None:
            if conn is not None:
                conn.close()

        try:
            await asyncio.get_running_loop().run_in_executor(executor, shut, self._conn)
        finally:
            self._conn = None
            executor.shutdown(wait=False)


def _user_slots(c: sqlite3.Connection, user: str) -> int:
    return c.execute("SELECT COUNT(*) FROM slots WHERE user = ?", (user,)).fetchone()[0]

"""The store contract: what a gateway keeps outside its own memory so that any gateway (after a
restart, or a sibling replica) can serve any session and any login.

Both implementations (SQLite for one host, Redis for several gateways) run the same conformance
suite (tests/test_store.py). Times are wall-clock epoch seconds, because replicas share them;
the caller passes `now` where a decision depends on it, so the bookkeeping stays testable.
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import hmac
import os
import secrets
import stat
from dataclasses import dataclass
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..errors import ConfigError, StoreUnavailable

# What refused a slot: the name of the cap, as the config calls it.
Refusal = Literal["max_per_user", "max_total"]

KEY_CHECK = "key-check"
_KEY_BYTES = 32
_BLOB_VERSION = b"\x01"


@dataclass(frozen=True)
class SessionRecord:
    """One session as every gateway sees it: enough to reattach, reap or count it."""

    id: str
    user: str
    door: str
    gateway: str  # instance id of the gateway that started it
    started: float
    last_activity: float  # the idle clock
    lifetime_deadline: float
    profile: str = "default"
    login: str | None = None  # the web login that opened it (logout ends it)
    container_id: str = ""
    container_name: str = ""
    address: str = ""
    port: int = 0
    ssh_user: str = ""
    attached_by: str | None = None  # instance id of the gateway holding its attachment
    attached_at: float | None = None
    ended: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SessionRecord:
        known = {name: data[name] for name in SESSION_FIELDS if name in data}
        return cls(**known)


SESSION_FIELDS = frozenset(f.name for f in dataclasses.fields(SessionRecord))


@dataclass(frozen=True)
class Slot:
    """One unit of the caps: a session's (or a pooled container's) place, held since `since`."""

    user: str | None  # None: a pooled container, counted against max_total only
    since: float


@dataclass(frozen=True)
class LoginRecord:
    """A web login: the cookie names `id`; valid on every replica until `expires` or logout."""

    id: str
    user: str
    uid: int
    gid: int
    expires: float


@dataclass(frozen=True)
class SessionSecret:
    """What it takes to reconnect to a session's container: the client key (private) and the
    container's pinned host key (public)."""

    client_key: bytes
    host_key: bytes


def check_update(fields: Mapping[str, Any], expect: Mapping[str, Any]) -> None:
    """`update_session` may change any field but the id; a typo is a programming error."""
    wrong = (set(fields) | set(expect)) - SESSION_FIELDS | ({"id"} & set(fields))
    if wrong:
        raise ValueError(f"cannot update session field(s): {', '.join(sorted(wrong))}")


class SecretBox:
    """AES-GCM over the session private keys, so that a copy of the store (a Redis dump, a
    backup of state.db) does not yield them without the key file beside the gateway. The
    session id is bound in as associated data: an entry cannot be replayed for another session."""

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)
        self._key = key
        self.check = hmac.new(key, b"termbridge store key check", hashlib.sha256).hexdigest()

    def derive(self, purpose: str) -> bytes:
        """A 32-byte key for `purpose` (HKDF-SHA256): every gateway holding this key file derives
        the same one, so the file is the only secret replicas must share."""
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=f"termbridge {purpose}".encode()).derive(
            self._key
        )

    def seal(self, session_id: str, plaintext: bytes) -> bytes:
        nonce = os.urandom(12)
        return _BLOB_VERSION + nonce + self._aead.encrypt(nonce, plaintext, session_id.encode())

    def open(self, session_id: str, blob: bytes) -> bytes:
        if blob[:1] != _BLOB_VERSION:
            raise StoreUnavailable(detail=f"session {session_id[:12]}: stored key has an unknown format")
        try:
            return self._aead.decrypt(blob[1:13], blob[13:], session_id.encode())
        except InvalidTag:
            raise StoreUnavailable(
                detail=f"session {session_id[:12]}: stored key does not decrypt with this gateway's store key"
            ) from None

    @classmethod
    def from_file(cls, path: Path) -> SecretBox:
        """The key file: created 0600 on first use; one readable by others is refused."""
        if not path.exists():
            _create_key_file(path)
        try:
            info = path.stat()
            key = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"'store.secret_file' {str(path)!r} is not readable: {exc.strerror}") from None
        if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(f"'store.secret_file' {str(path)!r} is open to group or others: chmod 600 it")
        if len(key) != _KEY_BYTES:
            raise ConfigError(f"'store.secret_file' {str(path)!r} must hold exactly {_KEY_BYTES} bytes")
        return cls(key)


def _create_key_file(path: Path) -> None:
    """Write the key beside its place, then link it there: gateways starting together on one
    host never read a half-written key, and the first to link wins."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(secrets.token_bytes(_KEY_BYTES))
        os.link(tmp, path)
    except FileExistsError:
        pass
    except OSError as exc:
        raise ConfigError(f"'store.secret_file' {str(path)!r} cannot be created: {exc.strerror}") from None
    finally:
        tmp.unlink(missing_ok=True)


class Store(abc.ABC):
    """Sessions, slots (the caps), logins, throttle counters and reconnect secrets.

    Every method may raise `StoreUnavailable` (with a safe message) when the backend is down.
    """

    def __init__(self, box: SecretBox) -> None:
        self._box = box

    async def __aenter__(self) -> Store:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def derive_key(self, purpose: str) -> bytes:
        """A secret for `purpose` (the login cookie's signing key) shared by every gateway of
        this store, derived from the key file."""
        return self._box.derive(purpose)

    @property
    def fleet(self) -> str:
        """The name the gateways sharing this store (with its key file) label containers with: a
        gateway reaps only its fleet's containers, never another installation's on the same host."""
        return self._box.check[:16]

    async def _check_key(self) -> None:
        """Every gateway sharing the store must share the key file, or reconnecting to another
        gateway's session would fail much later; say so at start instead."""
        stored = await self._meta_setdefault(KEY_CHECK, self._box.check)
        if stored != self._box.check:
            raise ConfigError(
                "'store.secret_file' is not the key this store was written with: restore that file, "
                "or copy it from the other gateways sharing the store (mode 0600)"
            )

    # -- sessions ------------------------------------------------------------------------------

    @abc.abstractmethod
    async def put_session(self, rec: SessionRecord) -> None:
        """Create or replace a session record."""

    @abc.abstractmethod
    async def get_session(self, session_id: str) -> SessionRecord | None: ...

    @abc.abstractmethod
    async def list_sessions(self, user: str | None = None) -> list[SessionRecord]: ...

    @abc.abstractmethod
    async def update_session(
        self, session_id: str, *, expect: Mapping[str, Any] | None = None, **fields: Any
    ) -> bool:
        """Change some fields atomically; False if the session is gone or a field named in `expect`
        no longer has that value (compare-and-set: two gateways racing to attach, one wins)."""

    @abc.abstractmethod
    async def delete_session(self, session_id: str) -> None:
        """Forget the session, its secret and its slot (idempotent)."""

    # -- slots: the caps, atomic across replicas -----------------------------------------------

    @abc.abstractmethod
    async def reserve_slot(
        self, slot_id: str, user: str | None, max_per_user: int, max_total: int
    ) -> Refusal | None:
        """Take a slot if both caps hold; None when granted (or already held), else the cap
        that refused. `user=None` is a pooled container: it counts against max_total only."""

    @abc.abstractmethod
    async def claim_slot(
        self, pool_slot_id: str, slot_id: str, user: str, max_per_user: int, max_total: int
    ) -> Refusal | None:
        """Turn a pooled container's slot into `user`'s slot `slot_id` in one step (the total is
        unchanged; max_total only matters if the pooled slot was already gone)."""

    @abc.abstractmethod
    async def release_slot(self, slot_id: str) -> None: ...

    @abc.abstractmethod
    async def list_slots(self) -> dict[str, Slot]:
        """Every held slot, for reaping one whose gateway died before it started the session."""

    # -- logins --------------------------------------------------------------------------------

    @abc.abstractmethod
    async def put_login(self, login: LoginRecord) -> None: ...

    @abc.abstractmethod
    async def get_login(self, login_id: str, now: float) -> LoginRecord | None:
        """The login, or None when unknown, logged out or expired at `now`."""

    @abc.abstractmethod
    async def delete_login(self, login_id: str) -> None: ...

    @abc.abstractmethod
    async def delete_logins_of(self, user: str) -> int:
        """Log `user` out everywhere; how many logins ended."""

    # -- throttle counters ---------------------------------------------------------------------

    @abc.abstractmethod
    async def add_failure(self, key: str, now: float, window: float) -> int:
        """Count a failure of `key` at `now`; the failures in (now - window, now]."""

    @abc.abstractmethod
    async def failures(self, key: str, now: float, window: float) -> int: ...

    @abc.abstractmethod
    async def lock(self, key: str, until: float) -> None:
        """Refuse `key` until `until`; an earlier lock is extended, never shortened."""

    @abc.abstractmethod
    async def locked_until(self, key: str, now: float) -> float | None:
        """When the lock on `key` ends, or None if it is not locked at `now`."""

    @abc.abstractmethod
    async def clear(self, key: str) -> None:
        """Forget `key`'s failures and lock (a successful login)."""

    # -- profile choices -----------------------------------------------------------------------

    @abc.abstractmethod
    async def get_profile_choice(self, user: str) -> str | None:
        """The profile `user` last chose on the web chooser, or None."""

    @abc.abstractmethod
    async def put_profile_choice(self, user: str, profile: str) -> None:
        """Remember `user`'s choice (the caller checked that the profile is theirs)."""

    # -- reconnect secrets ---------------------------------------------------------------------

    async def put_secret(self, session_id: str, secret: SessionSecret) -> None:
        await self._put_secret(session_id, self._box.seal(session_id, secret.client_key), secret.host_key)

    async def get_secret(self, session_id: str) -> SessionSecret | None:
        found = await self._get_secret(session_id)
        if found is None:
            return None
        blob, host_key = found
        return SessionSecret(client_key=self._box.open(session_id, blob), host_key=host_key)

    @abc.abstractmethod
    async def _put_secret(self, session_id: str, sealed_key: bytes, host_key: bytes) -> None: ...

    @abc.abstractmethod
    async def _get_secret(self, session_id: str) -> tuple[bytes, bytes] | None: ...

    # -- the rest ------------------------------------------------------------------------------

    @abc.abstractmethod
    async def _meta_setdefault(self, name: str, value: str) -> str:
        """Store `value` under `name` unless set; the stored value."""

    @abc.abstractmethod
    async def ping(self) -> None:
        """Raise StoreUnavailable unless the store answers (for /healthz)."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Idempotent."""

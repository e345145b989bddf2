"""Keys of the SSH door: the gateway's host key, and a person's authorized_keys read and checked
the way sshd would (as the user may read it, StrictModes, every documented option honoured or the
key refused)."""

from __future__ import annotations

import logging
import os
import pwd
import stat
import time
from datetime import datetime, timezone
from pathlib import Path

import asyncssh

from .errors import ConfigError

log = logging.getLogger("termbridge.ssh")

MAX_AUTHORIZED_KEYS_BYTES = 1024 * 1024


# -- host key -------------------------------------------------------------------------------------


def load_or_create_host_key(path: Path) -> asyncssh.SSHKey:
    """The door's identity: ed25519, created 0600 on first start and the same on every restart,
    so clients' known_hosts entries stay valid. A key others may read is refused, as sshd does."""
    if not path.exists():
        key = asyncssh.generate_private_key("ssh-ed25519", comment="termbridge-host")
        temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(key.export_private_key("openssh"))
            os.link(temp, path)  # never a half-written key at `path`, never an existing one replaced
        except FileExistsError:
            pass  # another process created it first: use that one
        except OSError as exc:
            raise ConfigError(f"'ssh.host_key' {str(path)!r} cannot be created: {exc.strerror}") from None
        else:
            log.info("created SSH host key %s (%s)", path, key.get_fingerprint())
            return key
        finally:
            temp.unlink(missing_ok=True)
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            raise ConfigError(f"'ssh.host_key' {str(path)!r} is accessible by others (mode {mode:04o}); chmod 600 it")
        return asyncssh.read_private_key(path)
    except (OSError, asyncssh.KeyImportError) as exc:
        raise ConfigError(f"'ssh.host_key' {str(path)!r} cannot be read: {exc}") from None


# -- authorized_keys ------------------------------------------------------------------------------


def _unsafe(st: os.stat_result, uid: int) -> bool:
    return st.st_uid not in (0, uid) or bool(st.st_mode & 0o022)


def _user_may(st: os.stat_result, entry: pwd.struct_passwd, groups: set[int], bit: int) -> bool:
    """Whether the user may read (bit 4) or search (bit 1) this by its mode bits, as the kernel
    decides it for their uid and groups."""
    if st.st_uid == entry.pw_uid:
        return bool(st.st_mode & (bit << 6))
    if st.st_gid in groups:
        return bool(st.st_mode & (bit << 3))
    return bool(st.st_mode & bit)


def read_authorized_keys(entry: pwd.struct_passwd) -> str | None:
    """The text of ~/.ssh/authorized_keys as the user could read it, or None when it is absent or
    unsafe. The gateway runs as root, so it checks what the user's own permissions allow instead
    of trusting its own: the real file (symlinks resolved, as sshd follows them as the user) must
    be a regular file the user may read, in directories they may search, and (sshd's StrictModes)
    it and every directory up to the home directory (up to / for a file outside it) must be owned
    by the user or root and writable by no one else. A device is never opened."""
    path = Path(entry.pw_dir) / ".ssh" / "authorized_keys"
    real = Path(os.path.realpath(path))
    try:
        lst = os.lstat(real)
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("authorized_keys of %s ignored: %s: %s", entry.pw_name, path, exc.strerror)
        return None
    groups = set(os.getgrouplist(entry.pw_name, entry.pw_gid))
    if not stat.S_ISREG(lst.st_mode):
        log.warning("authorized_keys of %s ignored: %s is not a regular file", entry.pw_name, real)
        return None
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_NOFOLLOW)
    except OSError as exc:
        log.warning("authorized_keys of %s ignored: %s: %s", entry.pw_name, real, exc.strerror)
        return None
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        if (st.st_dev, st.st_ino) != (lst.st_dev, lst.st_ino) or not stat.S_ISREG(st.st_mode):
            log.warning("authorized_keys of %s ignored: %s changed while it was opened", entry.pw_name, real)
            return None
        if _unsafe(st, entry.pw_uid) or not _user_may(st, entry, groups, 4):
            log.warning(
                "authorized_keys of %s ignored: bad ownership or modes for file %s (or the user may not read it)",
                entry.pw_name, real,
            )
            return None
        home = Path(os.path.realpath(entry.pw_dir))
        for directory in real.parents:
            try:
                dst = os.stat(directory)
            except OSError:
                return None
            if _unsafe(dst, entry.pw_uid) or not _user_may(dst, entry, groups, 1):
                log.warning(
                    "authorized_keys of %s ignored: bad ownership or modes for directory %s", entry.pw_name, directory
                )
                return None
            if directory == home:
                break
        data = fh.read(MAX_AUTHORIZED_KEYS_BYTES + 1)
    if len(data) > MAX_AUTHORIZED_KEYS_BYTES:
        log.warning("authorized_keys of %s ignored: larger than %d bytes", entry.pw_name, MAX_AUTHORIZED_KEYS_BYTES)
        return None
    return data.decode("utf-8", "replace")


# Options of sshd(8)'s AUTHORIZED_KEYS FILE FORMAT and what the door does with each. "keep": given
# to asyncssh, which enforces it (from= against the client address, command= as the forced
# command for shells, commands and subsystems alike, no-pty, the forwarding permissions,
# no-touch-required for security keys). "drop": nothing to enforce, since the door never forwards
# ports, agents, X11 or tunnels and runs no rc files, and environment= is ignored like sshd's
# default PermitUserEnvironment=no. "restrict", "expiry-time" are handled here. Any other option,
# and the ones asyncssh cannot enforce here (cert-authority and principals= need certificate
# checks this door does not do, verify-required needs a FIDO PIN check), make sshd-like refusal:
# the key is skipped with a log line.
_KEY_OPTIONS = {
    "agent-forwarding": "keep", "command": "keep", "from": "keep", "no-agent-forwarding": "keep",
    "no-port-forwarding": "keep", "no-pty": "keep", "no-x11-forwarding": "keep", "port-forwarding": "keep",
    "pty": "keep", "x11-forwarding": "keep", "no-touch-required": "keep",
    "no-user-rc": "drop", "user-rc": "drop", "permitlisten": "drop", "permitopen": "drop", "tunnel": "drop",
    "environment": "drop",
    "restrict": "restrict", "expiry-time": "expiry",
}
_VALUED = frozenset({"command", "environment", "expiry-time", "from", "permitlisten", "permitopen", "tunnel"})
# restrict: every permission off, unless a later option turns one back on (as in sshd).
_RESTRICTED = ("agent-forwarding", "port-forwarding", "pty", "X11-forwarding")
_SPELLING = {"x11-forwarding": "X11-forwarding", "no-x11-forwarding": "no-X11-forwarding"}


class KeyLineError(ValueError):
    """One authorized_keys line the door will not use; the message says why, for the admin."""


def _split_options(line: str) -> tuple[list[str], str]:
    """OpenSSH's option syntax: comma-separated, double quotes protect commas and spaces (\\"
    escapes a quote), the options end at the first unquoted blank. (options, the rest)."""
    options: list[str] = []
    current = ""
    quoted = False
    i = 0
    while i < len(line):
        ch = line[i]
        if quoted and ch == "\\" and line[i + 1 : i + 2] == '"':
            current += '\\"'
            i += 2
            continue
        if ch == '"':
            quoted = not quoted
        elif not quoted and ch in " \t":
            break
        elif not quoted and ch == ",":
            options.append(current)
            current = ""
            i += 1
            continue
        current += ch
        i += 1
    if quoted:
        raise KeyLineError("unbalanced quote in the options")
    options.append(current)
    return options, line[i:].strip()


def _expiry(value: str) -> float:
    """expiry-time="YYYYMMDD[HHMM[SS]][Z]": local time, or UTC with Z (as sshd reads it)."""
    text = value.strip('"')
    utc = text.endswith(("Z", "z"))
    digits = text[:-1] if utc else text
    formats = {8: "%Y%m%d", 12: "%Y%m%d%H%M", 14: "%Y%m%d%H%M%S"}
    if not digits.isdigit() or len(digits) not in formats:
        raise KeyLineError(f"bad expiry-time {value!r}")
    moment = datetime.strptime(digits, formats[len(digits)])
    return moment.replace(tzinfo=timezone.utc).timestamp() if utc else moment.timestamp()


def _key_line(line: str, now: float) -> str:
    """One authorized_keys line as asyncssh should read it: its options checked and rewritten
    (see _KEY_OPTIONS). Raises KeyLineError for a line the door must not use."""
    try:
        asyncssh.import_public_key(line)
        return line  # a plain key, no options
    except (asyncssh.KeyImportError, ValueError):
        pass
    options, key = _split_options(line)
    kept: list[str] = []
    for option in options:
        name, has_value, value = option.partition("=")
        lname = name.lower()
        what = _KEY_OPTIONS.get(lname)
        if what is None:
            raise KeyLineError(f"option {name!r} is not supported by this gateway")
        if bool(has_value) != (lname in _VALUED):
            raise KeyLineError(f"option {option!r} is malformed")
        if what == "expiry":
            if _expiry(value) <= now:
                raise KeyLineError(f"the key expired ({option})")
        elif what == "restrict":
            kept = [o for o in kept if o.lower().removeprefix("no-") not in {p.lower() for p in _RESTRICTED}]
            kept += [f"no-{p}" for p in _RESTRICTED]
        elif what == "keep":
            if lname.startswith("no-") or has_value:
                kept.append(_SPELLING.get(lname, lname) + (f"={value}" if has_value else ""))
            else:  # a permission turned back on after restrict
                off = "no-" + _SPELLING.get(lname, lname)
                kept = [o for o in kept if o != off]
    try:
        asyncssh.import_public_key(key)
    except (asyncssh.KeyImportError, ValueError) as exc:
        raise KeyLineError(f"not a public key: {exc}") from None
    return f"{','.join(kept)} {key}" if kept else key


def parse_authorized_keys(text: str, username: str, now: float | None = None) -> asyncssh.SSHAuthorizedKeys | None:
    """The keys of an authorized_keys text that the door may use, each line on its own: a line
    that is broken, expired or carries an option the door does not implement is skipped with a log
    line, the others still work. None when no key is left (key login off; passwords still work)."""
    moment = time.time() if now is None else now
    lines: list[str] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            usable = _key_line(line, moment)
            asyncssh.SSHAuthorizedKeys(usable)  # what asyncssh itself refuses (e.g. a bad from=)
        except ValueError as exc:
            log.warning("authorized_keys of %s: line %d skipped: %s", username, number, exc)
            continue
        lines.append(usable)
    if not lines:
        log.warning("authorized_keys of %s has no usable key: key login is off for this user", username)
        return None
    return asyncssh.SSHAuthorizedKeys("\n".join(lines))


def authorized_keys_of(username: str) -> asyncssh.SSHAuthorizedKeys | None:
    try:
        entry = pwd.getpwnam(username)
    except KeyError:
        return None
    text = read_authorized_keys(entry)
    return parse_authorized_keys(text, entry.pw_name) if text else None

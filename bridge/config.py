"""One frozen, typed configuration object, read from TOML and `TERMBRIDGE_*` variables and validated once."""

from __future__ import annotations

import dataclasses
import grp
import ipaddress
import json
import os
import pwd
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .errors import ConfigError

DEFAULT_CONFIG_PATH = Path("/etc/termbridge/termbridge.toml")
ENV_PREFIX = "TERMBRIDGE_"

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kmgKMG])?[bB]?\s*$")
_SIZE_UNITS = {None: 1, "k": 1024, "m": 1024**2, "g": 1024**3}
# Host uids (and gids) below this map to session uids uid_base + uid; others get no session.
UID_SPAN = 65536
SUBORDINATE_ID_FILES = (Path("/etc/subuid"), Path("/etc/subgid"))


def parse_duration(value: Any) -> float:
    """`90s`, `15m`, `8h` (or a bare number of seconds) to seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration like 90s, 15m or 8h")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        m = _DURATION_RE.match(str(value))
        if not m:
            raise ValueError(f"{value!r} is not a duration like 90s, 15m or 8h")
        seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    if seconds <= 0:
        raise ValueError("must be greater than zero")
    return seconds


def parse_size(value: Any) -> int:
    """`200m`, `1g` (or a bare number of bytes) to bytes."""
    if isinstance(value, bool):
        raise ValueError("expected a size like 200m or 1g")
    if isinstance(value, int):
        size = value
    else:
        m = _SIZE_RE.match(str(value))
        if not m:
            raise ValueError(f"{value!r} is not a size like 200m or 1g")
        size = int(m.group(1)) * _SIZE_UNITS[(m.group(2) or "").lower() or None]
    if size <= 0:
        raise ValueError("must be greater than zero")
    return size


def parse_listen(value: Any, *, allow_empty: bool = False) -> tuple[str, int] | None:
    """`host:port` (IPv6 as `[::1]:port`) to a pair; empty string disables when allowed."""
    text = str(value).strip()
    if not text:
        if allow_empty:
            return None
        raise ValueError("an address like 127.0.0.1:8080 is required")
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"{text!r} is not host:port")
    host = host.strip("[]")
    port_no = int(port)
    if not 0 <= port_no <= 65535:
        raise ValueError(f"port {port_no} is out of range")
    return host or "0.0.0.0", port_no


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("expected a string")
    return value


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "yes", "on", "1"):
        return True
    if text in ("false", "no", "off", "0"):
        return False
    raise ValueError("expected true or false")


def _opt_path(value: Any) -> Path | None:
    text = _str(value)
    return Path(text) if text else None


def _str_list(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            value = json.loads(text)
        else:
            value = [part.strip() for part in text.split(",") if part.strip()]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ValueError("expected a list of strings")
    return tuple(value)


def _constraints(value: Any) -> tuple[str, ...]:
    """Swarm placement constraints: `ATTRIBUTE==VALUE` or `ATTRIBUTE!=VALUE` each."""
    items = _str_list(value)
    for item in items:
        left, op, right = item.partition("==") if "==" in item else item.partition("!=")
        if not op or not left.strip() or not right.strip():
            raise ValueError(f"{item!r} is no constraint; expected e.g. 'node.labels.termbridge==yes'")
    return items


def _addr_list(value: Any) -> tuple[str, ...]:
    items = _str_list(value)
    for item in items:
        ipaddress.ip_network(item, strict=False)
    return items


def _ip_list(value: Any) -> tuple[str, ...]:
    return tuple(str(ipaddress.ip_address(item)) for item in _str_list(value))


def _positive_float(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError("expected a number")
    number = float(value)
    if number <= 0:
        raise ValueError("must be greater than zero")
    return number


def _int_range(low: int, high: int) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError("expected a whole number")
        number = int(value)
        if not low <= number <= high:
            raise ValueError(f"must be between {low} and {high}")
        return number

    return parse


def _choice(*options: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        text = _str(value)
        if text not in options:
            raise ValueError(f"must be one of {', '.join(options)}")
        return text

    return parse


def _origin(value: Any) -> str | None:
    text = _str(value).rstrip("/")
    if not text:
        return None
    if not re.match(r"^https?://[^/\s]+$", text):
        raise ValueError(f"{text!r} is not an origin like https://term.example.org")
    return text


_BASE_PATH_RE = re.compile(r"^/(?:[A-Za-z0-9._~-]+/)*$")


def _base_path(value: Any) -> str:
    """A URL path prefix like `/terminal/`: absolute, a directory, and plain enough that browsers,
    proxies and cookies all read it the same way (no `..`, query, escapes or doubled slashes)."""
    text = _str(value).strip()
    if not (text.startswith("/") and text.endswith("/")):
        raise ValueError(f"{text!r} must start and end with '/', like \"/terminal/\"")
    if any(part in (".", "..") for part in text.split("/")):
        raise ValueError(f"{text!r} must not contain '.' or '..' segments")
    if not _BASE_PATH_RE.match(text):
        raise ValueError(f"{text!r} must be a plain path of letters, digits and . _ ~ - (no query, '%' or '//')")
    return text


def _key(parser: Callable[[Any], Any], doc: str) -> dict[str, Any]:
    return {"parser": parser, "doc": doc}


def _field(default: Any, parser: Callable[[Any], Any], doc: str) -> Any:
    return field(default=default, metadata=_key(parser, doc))


@dataclass(frozen=True)
class WebConfig:
    listen: tuple[str, int] = _field(("127.0.0.1", 8080), parse_listen, "HTTP(S) address")
    tls_cert: Path | None = _field(None, _opt_path, "serve HTTPS directly with this certificate")
    tls_key: Path | None = _field(None, _opt_path, "private key for tls_cert")
    trusted_proxies: tuple[str, ...] = _field((), _addr_list, "proxies whose X-Forwarded-* are believed")
    metrics_allow: tuple[str, ...] = _field(("127.0.0.1", "::1"), _addr_list, "clients allowed to read /metrics")
    public_origin: str | None = _field(None, _origin, "the origin browsers use")
    max_message_size: int = _field(1024**2, parse_size, "largest WebSocket message a client may send")
    max_upload_size: int = _field(100 * 1024**2, parse_size, "largest file the Files panel accepts for upload")
    base_path: str = _field("/", _base_path, "serve every page, socket and endpoint under this URL prefix")


@dataclass(frozen=True)
class SshConfig:
    listen: tuple[str, int] | None = _field(
        ("0.0.0.0", 2222), lambda v: parse_listen(v, allow_empty=True), "SSH address; empty disables"
    )
    host_key: Path | None = _field(None, _opt_path, "ed25519 host key; default <state_dir>/ssh_host_ed25519_key")


@dataclass(frozen=True)
class AuthConfig:
    pam_service: str = _field("termbridge", _str, "PAM service name")
    allowed_groups: tuple[str, ...] = _field((), _str_list, "only members of these groups may log in")
    admin_groups: tuple[str, ...] = _field(
        (), _str_list, "members of these groups may use /admin and the SSH door's `sessions` command"
    )
    pam_workers: int = _field(4, _int_range(1, 64), "threads that run PAM conversations")
    max_failures: int = _field(5, _int_range(1, 10_000), "failed logins of one username before lockout")
    max_failures_per_address: int = _field(20, _int_range(1, 100_000), "failed logins from one address before lockout")
    failure_window: float = _field(15 * 60.0, parse_duration, "how long a failed login counts")
    lockout: float = _field(5 * 60.0, parse_duration, "how long a locked-out username or address is refused")
    account_recheck: float = _field(
        30.0, parse_duration, "how often the accounts of live sessions are checked again (locked, expired, ...)"
    )


@dataclass(frozen=True)
class SessionConfig:
    image: str = _field("termbridge/session:latest", _str, "session image")
    cpus: float = _field(0.5, _positive_float, "CPU limit per session")
    memory: int = _field(200 * 1024**2, parse_size, "memory limit per session (swap off)")
    pids: int = _field(256, _int_range(16, 1_000_000), "process limit per session")
    idle_timeout: float = _field(15 * 60.0, parse_duration, "no input for this long ends the session")
    max_lifetime: float = _field(8 * 3600.0, parse_duration, "hard cap on one session")
    reconnect_grace: float = _field(60.0, parse_duration, "a dropped browser may reattach within this")
    on_shutdown: str = _field(
        "keep", _choice("keep", "end"), "keep: web sessions outlive a gateway stop or restart; end: they end with it"
    )
    max_per_user: int = _field(3, _int_range(1, 10_000), "concurrent sessions per user")
    max_total: int = _field(50, _int_range(1, 100_000), "concurrent sessions on this gateway")
    network: str = _field("isolated", _choice("isolated", "internet"), "isolated or internet")
    user: str = _field("login", _choice("login", "root"), "login: non-root user named after the login; root")
    pool: int = _field(0, _int_range(0, 1000), "containers kept ready for the next login")
    start_timeout: float = _field(30.0, parse_duration, "how long a container may take to be ready")
    firewall: bool = _field(True, _bool, "install the host firewall rules that keep containers off host ports")
    tmpfs_size: int = _field(64 * 1024**2, parse_size, "size of each writable tmpfs (/tmp, the home directory)")
    internet_allow: tuple[str, ...] = _field((), _addr_list, "private networks internet-mode sessions may reach")
    dns: tuple[str, ...] = _field((), _ip_list, "name servers of internet-mode sessions; empty: the host's")
    backend: str = _field("docker", _choice("docker", "swarm"), "docker: one engine; swarm: each session a Swarm service")
    placement: tuple[str, ...] = _field((), _constraints, "Swarm placement constraints of session services")
    swarm_network: str = _field(
        "termbridge-sessions", _str, "the overlay network sessions and gateways share (backend = swarm)"
    )
    uid_base: int = _field(
        1_000_000_000, _int_range(UID_SPAN, 2**31 - 1 - UID_SPAN), "a login's session uid is uid_base + its host uid"
    )
    home: str = _field(
        "ephemeral", _choice("ephemeral", "persistent"),
        "ephemeral: the home directory is gone with the session; persistent: it comes back in the next one",
    )
    home_size: int = _field(
        1024**3, parse_size, "size of each persistent home (a file system of its own, preallocated on the host)"
    )


@dataclass(frozen=True)
class AuditConfig:
    log: str = _field("", _str, "JSON-lines audit file; empty: the termbridge.audit logger")
    record_dir: Path | None = _field(None, _opt_path, "record each session as asciicast v2 here")
    record_input: bool = _field(False, _bool, "also record what the person typed (passwords typed in the shell too)")
    record_limit: int = _field(100 * 1024**2, parse_size, "a recording stops growing at this size (bytes on disk)")
    record_dir_limit: int = _field(
        1024**3, parse_size, "all recordings together: the oldest finished ones are removed to stay under it"
    )


def _store_url(value: Any) -> str:
    text = _str(value).strip()
    if text:
        parts = urlsplit(text)
        if parts.scheme not in ("redis", "rediss", "unix") or not (parts.hostname or parts.path):
            raise ValueError("expected empty (SQLite in state_dir) or a URL like redis://HOST:PORT/DB")
        if parts.port == 0:  # reading .port also refuses a port that is no number in range
            raise ValueError("port 0 is not a Redis port")
    return text


@dataclass(frozen=True)
class StoreConfig:
    url: str = _field("", _store_url, "empty: SQLite at <state_dir>/state.db; redis://HOST:PORT/DB: shared")
    secret_file: Path | None = _field(None, _opt_path, "key that encrypts session keys at rest; default <state_dir>/store-key")


@dataclass(frozen=True)
class LogConfig:
    format: str = _field("text", _choice("text", "json"), "text: one escaped line per record; json: one JSON object")
    level: str = _field("info", _choice("debug", "info", "warning", "error"), "the least severe level logged")
    access: bool = _field(False, _bool, "one line per HTTP request (logger termbridge.access)")


# [session] keys that hold for the whole gateway, not per profile: every other SessionConfig key
# (added ones too) may be set in a [profiles.NAME] section.
NOT_PER_PROFILE = frozenset({
    "reconnect_grace", "on_shutdown", "max_total", "firewall", "uid_base", "backend",
})
DEFAULT_PROFILE = "default"
PROFILE_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")


def profile_keys() -> tuple[str, ...]:
    """The keys a [profiles.NAME] section may set besides `groups`: derived from SessionConfig,
    so that a new session key is a profile key unless it is named in NOT_PER_PROFILE."""
    return tuple(name for name in _scalar_fields(SessionConfig) if name not in NOT_PER_PROFILE)


@dataclass(frozen=True)
class ProfileConfig:
    """One `[profiles.NAME]` (or the default profile, `[session]`): who may use it, and the
    session settings of its sessions, [session]'s with this profile's own keys over them."""

    name: str
    groups: tuple[str, ...]
    session: SessionConfig
    overrides: tuple[tuple[str, Any], ...] = ()  # the keys this profile sets itself, parsed
    description: str = ""  # what the web chooser says of it

    def over(self, base: SessionConfig) -> ProfileConfig:
        """This profile on top of another [session] (a reload changed an inherited key)."""
        return dataclasses.replace(self, session=dataclasses.replace(base, **dict(self.overrides)))


_SECTIONS: dict[str, type] = {
    "web": WebConfig,
    "ssh": SshConfig,
    "auth": AuthConfig,
    "session": SessionConfig,
    "audit": AuditConfig,
    "store": StoreConfig,
    "log": LogConfig,
}


@dataclass(frozen=True)
class Config:
    state_dir: Path = _field(Path("/var/lib/termbridge"), lambda v: Path(_str(v)), "the gateway's own files")
    homes_dir: Path | None = _field(None, _opt_path, "where persistent homes live; default <state_dir>/homes")
    web: WebConfig = field(default_factory=WebConfig)
    ssh: SshConfig = field(default_factory=SshConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    session: SessionConfig = field(default_factory=SessionConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    log: LogConfig = field(default_factory=LogConfig)
    # [profiles.NAME] in file order; [session] is the default profile and not among them.
    profiles: tuple[ProfileConfig, ...] = ()

    @property
    def default_profile(self) -> ProfileConfig:
        return ProfileConfig(DEFAULT_PROFILE, (), self.session)

    def profile(self, name: str) -> ProfileConfig | None:
        """The profile called `name` (`default`: [session]), or None."""
        if name == DEFAULT_PROFILE:
            return self.default_profile
        return next((p for p in self.profiles if p.name == name), None)

    def all_profiles(self) -> tuple[ProfileConfig, ...]:
        """The default profile, then every [profiles.NAME]."""
        return (self.default_profile, *self.profiles)

    @property
    def ssh_host_key(self) -> Path:
        return self.ssh.host_key or self.state_dir / "ssh_host_ed25519_key"

    @property
    def store_secret_file(self) -> Path:
        return self.store.secret_file or self.state_dir / "store-key"

    @property
    def homes_path(self) -> Path:
        return self.homes_dir or self.state_dir / "homes"


def _scalar_fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if "parser" in f.metadata}


def known_keys() -> list[str]:
    """Every configuration key, dotted (`session.idle_timeout`), in declaration order."""
    keys = list(_scalar_fields(Config))
    for section, cls in _SECTIONS.items():
        keys.extend(f"{section}.{name}" for name in _scalar_fields(cls))
    return keys


# What a running gateway takes over on SIGHUP, for new sessions and logins (a live session keeps
# the limits it started with). Every other key (listen addresses, the store, state_dir, the
# session network, ...) needs a restart; a reload names the ones that changed and leaves them.
LIVE_KEYS = frozenset({
    "web.tls_cert", "web.tls_key",
    "auth.allowed_groups", "auth.admin_groups", "auth.max_failures", "auth.max_failures_per_address",
    "auth.failure_window",
    "auth.lockout",
    "session.image", "session.cpus", "session.memory", "session.pids", "session.idle_timeout",
    "session.max_lifetime", "session.reconnect_grace", "session.max_per_user", "session.max_total",
    "session.start_timeout", "session.tmpfs_size", "session.on_shutdown", "session.home", "session.home_size",
})


def _value(config: Config, key: str) -> Any:
    section, _, name = key.rpartition(".")
    return getattr(getattr(config, section) if section else config, name)


def changed_keys(old: Config, new: Config) -> list[str]:
    """The keys whose value differs, in declaration order; `profiles` when any [profiles.NAME]
    section changed (they need a restart: each profile may have its own warm pool)."""
    changed = [key for key in known_keys() if _value(old, key) != _value(new, key)]
    if [dataclasses.replace(p, session=SessionConfig()) for p in old.profiles] != [
        dataclasses.replace(p, session=SessionConfig()) for p in new.profiles
    ]:
        changed.append("profiles")
    return changed


def apply_live(old: Config, new: Config) -> Config:
    """`old` with the LIVE_KEYS values of `new` (the config a reload runs with)."""
    sections: dict[str, dict[str, Any]] = {}
    for key in changed_keys(old, new):
        if key in LIVE_KEYS:
            section, _, name = key.partition(".")
            sections.setdefault(section, {})[name] = _value(new, key)
    merged = dataclasses.replace(
        old, **{section: dataclasses.replace(getattr(old, section), **values) for section, values in sections.items()}
    )
    merged = dataclasses.replace(merged, profiles=tuple(p.over(merged.session) for p in old.profiles))
    _check(merged)
    return merged


def env_name(key: str) -> str:
    return ENV_PREFIX + key.replace(".", "_").upper()


def _parse_section(cls: type, values: Mapping[str, Any], prefix: str) -> Any:
    fields = _scalar_fields(cls)
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}{name}"
        if name not in fields:
            raise ConfigError(f"unknown configuration key {key!r}")
        try:
            kwargs[name] = fields[name].metadata["parser"](value)
        except (ValueError, TypeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"bad value for {key!r}: {exc}") from None
    return cls(**kwargs)


def load_config(path: str | os.PathLike | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Read `path` (or the default file if it exists), then apply `TERMBRIDGE_*` overrides.

    A file named explicitly must exist; the default file may be absent (built-in defaults apply).
    """
    env = os.environ if env is None else env
    data: dict[str, Any] = {}
    file = Path(path) if path is not None else DEFAULT_CONFIG_PATH
    if path is not None or file.exists():
        try:
            with open(file, "rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"configuration file {str(file)!r} does not exist") from None
        except PermissionError:
            raise ConfigError(f"configuration file {str(file)!r} is not readable") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"configuration file {str(file)!r} is not valid TOML: {exc}") from None

    env_keys = {env_name(key): key for key in known_keys()}
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX):
            continue
        key = env_keys.get(name)
        if key is None:
            raise ConfigError(f"unknown configuration variable {name!r}")
        section, _, leaf = key.rpartition(".")
        target = data.setdefault(section, {}) if section else data
        if not isinstance(target, dict):
            raise ConfigError(f"configuration key {section!r} must be a table")
        target[leaf] = value

    top: dict[str, Any] = {}
    sections: dict[str, Any] = {}
    profiles_data = data.pop("profiles", {})
    for name, value in data.items():
        if name in _SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"configuration key {name!r} must be a table")
            sections[name] = _parse_section(_SECTIONS[name], value, f"{name}.")
        else:
            top[name] = value
    config = dataclasses.replace(_parse_section(Config, top, ""), **sections)
    config = dataclasses.replace(config, profiles=_parse_profiles(profiles_data, config.session))
    _check(config)
    return config


def _parse_profiles(data: Any, base: SessionConfig) -> tuple[ProfileConfig, ...]:
    """`[profiles.NAME]` sections: `groups` (existing host groups, at least one), an optional
    `description`, and any key of `profile_keys()`, each parsed like its [session] twin."""
    if not isinstance(data, dict):
        raise ConfigError("configuration key 'profiles' must be a table of [profiles.NAME] sections")
    allowed = set(profile_keys())
    fields = _scalar_fields(SessionConfig)
    profiles = []
    for name, values in data.items():
        prefix = f"profiles.{name}"
        if not PROFILE_NAME_RE.match(name) or name == DEFAULT_PROFILE:
            raise ConfigError(
                f"profile name {name!r}: use 1-32 lower-case letters, digits, '-' or '_' (and not "
                f"{DEFAULT_PROFILE!r}, the name of [session])"
            )
        if not isinstance(values, dict):
            raise ConfigError(f"configuration key {prefix!r} must be a table")
        values = dict(values)
        if "groups" not in values:
            raise ConfigError(f"'{prefix}.groups' is missing: name the host groups whose members may use it")
        try:
            groups = _str_list(values.pop("groups"))
        except (ValueError, json.JSONDecodeError) as exc:
            raise ConfigError(f"bad value for '{prefix}.groups': {exc}") from None
        if not groups:
            raise ConfigError(f"'{prefix}.groups' is empty: nobody could use this profile")
        try:
            description = _str(values.pop("description", ""))
        except ValueError as exc:
            raise ConfigError(f"bad value for '{prefix}.description': {exc}") from None
        for group in groups:
            try:
                grp.getgrnam(group)
            except KeyError:
                raise ConfigError(f"'{prefix}.groups': there is no group {group!r} on this host") from None
        overrides = []
        for key, value in values.items():
            if key not in allowed:
                why = "holds for the whole gateway, set it in [session]" if key in fields else "is no profile key"
                raise ConfigError(f"unknown configuration key '{prefix}.{key}': {key!r} {why}")
            try:
                overrides.append((key, fields[key].metadata["parser"](value)))
            except (ValueError, TypeError, json.JSONDecodeError) as exc:
                raise ConfigError(f"bad value for '{prefix}.{key}': {exc}") from None
        profiles.append(ProfileConfig(name, groups, base, tuple(overrides), description).over(base))
    return tuple(profiles)


def _section_of(profile: ProfileConfig) -> str:
    return "session" if profile.name == DEFAULT_PROFILE else f"profiles.{profile.name}"


def _check(config: Config) -> None:
    web = config.web
    if (web.tls_cert is None) != (web.tls_key is None):
        raise ConfigError("'web.tls_cert' and 'web.tls_key' must be set together")
    max_total = config.session.max_total
    swarm = config.session.backend == "swarm"
    for profile in config.all_profiles():
        section, session = _section_of(profile), profile.session
        if session.max_per_user > max_total:
            raise ConfigError(f"'{section}.max_per_user' must not exceed 'session.max_total'")
        check_home(session, f"{section}.")
        if session.pool > max_total:
            raise ConfigError(f"'{section}.pool' must not exceed 'session.max_total'")
        loopback = [server for server in session.dns if ipaddress.ip_address(server).is_loopback]
        if loopback:
            raise ConfigError(f"'{section}.dns': {', '.join(loopback)} is this host's loopback, which no container reaches")
        if swarm and session.network != "isolated":
            raise ConfigError(f"'session.backend' = swarm supports only '{section}.network' = isolated")
        if swarm and session.home == "persistent":
            raise ConfigError(f"'session.backend' = swarm cannot keep homes ('{section}.home' = persistent): "
                              "a home lives on one host")
    _check_pools(config)
    clashes = session_uid_clashes(config.session.uid_base)
    if clashes:
        raise ConfigError(
            f"'session.uid_base' = {config.session.uid_base}: session uids {config.session.uid_base}.."
            f"{config.session.uid_base + UID_SPAN - 1} must belong to nobody on this host, but "
            f"{', '.join(clashes[:5])}{' ...' if len(clashes) > 5 else ''} use some; choose another range"
        )


def _check_pools(config: Config) -> None:
    """Each profile with `pool` > 0 keeps warm containers of its own, made with its image, limits
    and label (a label cannot change after creation, so profiles never share pooled containers,
    even of one image). Together they count against one `session.max_total`."""
    pooled = [p for p in config.all_profiles() if p.session.pool > 0]
    total = sum(p.session.pool for p in pooled)
    if total > config.session.max_total:
        parts = " + ".join(f"'{_section_of(p)}.pool' = {p.session.pool}" for p in pooled)
        raise ConfigError(
            f"warm pools conflict: {parts} keep {total} containers, more than 'session.max_total' = "
            f"{config.session.max_total} (a profile that does not set pool inherits [session]'s: set pool = 0 there)"
        )


# ext4 needs room for its own metadata: below this, a home holds next to nothing.
MIN_HOME_SIZE = 16 * 1024**2


def check_home(session: SessionConfig, prefix: str) -> None:
    """What a persistent home needs of the other session keys (`prefix` names the section or
    profile in the message)."""
    if session.home_size < MIN_HOME_SIZE:
        raise ConfigError(f"'{prefix}home_size' must be at least {MIN_HOME_SIZE // 1024**2}m")
    if session.home != "persistent":
        return
    if session.user == "root":
        raise ConfigError(f"'{prefix}home' = \"persistent\" needs '{prefix}user' = \"login\" (a root shell has no home of its own)")
    if session.pool:
        raise ConfigError(
            f"'{prefix}home' = \"persistent\" cannot use '{prefix}pool': a pooled container is already running and "
            f"cannot be given the home's mount; set '{prefix}pool' = 0 (each start is a cold start)"
        )
    if getattr(session, "backend", "docker") == "swarm":
        raise ConfigError(
            f"'{prefix}home' = \"persistent\" needs '{prefix}backend' = \"docker\": homes are files on one host, "
            "and a Swarm service may run on any node"
        )


def session_uid_clashes(base: int) -> list[str]:
    """Host accounts, groups and subordinate id ranges (rootless containers) that overlap the
    session uid range: a host process with one of those ids could read a session's files and
    /proc/<pid>/root, and would share its per-uid kernel limits."""
    end = base + UID_SPAN
    found = [f"user {e.pw_name} ({e.pw_uid})" for e in pwd.getpwall() if base <= e.pw_uid < end]
    found += [f"group {e.gr_name} ({e.gr_gid})" for e in grp.getgrall() if base <= e.gr_gid < end]
    for path in SUBORDINATE_ID_FILES:
        try:
            lines = path.read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            fields = line.strip().split(":")
            # dockremap's range is where Docker's userns-remap puts container uids: sessions' own
            if len(fields) == 3 and fields[0] != "dockremap" and fields[1].isdigit() and fields[2].isdigit():
                start, count = int(fields[1]), int(fields[2])
                if start < end and base < start + count:
                    found.append(f"{path} {fields[0]} ({start}+{count})")
    return found

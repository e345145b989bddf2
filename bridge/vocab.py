"""The words the gateway's parts share: doors, end reasons, login results, start results, who
ended a session, and backend operations.

String-valued enums (`StrEnum`): a member is its string, so the WebSocket protocol, the audit
trail, log lines and Prometheus labels carry exactly the same text as before they were typed.
Layer 0: this module imports nothing from the gateway.
"""

from __future__ import annotations

import enum


class Door(enum.StrEnum):
    """The front door a session or a login came through."""

    WEB = "web"
    SSH = "ssh"


class EndReason(enum.StrEnum):
    """Why a session ended (`Session.end_reason`)."""

    EXIT = "exit"  # the shell exited, or its owner ended it from the page
    IDLE = "idle"
    LIFETIME = "lifetime"
    KILLED = "killed"  # from outside: admin, logout, shutdown
    ERROR = "error"  # the start failed, or the container or its connection was lost
    DISCONNECTED = "disconnected"  # the person went away (and did not come back in time)
    CANCELLED = "cancelled"  # the start was cancelled before the session was ready


# What a web page may be told in its `exit` message: a page that went away hears nothing, and a
# cancelled start never had a page waiting.
EXIT_MESSAGE_REASONS = frozenset(EndReason) - {EndReason.DISCONNECTED, EndReason.CANCELLED}
# How a session that was ready can end (the `termbridge_session_ends` label).
READY_END_REASONS = tuple(reason for reason in EndReason if reason is not EndReason.CANCELLED)


class LoginResult(enum.StrEnum):
    """The outcome of one login attempt at any door."""

    OK = "ok"
    DENIED = "denied"
    UNAVAILABLE = "unavailable"
    THROTTLED = "throttled"  # refused before PAM was asked


class StartResult(enum.StrEnum):
    """How a session start went (the `termbridge_session_starts` label)."""

    OK = "ok"
    ERROR = "error"
    CANCELLED = "cancelled"
    REFUSED = "refused"


class Actor(enum.StrEnum):
    """Who ended a session from outside (the audit trail's `by`)."""

    ADMIN = "admin"
    LOGOUT = "logout"
    SHUTDOWN = "shutdown"
    ACCOUNT = "account"  # the account may no longer log in (locked, expired, removed, ...)


class AdminEvent(enum.StrEnum):
    """What a member of `auth.admin_groups` did (the audit trail's event names)."""

    VIEW = "admin_view"  # looked at the console, a recording, or the session list over SSH
    KILL = "admin_kill"  # ended someone's session from the console


class BackendOp(enum.StrEnum):
    """The backend calls counted by `termbridge_docker_errors`."""

    PING = "ping"
    START = "start"
    CLAIM = "claim"
    STOP = "stop"
    POLL = "poll"
    LIST = "list"
    STATS = "stats"


class WatchMode(enum.StrEnum):
    """How an admin looks at someone else's session: `watch` (read-only) or `join` (may type)."""

    WATCH = "watch"
    JOIN = "join"

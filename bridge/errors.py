"""The error hierarchy: each error carries a safe text for the person and a detail for the log."""

from __future__ import annotations


class BridgeError(Exception):
    """Base error. `user_message` may be shown to anyone; `detail` goes to the admin's log only."""

    user_message = "internal error"

    def __init__(self, user_message: str | None = None, detail: str | None = None) -> None:
        if user_message is not None:
            self.user_message = user_message
        self.detail = detail or self.user_message
        super().__init__(self.detail)


class ConfigError(BridgeError):
    """The configuration is invalid; the message names the key."""


class AuthUnavailable(BridgeError):
    user_message = "login is unavailable right now, try again later"


class AccountRefused(BridgeError):
    """An earlier login's account may no longer log in (locked, expired, removed, ...)."""

    user_message = "your account may no longer log in here"


class LimitReached(BridgeError):
    """A session limit refused a new session; the message says which one."""


class BackendUnavailable(BridgeError):
    user_message = "the container service is unavailable right now, try again later"


class ImageMissing(BridgeError):
    user_message = "the session image is not installed on this server; ask the admin to build it"


class SessionStartError(BridgeError):
    user_message = "the session could not be started"


class ProtocolError(BridgeError):
    """A client sent something the protocol does not allow."""


class StoreUnavailable(BridgeError):
    """The shared state store (SQLite file or Redis) did not answer; the detail says why."""

    user_message = "the gateway's state store is unavailable right now, try again later"


class ProfileRefused(BridgeError):
    """The person asked for a profile that does not exist or is not open to them."""

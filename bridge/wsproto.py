"""The WebSocket control protocol: parse what clients send, encode what the server sends. Pure."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .errors import ProtocolError
from .vocab import EXIT_MESSAGE_REASONS, EndReason

MAX_CONTROL_BYTES = 4096
MIN_DIM, MAX_DIM = 1, 1000

EXIT_REASONS = EXIT_MESSAGE_REASONS


@dataclass(frozen=True)
class Resize:
    cols: int
    rows: int


@dataclass(frozen=True)
class End:
    """The person asks to end the session (the page's "End session"), as `exit` in the shell would."""


ClientMessage = Resize | End


def _dimension(obj: dict[str, Any], name: str) -> int:
    value = obj.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or not MIN_DIM <= value <= MAX_DIM:
        raise ProtocolError(f"resize {name} must be a whole number from {MIN_DIM} to {MAX_DIM}")
    return value


def parse_client_text(text: str) -> ClientMessage:
    """Parse one text frame from a client; raise ProtocolError with a message fit to send back."""
    if len(text) > MAX_CONTROL_BYTES:
        raise ProtocolError(f"control message longer than {MAX_CONTROL_BYTES} bytes")
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        raise ProtocolError("control message is not valid JSON") from None
    if not isinstance(obj, dict):
        raise ProtocolError("control message must be a JSON object")
    kind = obj.get("type")
    if kind == "resize":
        return Resize(cols=_dimension(obj, "cols"), rows=_dimension(obj, "rows"))
    if kind == "end":
        return End()
    if not isinstance(kind, str):
        raise ProtocolError("control message needs a string 'type'")
    raise ProtocolError(f"unknown message type {kind[:40]!r}")


def _encode(**fields: Any) -> str:
    return json.dumps(fields, separators=(",", ":"))


def session_message(
    session_id: str, idle_timeout: float, offset: int = 0, reconnect_grace: float | None = None,
    profile: str | None = None,
) -> str:
    """`reconnect_grace` tells the page how long it may try to reattach; `profile`, the
    session's profile, is shown in its status bar."""
    fields: dict[str, Any] = {"type": "session", "id": session_id, "idle_timeout": round(idle_timeout), "offset": offset}
    if reconnect_grace is not None:
        fields["reconnect_grace"] = round(reconnect_grace)
    if profile is not None:
        fields["profile"] = profile
    return _encode(**fields)


def idle_warning(seconds: float) -> str:
    return _encode(type="idle-warning", seconds=max(0, round(seconds)))


def exit_message(code: int | None, reason: EndReason, message: str | None = None) -> str:
    """`message`, when given, is a safe sentence saying why (e.g. "the container was killed")."""
    if reason not in EXIT_REASONS:
        raise ValueError(f"unknown exit reason {reason!r}")
    if message:
        return _encode(type="exit", code=code, reason=reason, message=message)
    return _encode(type="exit", code=code, reason=reason)


def error_message(message: str) -> str:
    return _encode(type="error", message=message)


def restarting_message() -> str:
    """The gateway is stopping but the session runs on: reconnect with the same session id and
    offset (to this gateway once it is back, or to another one sharing its store)."""
    return _encode(type="restarting")


def gap_message(lost: int) -> str:
    return _encode(type="gap", lost=lost)


def viewers_message(viewers: list[dict[str, str]]) -> str:
    """To a session's owner: who watches (`mode` "watch") or joined ("join") it now; [] when nobody."""
    return _encode(type="viewers", viewers=viewers)


def watch_message(session_id: str, user: str, mode: str, cols: int, rows: int) -> str:
    """To an admin's view, first: whose session, how (watch or join), and its terminal size."""
    return _encode(type="watch", id=session_id, user=user, mode=mode, cols=cols, rows=rows)


def size_message(cols: int, rows: int) -> str:
    """To an admin's view: the session's terminal size changed (its owner's window)."""
    return _encode(type="size", cols=cols, rows=rows)

"""The operations side's view of the core: what the session manager tells the audit trail, the
metrics and the recorder, as typed calls, and the fan-out that keeps a failing observer from
breaking a session.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

from .auth import AuthenticatedUser
from .config import DEFAULT_PROFILE
from .session import Session, Viewer
from .vocab import Actor, Door, LoginResult

log = logging.getLogger("termbridge.sessions")


class SessionObserver:
    """Watches sessions and logins for the operations side (audit trail, metrics). Subclass and
    override what you need. Methods run on the event loop, so they must not block; one that
    raises is logged and skipped, never allowed to break a session."""

    def login(self, user: str, rhost: str | None, door: Door, result: LoginResult, reason: str) -> None:
        """A login attempt at any door."""

    def session_started(self, session: Session, seconds: float) -> None:
        """The session is ready, `seconds` after create() began (the time to a prompt)."""

    def session_failed(self, session: Session, detail: str) -> None:
        """The session never became ready; `session.end_reason` is `error` or `cancelled`."""

    def session_ended(self, session: Session) -> None:
        """A session that was ready has ended; its container's removal is under way."""

    def session_refused(self, user: AuthenticatedUser, door: Door, detail: str, profile: str = DEFAULT_PROFILE) -> None:
        """A limit (or shutdown) refused a new session of `profile` before anything was started."""

    def session_killed(self, session: Session, actor: Actor) -> None:
        """Someone ended a session from outside."""

    def containers_reaped(self, count: int) -> None:
        """The reaper removed `count` containers that no live session owned."""

    def admin_viewed(self, admin: str, rhost: str, door: Door, what: str) -> None:
        """An admin looked at `what` (the console, a recording, the session list)."""

    def admin_killed(self, admin: str, rhost: str, session_id: str, owner: str) -> None:
        """An admin ended `owner`'s session `session_id` from the console."""

    def viewer_started(self, session: Session, viewer: Viewer) -> None:
        """An admin began to watch or joined someone's session (`viewer.mode`)."""

    def viewer_ended(self, session: Session, viewer: Viewer) -> None:
        """That admin stopped watching or left."""


class Observers(SessionObserver):
    """Every observer the manager tells, behind the same typed calls: each call reaches every
    observer, and one that raises is logged and skipped."""

    def __init__(self) -> None:
        self._members: list[SessionObserver] = []

    def add(self, *observers: SessionObserver) -> None:
        self._members.extend(observers)

    def __iter__(self) -> Iterator[SessionObserver]:
        return iter(self._members)

    def _each(self, event: str, call: Callable[[SessionObserver], None]) -> None:
        for observer in self._members:
            try:
                call(observer)
            except Exception:
                log.exception("observer %s failed on %s", type(observer).__name__, event)

    def login(self, user: str, rhost: str | None, door: Door, result: LoginResult, reason: str) -> None:
        self._each("login", lambda o: o.login(user, rhost, door, result, reason))

    def session_started(self, session: Session, seconds: float) -> None:
        self._each("session_started", lambda o: o.session_started(session, seconds))

    def session_failed(self, session: Session, detail: str) -> None:
        self._each("session_failed", lambda o: o.session_failed(session, detail))

    def session_ended(self, session: Session) -> None:
        self._each("session_ended", lambda o: o.session_ended(session))

    def session_refused(self, user: AuthenticatedUser, door: Door, detail: str, profile: str = DEFAULT_PROFILE) -> None:
        self._each("session_refused", lambda o: o.session_refused(user, door, detail, profile))

    def session_killed(self, session: Session, actor: Actor) -> None:
        self._each("session_killed", lambda o: o.session_killed(session, actor))

    def containers_reaped(self, count: int) -> None:
        self._each("containers_reaped", lambda o: o.containers_reaped(count))

    def admin_viewed(self, admin: str, rhost: str, door: Door, what: str) -> None:
        self._each("admin_viewed", lambda o: o.admin_viewed(admin, rhost, door, what))

    def admin_killed(self, admin: str, rhost: str, session_id: str, owner: str) -> None:
        self._each("admin_killed", lambda o: o.admin_killed(admin, rhost, session_id, owner))

    def viewer_started(self, session: Session, viewer: Viewer) -> None:
        self._each("viewer_started", lambda o: o.viewer_started(session, viewer))

    def viewer_ended(self, session: Session, viewer: Viewer) -> None:
        self._each("viewer_ended", lambda o: o.viewer_ended(session, viewer))

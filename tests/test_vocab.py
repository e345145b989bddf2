"""The shared enums keep the exact strings the protocol, audit trail and metrics always used,
and the manager's observers are told through typed calls that isolate a failing observer."""

from __future__ import annotations

import json
import logging

from bridge.auth import AuthenticatedUser
from bridge.observers import Observers, SessionObserver
from bridge.vocab import EXIT_MESSAGE_REASONS, READY_END_REASONS, Actor, BackendOp, Door, EndReason, LoginResult


def test_the_strings_on_the_wire_are_unchanged():
    assert [d.value for d in Door] == ["web", "ssh"]
    assert [r.value for r in LoginResult] == ["ok", "denied", "unavailable", "throttled"]
    assert sorted(EXIT_MESSAGE_REASONS) == ["error", "exit", "idle", "killed", "lifetime"]
    assert list(READY_END_REASONS) == ["exit", "idle", "lifetime", "killed", "error", "disconnected"]
    assert [a.value for a in Actor] == ["admin", "logout", "shutdown", "account"]
    assert [o.value for o in BackendOp] == ["ping", "start", "claim", "stop", "poll", "list", "stats"]
    assert json.dumps({"door": Door.SSH, "reason": EndReason.IDLE}) == '{"door": "ssh", "reason": "idle"}'
    assert f"{EndReason.CANCELLED}" == "cancelled" and "web" == Door.WEB


class _Broken(SessionObserver):
    def login(self, user, rhost, door, result, reason):  # type: ignore[no-untyped-def]
        raise RuntimeError("observer bug")

    def containers_reaped(self, count: int) -> None:
        raise RuntimeError("observer bug")


class _Recorder(SessionObserver):
    def __init__(self) -> None:
        self.seen: list[tuple[object, ...]] = []

    def login(self, user, rhost, door, result, reason):  # type: ignore[no-untyped-def]
        self.seen.append(("login", user, door, result))

    def session_refused(self, user: AuthenticatedUser, door: Door, detail: str, profile: str = "default") -> None:
        self.seen.append(("refused", user.name, door, detail))

    def containers_reaped(self, count: int) -> None:
        self.seen.append(("reaped", count))


def test_a_failing_observer_is_logged_and_the_others_still_hear(caplog):
    observers, recorder = Observers(), _Recorder()
    observers.add(_Broken(), recorder)
    with caplog.at_level(logging.ERROR, logger="termbridge.sessions"):
        observers.login("alice", "192.0.2.1", Door.WEB, LoginResult.DENIED, "bad password")
        observers.containers_reaped(2)
        observers.session_refused(AuthenticatedUser("alice", 1000, 1000), Door.SSH, "x")
    assert recorder.seen == [
        ("login", "alice", Door.WEB, LoginResult.DENIED),
        ("reaped", 2),
        ("refused", "alice", Door.SSH, "x"),
    ]
    assert [r.getMessage() for r in caplog.records] == [
        "observer _Broken failed on login",
        "observer _Broken failed on containers_reaped",
    ]

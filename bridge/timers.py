"""The session clocks as pure functions, testable alone: when an idle session is warned and
ended, and how a stopped container is described to the person."""

from __future__ import annotations

import enum

from .backends.base import ContainerState


class IdleAction(enum.Enum):
    WAIT = "wait"
    WARN = "warn"
    END = "end"


def warn_before(idle_timeout: float) -> float:
    """How long before an idle end the person is warned: min(60 s, timeout / 3)."""
    return min(60.0, idle_timeout / 3)


def idle_step(last_activity: float, now: float, timeout: float, warned: bool) -> tuple[IdleAction, float]:
    """What the idle clock says at `now`, and how long until it next has something to say.

    A pure function of (last activity, now, limit, already warned), so it is testable alone.
    """
    remaining = last_activity + timeout - now
    if remaining <= 0:
        return IdleAction.END, 0.0
    lead = warn_before(timeout)
    if remaining <= lead:
        return (IdleAction.WAIT if warned else IdleAction.WARN), remaining
    return IdleAction.WAIT, remaining - lead


def describe_end(state: ContainerState, memory: int) -> str | None:
    """Why a container stopped, in words for the person; None while it runs."""
    if state.gone:
        return "your container was removed"
    if state.oom_killed:
        return f"your container ran out of memory ({memory // 2**20} MiB) and was stopped"
    if not state.running:
        return f"your container stopped (exit code {state.exit_code})"
    return None

"""Who may use which profile: the entitlement rule, read afresh at every login and session start.

A person is entitled to every `[profiles.NAME]` one of whose `groups` they are in right now (host
groups, primary group included). Entitled to none: the default profile ([session]). To one: that
one. To several: the one they ask for (the web chooser, `ssh alice+NAME@host`), else the one they
last chose on the chooser page if it is still theirs, else the first of theirs in the config
file's order. A name that is no profile, or one not open to them, is refused with a clear message.
"""

from __future__ import annotations

import asyncio
import logging

from .auth import groups_of
from .config import Config, ProfileConfig
from .errors import ProfileRefused

log = logging.getLogger("termbridge.profiles")


def entitled_in(config: Config, groups: frozenset[str]) -> list[ProfileConfig]:
    """The profiles a member of `groups` may use, in config order; the default one if none."""
    found = [p for p in config.profiles if groups & frozenset(p.groups)]
    return found or [config.default_profile]


async def entitled(config: Config, username: str) -> list[ProfileConfig]:
    """`username`'s profiles now (groups read afresh; NSS may block, so in a thread)."""
    if not config.profiles:
        return [config.default_profile]
    return entitled_in(config, await asyncio.to_thread(groups_of, username))


def pick(
    config: Config, username: str, mine: list[ProfileConfig], requested: str | None, remembered: str | None = None
) -> ProfileConfig:
    """The profile a session of `username` gets among `mine` (see the module's rule). Raises
    ProfileRefused for a requested name that is unknown or not among `mine`."""
    if requested is not None:
        for profile in mine:
            if profile.name == requested:
                return profile
        known = config.profile(requested) is not None
        log.warning("profile %r refused for %s: %s", requested[:40], username, "not theirs" if known else "no such profile")
        names = ", ".join(p.name for p in mine)
        if known:
            raise ProfileRefused(
                f"the profile {requested!r} is not open to you (yours: {names})",
                detail=f"{username} asked for profile {requested!r}, which is not theirs (theirs: {names})",
            )
        raise ProfileRefused(
            f"there is no profile {requested[:40]!r} here (yours: {names})",
            detail=f"{username} asked for profile {requested[:40]!r}, which does not exist",
        )
    for profile in mine:
        if profile.name == remembered:
            return profile
    return mine[0]


async def choose(config: Config, username: str, requested: str | None, remembered: str | None = None) -> ProfileConfig:
    """`pick` among `username`'s profiles as they are now."""
    return pick(config, username, await entitled(config, username), requested, remembered)

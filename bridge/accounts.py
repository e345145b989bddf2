"""Accounts that may no longer log in lose what they still have.

A login (a web cookie, an SSH connection) outlives the moment PAM vouched for it. When the admin
locks, expires or deletes an account, gives it a nologin shell or takes it out of
`auth.allowed_groups`, a fresh login is refused; this module makes the old ones follow: every web
session start or resume asks again, and every `auth.account_recheck` the accounts of all live
sessions are asked again, and those refused end (reason `killed`, by `account`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from .auth import AuthenticatedUser, Outcome
from .errors import AccountRefused, AuthUnavailable, StoreUnavailable
from .sessions import SessionManager
from .throttle import ThrottledAuthenticator
from .vocab import Actor

log = logging.getLogger("termbridge.accounts")

ACCOUNT_REFUSED = AccountRefused.user_message


class AccountGuard:
    """Asks PAM (the password-less checks of a key login: name, shell, groups, locked, PAM's
    account stage) whether accounts that logged in earlier still may, and ends what they hold
    when not. `forget` drops the account's other credentials (the web door's logins)."""

    def __init__(
        self, manager: SessionManager, authenticator: ThrottledAuthenticator, interval: float,
        forget: Callable[[str], Awaitable[None]] | None = None,
    ) -> None:
        self.manager = manager
        self.authenticator = authenticator
        self.interval = interval
        self.forget = forget

    async def check(self, user: AuthenticatedUser, rhost: str | None = None) -> None:
        """Before a session starts or resumes: raises AccountRefused (after ending everything the
        account has here) unless `user` may still log in as the same account (same uid), and
        AuthUnavailable when PAM does not answer (a login would be refused too; nothing ends)."""
        result = await self.authenticator.recheck(user.name, rhost)
        if result.outcome is Outcome.UNAVAILABLE:
            raise AuthUnavailable(detail=f"account re-check of {user.name}: {result.reason}")
        if result.ok and result.user is not None and result.user.uid == user.uid:
            return
        reason = result.reason if not result.ok else f"uid changed from {user.uid} to {result.user and result.user.uid}"
        await self._refuse(user.name, reason)
        raise AccountRefused(detail=f"{user.name} may no longer log in: {reason}")

    async def _refuse(self, username: str, reason: str) -> None:
        if self.forget is not None:
            try:
                await self.forget(username)
            except StoreUnavailable as exc:
                log.error("account %s: its web logins not ended: %s", username, exc.detail)
        doomed = [s for s in self.manager.list() if s.user.name == username]
        if doomed:
            log.warning("account %s may no longer log in (%s): ending %d session(s)", username, reason, len(doomed))
        await asyncio.gather(
            *(self.manager.kill(s, ACCOUNT_REFUSED, actor=Actor.ACCOUNT) for s in doomed), return_exceptions=True
        )

    async def sweep(self) -> None:
        """Ask again for every account with a live session, one at a time (PAM's threads are
        shared with logins)."""
        users = {s.user.name: s.user for s in self.manager.list()}
        for user in users.values():
            try:
                await self.check(user)
            except AccountRefused:
                pass
            except AuthUnavailable as exc:
                log.warning("%s; its sessions go on", exc.detail)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.sweep()
            except Exception:
                log.exception("account re-check failed; trying again in %.0f s", self.interval)

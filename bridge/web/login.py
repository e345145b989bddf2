"""Web logins: the signed login cookie and the registry behind it, the login and logout forms
(CSRF-protected), and ending a login's terminals when it goes.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web

from ..auth import AuthenticatedUser, Outcome, member_of, printable_username
from ..errors import StoreUnavailable
from ..store import LoginRecord, Store
from ..vocab import Actor, Door
from .http import client_address, origin_allowed, page, request_scheme
from .keys import AUTHENTICATOR, CONFIG, LOGINS, MANAGER
from .paths import base_path, redirect, under

log = logging.getLogger("termbridge.web")

COOKIE_NAME = "termbridge_login"
CSRF_COOKIE = "termbridge_csrf"
LOGIN_TTL = 12 * 3600
WATCH_INTERVAL = 1.0  # how soon a gateway ends its terminals of a login ended elsewhere
LOGIN_FAILED = "Login failed: the username or password is wrong, or this account may not log in here."
FORM_EXPIRED = "This login form has expired or came from another site. Please log in again."
THROTTLED = "Too many failed logins. Try again in {minutes} minute(s)."


@dataclass
class LoginState:
    """What this gateway knows of one login beyond the store: its terminals here, and whether it
    ended. Shared by every `Login` this gateway hands out for that login."""

    user: str
    expires: float
    sessions: set[str] = field(default_factory=set)
    revoked: bool = False  # logged out: a terminal still starting for it must not go live


@dataclass
class Login:
    id: str
    user: AuthenticatedUser
    state: LoginState

    @property
    def expires(self) -> float:
        return self.state.expires

    @property
    def sessions(self) -> set[str]:
        """This gateway's terminals of the login."""
        return self.state.sessions

    @property
    def revoked(self) -> bool:
        return self.state.revoked


class LoginRegistry:
    """Web logins, kept in the state store so that every gateway sharing it honours them: a
    signed cookie names a login; logout deletes it from the store, and each gateway ends its own
    terminals of a login that is gone within WATCH_INTERVAL (`watch`), also those that were still
    starting. The store forgets expired logins; `watch` forgets their local state.

    The cookie's signing key is derived from the store's key file, which replicas share anyway."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._secret = store.derive_key("login cookie")
        self._local: dict[str, LoginState] = {}  # kept until the login expires or is found gone

    def __len__(self) -> int:
        """How many logins this gateway holds state for."""
        return len(self._local)

    def _sign(self, payload: bytes) -> str:
        return base64.urlsafe_b64encode(hmac.new(self._secret, payload, hashlib.sha256).digest()).decode().rstrip("=")

    def _login(self, record: LoginRecord) -> Login:
        state = self._local.setdefault(record.id, LoginState(record.user, record.expires))
        return Login(record.id, AuthenticatedUser(record.user, record.uid, record.gid), state)

    async def issue(self, user: AuthenticatedUser) -> tuple[Login, str]:
        self._forget_expired(time.time())
        record = LoginRecord(secrets.token_urlsafe(18), user.name, user.uid, user.gid, time.time() + LOGIN_TTL)
        await self._store.put_login(record)
        payload = base64.urlsafe_b64encode(f"{record.id}:{int(record.expires)}".encode()).decode().rstrip("=")
        return self._login(record), f"{payload}.{self._sign(payload.encode())}"

    async def lookup(self, cookie: str | None) -> Login | None:
        """The login the cookie names, if its signature holds and the store still has it."""
        if not cookie or len(cookie) > 512 or "." not in cookie:
            return None
        payload, _, signature = cookie.partition(".")
        if not hmac.compare_digest(signature, self._sign(payload.encode())):
            return None
        try:
            login_id, _, _ = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return None
        record = await self._store.get_login(login_id, time.time())
        if record is None:
            return None
        return self._login(record)

    async def revoke(self, login: Login, successor: Login | None = None) -> None:
        """Log `login` out everywhere. With a `successor` (the same person logged in again in this
        browser) its terminals here, also those still starting, belong to the successor; else the
        caller ends `login.sessions`, and one still starting refuses to go live."""
        await self._store.delete_login(login.id)
        if successor is None:
            login.state.revoked = True
            return
        successor.sessions.update(login.sessions)
        login.state.sessions = successor.sessions
        self._local.pop(login.id, None)  # its terminals are the successor's to watch

    async def revoke_user(self, username: str) -> None:
        """Log out every login of `username` (the account may no longer log in), on every gateway.
        The caller ends the account's sessions here (with its own message, so `watch` is told
        to leave these logins alone); other gateways' watches end theirs."""
        for login_id, state in list(self._local.items()):
            if state.user == username:
                state.revoked = True
                del self._local[login_id]
        await self._store.delete_logins_of(username)

    def _forget_expired(self, now: float) -> None:
        """Local state of logins that expired with no terminal here (the store forgets them too)."""
        for login_id, state in list(self._local.items()):
            if not state.sessions and state.expires <= now:
                del self._local[login_id]

    async def watch(self, end: Callable[[Login], Awaitable[None]], interval: float = WATCH_INTERVAL) -> None:
        """Forever: end this gateway's terminals of logins that are gone from the store (logged
        out on any gateway, or expired), and forget expired logins. A store that does not answer
        ends nothing."""
        while True:
            await asyncio.sleep(interval)
            now = time.time()
            self._forget_expired(now)
            for login_id, state in list(self._local.items()):
                if not state.sessions:
                    continue
                try:
                    record = await self._store.get_login(login_id, now)
                except StoreUnavailable as exc:
                    log.warning("login watch: %s", exc.detail)
                    break
                if record is None and self._local.get(login_id) is state:  # else revoked here meanwhile
                    state.revoked = True
                    del self._local[login_id]
                    await end(Login(login_id, AuthenticatedUser(state.user, -1, -1), state))

    def form_token(self, purpose: str, binding: str) -> str:
        """A CSRF token for a form: only this gateway's fleet can make it, and only for `binding`
        (the browser's CSRF cookie for the login form, the login's id for logout)."""
        return self._sign(f"{purpose}:{binding}".encode())

    def form_token_ok(self, purpose: str, binding: str | None, token: str) -> bool:
        return bool(binding) and hmac.compare_digest(token.encode(), self.form_token(purpose, binding).encode())


async def current_login(request: web.Request) -> Login | None:
    """The request's login; a store that does not answer is a 503 with a line in the log."""
    try:
        return await request.app[LOGINS].lookup(request.cookies.get(COOKIE_NAME))
    except StoreUnavailable as exc:
        log.error("login lookup from %s failed: %s", client_address(request), exc.detail)
        raise web.HTTPServiceUnavailable(text=exc.user_message) from None


async def current_admin(request: web.Request) -> Login:
    """The request's login if its user is in `auth.admin_groups` at this moment: 401 without a
    login, 403 (and a log line) for anyone else. Asked at every admin request and socket, so
    that removing someone from the group takes effect at once."""
    login = await current_login(request)
    if login is None:
        raise web.HTTPUnauthorized(text="Log in first.")
    if not await member_of(login.user.name, request.app[CONFIG].auth.admin_groups):
        log.warning("admin request %s refused for %s from %s: not in auth.admin_groups",
                    request.rel_url.raw_path, login.user.name, client_address(request))
        raise web.HTTPForbidden(text="This page is for members of the gateway's admin groups.")
    return login


def _login_page(request: web.Request, status: int = 200, error: str = "", username: str = "") -> web.Response:
    """The login form with a CSRF token bound to this browser's CSRF cookie (made if missing)."""
    binding = request.cookies.get(CSRF_COOKIE, "")
    if not (16 <= len(binding) <= 64 and binding.replace("-", "").replace("_", "").isalnum()):
        binding = secrets.token_urlsafe(24)
    token = request.app[LOGINS].form_token("login", binding)
    response = page(
        request, "login.html", status=status, error=error, error_class="" if error else "hidden",
        invalid="true" if status == 401 else "false", username=username, csrf=token,
    )
    response.set_cookie(
        CSRF_COOKIE, binding, httponly=True, samesite="Strict", secure=request_scheme(request) == "https",
        path=under(request.app, "login"),
    )
    return response


async def login_form(request: web.Request) -> web.StreamResponse:
    return _login_page(request)


async def login_submit(request: web.Request) -> web.StreamResponse:
    if not origin_allowed(request, required=False):
        log.warning("login refused: Origin %r from %s", request.headers.get("Origin"), client_address(request))
        raise web.HTTPForbidden(text="cross-origin login refused")
    form = await request.post()
    username = str(form.get("username", "")).strip()
    password = str(form.get("password", ""))
    rhost = client_address(request)
    logins = request.app[LOGINS]
    if not logins.form_token_ok("login", request.cookies.get(CSRF_COOKIE), str(form.get("csrf", ""))):
        log.warning("login refused: missing or wrong CSRF token from %s", rhost)
        return _login_page(request, status=403, error=FORM_EXPIRED)
    result = await request.app[AUTHENTICATOR].authenticate(username, password, rhost)
    request.app[MANAGER].note_login(printable_username(username), rhost, Door.WEB, result.outcome, result.reason)
    if result.outcome is Outcome.THROTTLED:
        response = _login_page(
            request, status=429, error=THROTTLED.format(minutes=-(-result.retry_after // 60)), username=username
        )
        response.headers["Retry-After"] = str(result.retry_after)
        return response
    if result.outcome is Outcome.UNAVAILABLE:
        error = "Login is unavailable right now; try again later."
        return _login_page(request, status=503, error=error, username=username)
    if not result.ok or result.user is None:
        return _login_page(request, status=401, error=LOGIN_FAILED, username=username)
    previous = await current_login(request)
    try:
        login, cookie = await logins.issue(result.user)  # always a new id: a cookie set before login is worthless
        if previous is not None:
            same = previous.user.name == login.user.name
            await logins.revoke(previous, successor=login if same else None)
    except StoreUnavailable as exc:
        log.error("login of %s from %s not recorded: %s", result.user.name, rhost, exc.detail)
        return _login_page(request, status=503, error=exc.user_message.capitalize() + ".", username=username)
    if previous is not None and previous.user.name != login.user.name:
        await end_terminals(request.app, previous, "another account logged in from this browser")
    response = redirect(request.app)
    response.set_cookie(
        COOKIE_NAME,
        cookie,
        max_age=LOGIN_TTL,
        httponly=True,
        samesite="Lax",
        secure=request_scheme(request) == "https",
        path=base_path(request.app),
    )
    raise response


async def logout(request: web.Request) -> web.StreamResponse:
    if not origin_allowed(request, required=False):
        raise web.HTTPForbidden(text="cross-origin logout refused")
    login = await current_login(request)
    if login is not None:
        form = await request.post()
        if not request.app[LOGINS].form_token_ok("logout", login.id, str(form.get("csrf", ""))):
            log.warning("logout of %s refused: missing or wrong CSRF token", login.user.name)
            raise web.HTTPForbidden(text="logout refused: reload the page and try again")
        try:
            await request.app[LOGINS].revoke(login)
        except StoreUnavailable as exc:
            log.error("logout of %s failed: %s", login.user.name, exc.detail)
            raise web.HTTPServiceUnavailable(text=exc.user_message) from None
        await end_terminals(request.app, login, "you logged out", actor=Actor.LOGOUT)
        log.info("logout of %s", login.user.name)
    response = redirect(request.app, "login")
    response.del_cookie(COOKIE_NAME, path=base_path(request.app))
    raise response


async def end_terminals(app: web.Application, login: Login, message: str, actor: Actor = Actor.LOGOUT) -> None:
    manager = app[MANAGER]
    for session_id in list(login.sessions):
        session = manager.get(session_id)
        if session is not None:
            await manager.kill(session, message, actor=actor)


def setup_routes(app: web.Application) -> None:
    app.router.add_get(under(app, "login"), login_form)
    app.router.add_post(under(app, "login"), login_submit)
    app.router.add_post(under(app, "logout"), logout)

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
from dataclasses import dataclass, field

from aiohttp import web

from ..auth import AuthenticatedUser, Outcome, printable_username
from ..vocab import Actor, Door
from .http import client_address, origin_allowed, page, request_scheme
from .keys import AUTHENTICATOR, LOGINS, MANAGER

log = logging.getLogger("termbridge.web")

COOKIE_NAME = "termbridge_login"
CSRF_COOKIE = "termbridge_csrf"
LOGIN_TTL = 12 * 3600
LOGIN_PURGE_INTERVAL = 300  # expired logins are forgotten at least this often (and on each login)
LOGIN_FAILED = "Login failed: the username or password is wrong, or this account may not log in here."
FORM_EXPIRED = "This login form has expired or came from another site. Please log in again."
THROTTLED = "Too many failed logins. Try again in {minutes} minute(s)."


@dataclass
class Login:
    id: str
    user: AuthenticatedUser
    expires: float
    sessions: set[str] = field(default_factory=set)
    revoked: bool = False  # logged out: a terminal still starting for it must not go live


class LoginRegistry:
    """Web logins: a signed cookie names a login kept here; logout forgets it server-side."""

    def __init__(self, secret: bytes) -> None:
        self._secret = secret
        self._logins: dict[str, Login] = {}

    def _sign(self, payload: bytes) -> str:
        return base64.urlsafe_b64encode(hmac.new(self._secret, payload, hashlib.sha256).digest()).decode().rstrip("=")

    def __len__(self) -> int:
        return len(self._logins)

    def purge(self) -> int:
        """Forget expired logins (a cookie nobody brings back would stay forever); how many."""
        now = time.time()
        expired = [login for login in self._logins.values() if login.expires < now]
        for login in expired:
            self.revoke(login)
        return len(expired)

    def issue(self, user: AuthenticatedUser) -> tuple[Login, str]:
        self.purge()
        login = Login(id=secrets.token_urlsafe(18), user=user, expires=time.time() + LOGIN_TTL)
        self._logins[login.id] = login
        payload = base64.urlsafe_b64encode(f"{login.id}:{int(login.expires)}".encode()).decode().rstrip("=")
        return login, f"{payload}.{self._sign(payload.encode())}"

    def lookup(self, cookie: str | None) -> Login | None:
        if not cookie or len(cookie) > 512 or "." not in cookie:
            return None
        payload, _, signature = cookie.partition(".")
        if not hmac.compare_digest(signature, self._sign(payload.encode())):
            return None
        try:
            login_id, _, _ = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return None
        login = self._logins.get(login_id)
        if login is None or login.expires < time.time():
            self._logins.pop(login_id, None)
            return None
        return login

    def revoke(self, login: Login, successor: Login | None = None) -> None:
        """Forget `login`. With a `successor` (the same person logged in again in this browser)
        its terminals, also those still starting, belong to the successor; else they must end."""
        self._logins.pop(login.id, None)
        if successor is None:
            login.revoked = True
        else:
            successor.sessions |= login.sessions
            login.sessions = successor.sessions

    def revoke_user(self, username: str) -> None:
        """Forget every login of `username` (the account may no longer log in)."""
        for login in [login for login in self._logins.values() if login.user.name == username]:
            self.revoke(login)

    def form_token(self, purpose: str, binding: str) -> str:
        """A CSRF token for a form: only this gateway can make it, and only for `binding` (the
        browser's CSRF cookie for the login form, the login's id for logout)."""
        return self._sign(f"{purpose}:{binding}".encode())

    def form_token_ok(self, purpose: str, binding: str | None, token: str) -> bool:
        return bool(binding) and hmac.compare_digest(token.encode(), self.form_token(purpose, binding).encode())


async def purge_forever(logins: LoginRegistry) -> None:
    """Expired logins go even while nobody logs in."""
    while True:
        await asyncio.sleep(LOGIN_PURGE_INTERVAL)
        if purged := logins.purge():
            log.info("forgot %d expired login(s)", purged)


def current_login(request: web.Request) -> Login | None:
    return request.app[LOGINS].lookup(request.cookies.get(COOKIE_NAME))


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
        CSRF_COOKIE, binding, httponly=True, samesite="Strict", secure=request_scheme(request) == "https", path="/login"
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
    previous = current_login(request)
    login, cookie = logins.issue(result.user)  # always a new id: a cookie set before login is worthless
    if previous is not None:
        if previous.user.name == login.user.name:
            logins.revoke(previous, successor=login)
        else:
            logins.revoke(previous)
            await _end_terminals(request.app, previous, "another account logged in from this browser")
    response = web.HTTPSeeOther("/")
    response.set_cookie(
        COOKIE_NAME,
        cookie,
        max_age=LOGIN_TTL,
        httponly=True,
        samesite="Lax",
        secure=request_scheme(request) == "https",
        path="/",
    )
    raise response


async def logout(request: web.Request) -> web.StreamResponse:
    if not origin_allowed(request, required=False):
        raise web.HTTPForbidden(text="cross-origin logout refused")
    login = current_login(request)
    if login is not None:
        form = await request.post()
        if not request.app[LOGINS].form_token_ok("logout", login.id, str(form.get("csrf", ""))):
            log.warning("logout of %s refused: missing or wrong CSRF token", login.user.name)
            raise web.HTTPForbidden(text="logout refused: reload the page and try again")
        request.app[LOGINS].revoke(login)
        await _end_terminals(request.app, login, "you logged out", actor=Actor.LOGOUT)
        log.info("logout of %s", login.user.name)
    response = web.HTTPSeeOther("/login")
    response.del_cookie(COOKIE_NAME, path="/")
    raise response


async def _end_terminals(app: web.Application, login: Login, message: str, actor: Actor = Actor.LOGOUT) -> None:
    manager = app[MANAGER]
    for session_id in list(login.sessions):
        session = manager.get(session_id)
        if session is not None:
            await manager.kill(session, message, actor=actor)


def setup_routes(app: web.Application) -> None:
    app.router.add_get("/login", login_form)
    app.router.add_post("/login", login_submit)
    app.router.add_post("/logout", logout)

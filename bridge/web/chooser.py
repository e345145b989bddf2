"""The profile chooser: a person entitled to several profiles picks one after login. The choice
is remembered per user in the store (so it holds in every browser, on every gateway of the
fleet, and for plain `ssh alice@host`), can be changed from the status bar, and applies to the
person's next new session; a running session keeps the profile it started with.

The page only offers; the terminal's WebSocket names the profile and the server checks it
against the person's groups again (`terminal._open`), whatever the page sent.
"""

from __future__ import annotations

import html
import logging

from aiohttp import web

from ..config import ProfileConfig
from ..errors import ProfileRefused, StoreUnavailable
from ..profiles import entitled, pick
from .http import client_address, origin_allowed, page
from .keys import LOGINS, MANAGER, STORE
from .login import Login, current_login
from .paths import redirect, under

log = logging.getLogger("termbridge.web")


async def profiles_of(request: web.Request, login: Login) -> tuple[list[ProfileConfig], str | None]:
    """The login's profiles as its groups are now, and its remembered choice if still one of them
    (None when it has fewer than two, or chose none, or the store did not answer)."""
    username = login.user.name
    mine = await entitled(request.app[MANAGER].config, username)
    if len(mine) < 2:
        return mine, None
    try:
        remembered = await request.app[STORE].get_profile_choice(username)
    except StoreUnavailable as exc:
        log.warning("profile choice of %s not read: %s", username, exc.detail)
        return mine, None
    return mine, remembered if remembered in {p.name for p in mine} else None


def _size(value: int) -> str:
    gib = value / 1024**3
    return f"{gib:g} GiB" if gib >= 1 else f"{value / 1024**2:g} MiB"


def _minutes(seconds: float) -> str:
    return f"{seconds / 3600:g} h" if seconds >= 3600 else f"{seconds / 60:g} min"


def describe(profile: ProfileConfig) -> str:
    """The facts of a profile a person chooses by, in one line."""
    s = profile.session
    facts = [
        f"{s.cpus:g} CPU{'s' if s.cpus != 1 else ''}", f"{_size(s.memory)} memory", f"image {s.image}",
        f"ends after {_minutes(s.idle_timeout)} idle", "root shell" if s.user == "root" else "",
        "internet access" if s.network == "internet" else "",
    ]
    text = ", ".join(f for f in facts if f)
    return f"{profile.description} ({text})" if profile.description else text


def _options(mine: list[ProfileConfig], checked: str) -> str:
    """One radio button per profile, with its facts as its description."""
    items = []
    for i, profile in enumerate(mine):
        name = html.escape(profile.name)
        items.append(
            f'<div class="profile-option"><input type="radio" id="profile-{i}" name="profile" value="{name}"'
            f'{" checked" if profile.name == checked else ""} aria-describedby="profile-{i}-facts">'
            f'<label for="profile-{i}">{name}</label>'
            f'<p id="profile-{i}-facts" class="profile-facts">{html.escape(describe(profile))}</p></div>'
        )
    return "\n".join(items)


def _chooser(request: web.Request, login: Login, mine: list[ProfileConfig], checked: str, status: int = 200,
             error: str = "") -> web.Response:
    return page(
        request, "profile.html", status=status, markup={"options": _options(mine, checked)},
        user=login.user.name, csrf=request.app[LOGINS].form_token("profile", login.id),
        error=error, error_class="" if error else "hidden",
    )


async def chooser_page(request: web.Request) -> web.StreamResponse:
    login = await current_login(request)
    if login is None:
        raise redirect(request.app, "login")
    mine, remembered = await profiles_of(request, login)
    if len(mine) < 2:
        raise redirect(request.app)  # nothing to choose
    return _chooser(request, login, mine, remembered or mine[0].name)


async def choose_profile(request: web.Request) -> web.StreamResponse:
    """The chosen profile, checked against the login's groups now, then remembered."""
    if not origin_allowed(request, required=False):
        raise web.HTTPForbidden(text="cross-origin request refused")
    login = await current_login(request)
    if login is None:
        raise redirect(request.app, "login")
    form = await request.post()
    if not request.app[LOGINS].form_token_ok("profile", login.id, str(form.get("csrf", ""))):
        log.warning("profile choice of %s refused: missing or wrong CSRF token", login.user.name)
        raise web.HTTPForbidden(text="refused: reload the page and try again")
    mine, remembered = await profiles_of(request, login)
    requested = str(form.get("profile", ""))[:64]
    try:
        chosen = pick(request.app[MANAGER].config, login.user.name, mine, requested)
    except ProfileRefused as exc:
        checked = remembered or mine[0].name
        return _chooser(request, login, mine, checked, status=403, error=exc.user_message.capitalize() + ".")
    try:
        await request.app[STORE].put_profile_choice(login.user.name, chosen.name)
    except StoreUnavailable as exc:
        log.error("profile choice of %s not kept: %s", login.user.name, exc.detail)
        raise web.HTTPServiceUnavailable(text=exc.user_message) from None
    log.info("profile %s chosen by %s from %s", chosen.name, login.user.name, client_address(request))
    raise redirect(request.app)


def setup_routes(app: web.Application) -> None:
    app.router.add_get(under(app, "profile"), chooser_page)
    app.router.add_post(under(app, "profile"), choose_profile)

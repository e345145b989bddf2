"""The web door's file endpoints: list, download from and upload into a session's home directory.

Owner-only: the login must own the session named by `?session=` (`SessionManager.find_own`, the
same check a terminal's resume goes through); anyone else's session (or an unknown one) is "no
such session" (404), so ids cannot be probed. The work is done by
`homefiles` over SFTP on the session's existing SSH connection; this module translates its
errors into HTTP statuses with a JSON `{"error": ...}` body, and logs the detail.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from urllib.parse import quote

from aiohttp import web

from .. import homefiles
from ..homefiles import HomeFiles
from ..session import Session
from .http import client_address, origin_allowed
from .keys import CONFIG, MANAGER
from .login import current_login
from .paths import under

log = logging.getLogger("termbridge.web")

STATUS: dict[type[homefiles.FileError], int] = {
    homefiles.BadPath: 400,
    homefiles.OutsideHome: 403,
    homefiles.FileNotFound: 404,
    homefiles.WrongType: 409,
    homefiles.TooLarge: 413,
    homefiles.DiskFull: 507,
    homefiles.TransferFailed: 502,
}


def _error(status: int, message: str) -> web.HTTPException:
    exc = web.HTTPException(text=json.dumps({"error": message}), content_type="application/json")
    exc.set_status(status)
    return exc


async def _owned_session(request: web.Request) -> Session:
    login = await current_login(request)
    if login is None:
        raise _error(401, "log in first")
    session_id = request.query.get("session", "")
    session = request.app[MANAGER].find_own(session_id, login.user, "file request", rhost=client_address(request))
    if session is None or not session.connected or session.upstream is None:
        raise _error(404, "no such session: it may have ended")
    return session


def _translate(session: Session, what: str, exc: homefiles.FileError) -> web.HTTPException:
    status = next((code for cls, code in STATUS.items() if isinstance(exc, cls)), 400)
    if status >= 500:
        session.log.error("%s failed: %s", what, exc.detail)
    else:
        session.log.info("%s refused (%d): %s", what, status, exc.detail)
    if not session.connected:
        return _error(404, "the session ended")
    return _error(status, exc.user_message)


def content_disposition(name: str) -> str:
    """`attachment` with an ASCII fallback and the exact name in RFC 5987 form."""
    fallback = "".join(c if 32 <= ord(c) < 127 and c not in '"\\' else "_" for c in name) or "download"
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(name, safe='')}"


async def list_files(request: web.Request) -> web.StreamResponse:
    session = await _owned_session(request)
    path = request.query.get("path", "")
    if session.upstream is None:
        raise _error(409, "this session has no container yet")
    try:
        async with HomeFiles.open(session.upstream) as files:
            listing = await files.list(path)
    except homefiles.FileError as exc:
        raise _translate(session, f"listing {path!r}", exc) from None
    return web.json_response(
        {
            "path": listing.path,
            "display": listing.display,
            "entries": [entry.as_json() for entry in listing.entries],
            "truncated": listing.truncated,
            "max_upload": request.app[CONFIG].web.max_upload_size,
        },
        headers={"Cache-Control": "no-store"},
    )


async def download(request: web.Request) -> web.StreamResponse:
    session = await _owned_session(request)
    path = request.query.get("path", "")
    if session.upstream is None:
        raise _error(409, "this session has no container yet")
    response: web.StreamResponse | None = None
    try:
        async with HomeFiles.open(session.upstream) as files:
            remote = await files.stat_file(path)
            session.touch()
            response = web.StreamResponse(
                headers={
                    "Content-Type": "application/octet-stream",
                    "Content-Disposition": content_disposition(remote.name),
                    "X-Content-Type-Options": "nosniff",
                    "Cache-Control": "no-store",
                }
            )
            response.content_length = remote.size
            await response.prepare(request)
            async for chunk in files.read(remote):
                await response.write(chunk)
                session.touch()
    except homefiles.FileError as exc:
        if response is None or not response.prepared:
            raise _translate(session, f"download of {path!r}", exc) from None
        session.log.warning("download of %r broke off: %s", path, exc.detail)
        _abort(request)
        return response
    except ConnectionError as exc:
        session.log.info("download of %r broke off, the browser went away: %r", path, exc)
        return response or web.Response(status=400)
    await response.write_eof()
    session.log.info("downloaded %s (%d bytes)", remote.resolved, remote.size)
    return response


def _abort(request: web.Request) -> None:
    """The headers promised a length we cannot deliver: cut the connection so the browser
    reports a failed download instead of saving a short file."""
    if request.transport is not None:
        request.transport.close()


async def upload(request: web.Request) -> web.StreamResponse:
    if not origin_allowed(request, required=True):
        log.warning("upload refused: Origin %r from %s", request.headers.get("Origin"), client_address(request))
        raise _error(403, "cross-origin upload refused")
    session = await _owned_session(request)
    path = request.query.get("path", "")
    limit = request.app[CONFIG].web.max_upload_size
    length = request.content_length
    if session.upstream is None:
        raise _error(409, "this session has no container yet")

    async def chunks() -> AsyncIterator[bytes]:
        async for chunk in request.content.iter_chunked(homefiles.CHUNK):
            yield chunk

    try:
        async with HomeFiles.open(session.upstream) as files:
            session.touch()
            remote = await files.upload(path, chunks(), limit=limit, length=length, on_chunk=lambda _: session.touch())
            shown = homefiles.display_path(files.home, remote.resolved)
    except homefiles.FileError as exc:
        raise _translate(session, f"upload to {path!r}", exc) from None
    except ConnectionError as exc:
        session.log.info("upload to %r broke off, the browser went away: %r", path, exc)
        return web.Response(status=400, text="upload incomplete")
    session.log.info("uploaded %s (%d bytes)", remote.resolved, remote.size)
    return web.json_response({"path": shown, "name": remote.name, "size": remote.size}, status=201)


def setup_routes(app: web.Application) -> None:
    app.router.add_get(under(app, "files"), list_files)
    app.router.add_get(under(app, "files/download"), download)
    app.router.add_put(under(app, "files/upload"), upload)

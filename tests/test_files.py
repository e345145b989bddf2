"""File endpoints of the web door: confinement to the session's home, owner-only, limits, errors.

The path rules are unit-tested; everything else goes through a real gateway, a real container
and its sftp-server (the browser side is in test_browser_ux.py)."""

from __future__ import annotations

import hashlib
import os
import subprocess

import aiohttp
import pytest

from bridge import homefiles
from bridge.homefiles import BadPath, clean_relative, display_path, is_inside
from bridge.web.files import content_disposition
from helpers import session_containers

# -- the path rules (pure) -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "parts"),
    [
        ("", ()), (".", ()), ("./", ()), ("a", ("a",)), ("a/b", ("a", "b")), ("./a//b/", ("a", "b")),
        ("name with spaces.txt", ("name with spaces.txt",)), ("~", ("~",)), ("..a", ("..a",)), ("a..", ("a..",)),
        ("ünïcødé/文件", ("ünïcødé", "文件")), (".hidden", (".hidden",)),
    ],
)
def test_clean_relative_accepts_paths_inside(text, parts):
    assert clean_relative(text).parts == parts


@pytest.mark.parametrize(
    "text",
    [
        "..", "../x", "a/../b", "a/..", "./../../etc/passwd", "/etc/passwd", "/", "//x", "a\x00b", "a\nb",
        "tab\there", "del\x7f", "x" * 4097, "d/" + "n" * 256,
    ],
)
def test_clean_relative_refuses_paths_that_leave_or_are_malformed(text):
    with pytest.raises(BadPath) as info:
        clean_relative(text)
    assert info.value.user_message


def test_is_inside_compares_components_not_prefixes():
    assert is_inside("/home/al", "/home/al")
    assert is_inside("/home/al", "/home/al/x/y")
    assert not is_inside("/home/al", "/home/alice")
    assert not is_inside("/home/al", "/home/alice/x")
    assert not is_inside("/home/al", "/home")
    assert not is_inside("/home/al", "/")
    assert not is_inside("/root", "/etc/passwd")
    assert is_inside("/", "/anything")


def test_display_path_and_content_disposition():
    assert display_path("/home/al", "/home/al") == "~"
    assert display_path("/home/al", "/home/al/d/f.txt") == "~/d/f.txt"
    assert content_disposition("report.pdf") == "attachment; filename=\"report.pdf\"; filename*=UTF-8''report.pdf"
    header = content_disposition('naïve "quote".txt')
    assert 'filename="na_ve _quote_.txt"' in header
    assert "filename*=UTF-8''na%C3%AFve%20%22quote%22.txt" in header


def test_error_statuses_cover_every_file_error():
    from bridge.web.files import STATUS

    errors = {cls for cls in vars(homefiles).values() if isinstance(cls, type) and issubclass(cls, homefiles.FileError)}
    assert errors - {homefiles.FileError} == set(STATUS)


# -- through a real gateway and container ------------------------------------------------------------


async def _session(gateway, user):
    http = await gateway.login(user)
    term = await gateway.terminal(http)
    session = await term.control("session")
    await term.expect(b"$ ")
    return http, term, session["id"]


async def _end(term, http) -> None:
    await term.send("exit\r")
    await term.drain_until_closed()
    await http.close()


def _query(session_id: str, path: str) -> dict[str, str]:
    return {"session": session_id, "path": path}


async def _put(gateway, http, session_id, path, data, **kwargs):
    return await http.put(
        "/files/upload", params=_query(session_id, path), data=data, headers={"Origin": gateway.origin}, **kwargs
    )


async def _error(resp: aiohttp.ClientResponse) -> str:
    assert resp.content_type == "application/json", await resp.text()
    return (await resp.json())["error"]


async def test_upload_list_download_round_trip(gateway, user):
    http, term, sid = await _session(gateway, user)
    blob = os.urandom(5 * 1024 * 1024 + 123)
    resp = await _put(gateway, http, sid, "blob.bin", blob)
    assert resp.status == 201, await resp.text()
    assert await resp.json() == {"path": "~/blob.bin", "name": "blob.bin", "size": len(blob)}

    inside = await term.run("sha256sum ~/blob.bin; ls -A ~")
    assert hashlib.sha256(blob).hexdigest() in inside
    assert ".part" not in inside  # the temporary name is gone once the upload is complete

    listing = await (await http.get("/files", params={"session": sid})).json()
    assert listing["path"] == "" and listing["display"] == "~"
    assert {"name": "blob.bin", "type": "file", "size": len(blob)}.items() <= next(
        e for e in listing["entries"] if e["name"] == "blob.bin"
    ).items()
    assert listing["max_upload"] == gateway.config.web.max_upload_size

    resp = await http.get("/files/download", params=_query(sid, "blob.bin"))
    assert resp.status == 200
    assert resp.headers["Content-Disposition"].startswith('attachment; filename="blob.bin"')
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    assert resp.headers["Content-Length"] == str(len(blob))
    digest = hashlib.sha256()
    async for chunk in resp.content.iter_chunked(65536):
        digest.update(chunk)
    assert digest.hexdigest() == hashlib.sha256(blob).hexdigest()

    # into a subdirectory, replacing a file, and a symlink that stays inside the home
    await term.run("mkdir -p ~/sub/deeper && echo old > ~/sub/deeper/note.txt && ln -s sub/deeper/note.txt ~/alias")
    resp = await _put(gateway, http, sid, "sub/deeper/note.txt", b"new contents\n")
    assert resp.status == 201 and (await resp.json())["path"] == "~/sub/deeper/note.txt"
    resp = await http.get("/files/download", params=_query(sid, "alias"))
    assert resp.status == 200 and await resp.read() == b"new contents\n"
    listing = await (await http.get("/files", params=_query(sid, "sub"))).json()
    assert listing["display"] == "~/sub" and [e["name"] for e in listing["entries"]] == ["deeper"]
    home = await (await http.get("/files", params={"session": sid})).json()
    alias = next(e for e in home["entries"] if e["name"] == "alias")
    assert alias["type"] == "link" and alias["target"] == "file"

    # the clear errors: not found, a directory where a file is needed, a missing directory
    resp = await http.get("/files/download", params=_query(sid, "nope.txt"))
    assert resp.status == 404 and "no such file" in await _error(resp)
    resp = await http.get("/files/download", params=_query(sid, "sub"))
    assert resp.status == 409 and "not a regular file" in await _error(resp)
    resp = await _put(gateway, http, sid, "missing-dir/x.bin", b"x")
    assert resp.status == 404 and "no such directory" in await _error(resp)
    resp = await _put(gateway, http, sid, "sub", b"x")
    assert resp.status == 409
    await _end(term, http)


async def test_paths_leading_outside_the_home_are_refused(gateway, user):
    http, term, sid = await _session(gateway, user)
    await term.run("ln -s /etc ~/etc-link && ln -s /etc/passwd ~/pw && ln -s .. ~/up && echo mine > ~/mine.txt")

    for path in ("../../etc/passwd", "..", "sub/../../x", "/etc/passwd", "a\x00b"):
        resp = await http.get("/files/download", params=_query(sid, path))
        assert resp.status == 400, path
        assert "'..'" in await _error(resp) or "absolute" in (await _error(resp)) or "control" in await _error(resp)
        resp = await _put(gateway, http, sid, path, b"evil")
        assert resp.status == 400, path
        resp = await http.get("/files", params=_query(sid, path))
        assert resp.status == 400, path

    for path in ("etc-link/passwd", "pw", "up", "etc-link"):
        resp = await http.get("/files/download", params=_query(sid, path))
        assert resp.status == 403, path
        assert "outside your home" in await _error(resp)
    # what a link resolves to counts, not how it is spelled: this one comes back inside
    resp = await http.get("/files/download", params=_query(sid, f"up/{user.name}/mine.txt"))
    assert resp.status == 200 and await resp.read() == b"mine\n"
    for path in ("etc-link", "up"):
        resp = await http.get("/files", params=_query(sid, path))
        assert resp.status == 403, path
    resp = await _put(gateway, http, sid, "etc-link/evil", b"evil")
    assert resp.status == 403 and "outside your home" in await _error(resp)
    resp = await _put(gateway, http, sid, "pw", b"evil")
    assert resp.status == 403 and "symbolic link" in await _error(resp)
    assert (await term.run("readlink ~/pw; cat ~/mine.txt")).split() == ["/etc/passwd", "mine"]
    await _end(term, http)


async def test_only_the_owner_reaches_a_sessions_files(gateway, make_user):
    alice, mallory = make_user(), make_user()
    http, term, sid = await _session(gateway, alice)
    await term.run("echo secret > ~/secret.txt")
    other = await gateway.login(mallory)
    anonymous = aiohttp.ClientSession(base_url=gateway.url)
    try:
        for client, status in ((other, 404), (anonymous, 401)):
            resp = await client.get("/files", params={"session": sid})
            assert resp.status == status
            resp = await client.get("/files/download", params=_query(sid, "secret.txt"))
            assert resp.status == status
            resp = await client.put(
                "/files/upload", params=_query(sid, "planted.txt"), data=b"x", headers={"Origin": gateway.origin}
            )
            assert resp.status == status
        resp = await other.get("/files", params={"session": "0" * 32})
        assert resp.status == 404 and "no such session" in await _error(resp)
        # a cross-site page cannot upload with the owner's cookie
        resp = await http.put("/files/upload", params=_query(sid, "x"), data=b"x", headers={"Origin": "http://evil.example"})
        assert resp.status == 403
        assert "planted.txt" not in await term.run("ls ~")
        resp = await http.get("/files/download", params=_query(sid, "secret.txt"))
        assert await resp.read() == b"secret\n"
    finally:
        await other.close()
        await anonymous.close()
    await _end(term, http)
    # once the session has ended, its files are gone with it
    http = await gateway.login(alice)
    resp = await http.get("/files", params={"session": sid})
    assert resp.status == 404
    await http.close()


async def _chunks(data: bytes, size: int = 64 * 1024):
    for i in range(0, len(data), size):
        yield data[i : i + size]


async def test_size_limit_and_disk_full(start_gateway, user):
    gateway = await start_gateway(web={"max_upload_size": "1m"})
    http, term, sid = await _session(gateway, user)

    # announced too large: refused before a byte is written
    resp = await _put(gateway, http, sid, "big.bin", os.urandom(1024 * 1024 + 1))
    assert resp.status == 413 and "upload limit of 1.0 MiB" in await _error(resp)
    # not announced (chunked): refused once the limit is crossed, and nothing is left behind
    resp = await _put(gateway, http, sid, "big.bin", _chunks(os.urandom(2 * 1024 * 1024)))
    assert resp.status == 413
    assert (await term.run("ls -A ~ | grep -c big || true")).strip() == "0"
    # exactly the limit is fine
    resp = await _put(gateway, http, sid, "limit.bin", os.urandom(1024 * 1024))
    assert resp.status == 201

    # a real full disk: a 256 KiB tmpfs mounted into the container's home by the admin (nsenter)
    await term.run("mkdir ~/small")
    (container,) = session_containers(**{"termbridge.session": sid})
    uid = (await term.run("id -u")).strip()
    subprocess.run(
        ["nsenter", "-t", str(container.attrs["State"]["Pid"]), "-m", "mount", "-t", "tmpfs",
         "-o", f"size=256k,uid={uid},gid={uid}", "tmpfs", f"/home/{user.name}/small"],
        check=True, capture_output=True,
    )
    resp = await _put(gateway, http, sid, "small/a.bin", os.urandom(512 * 1024))
    assert resp.status == 507 and "not enough space" in await _error(resp)
    resp = await _put(gateway, http, sid, "small/b.bin", _chunks(os.urandom(512 * 1024)))
    assert resp.status == 507 and "disk is full" in await _error(resp)
    assert (await term.run("ls -A ~/small | wc -l")).strip() == "0"  # the partial upload was removed
    resp = await _put(gateway, http, sid, "small/fits.bin", b"x" * 1000)
    assert resp.status == 201
    await _end(term, http)



async def test_an_upload_cut_off_midway_leaves_nothing(gateway, user, caplog):
    """The browser goes away in the middle of an upload: no partial file, no temporary file,
    no server error, and the session's files are still served."""
    import asyncio
    from urllib.parse import urlsplit

    http, term, sid = await _session(gateway, user)
    cookie = "; ".join(f"{c.key}={c.value}" for c in http.cookie_jar)
    host, port = urlsplit(gateway.url).hostname, urlsplit(gateway.url).port
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(
        f"PUT /files/upload?session={sid}&path=cut.bin HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Origin: {gateway.origin}\r\nCookie: {cookie}\r\nContent-Length: 5000000\r\n\r\n".encode()
    )
    writer.write(os.urandom(1_000_000))
    await writer.drain()
    await asyncio.sleep(1)
    writer.transport.abort()
    await asyncio.sleep(1)
    assert (await term.run("ls -A ~ | grep -c cut || true")).strip() == "0"
    resp = await http.get("/files", params={"session": sid})
    assert resp.status == 200
    assert not [r for r in caplog.records if r.levelname == "ERROR" and r.name.startswith("aiohttp")]
    await _end(term, http)


async def test_a_name_of_sixty_emoji_uploads_and_downloads(gateway, user):
    """60 emoji are 240 bytes of UTF-8, a valid name (at most 255 bytes): the temporary name the
    upload is written to first must fit too, whatever the final name."""
    name = "\N{GRINNING FACE}" * 60
    assert len(name.encode()) == 240
    http, term, sid = await _session(gateway, user)
    resp = await _put(gateway, http, sid, name, b"emoji\n")
    assert resp.status == 201, await resp.text()
    assert (await resp.json())["name"] == name
    resp = await http.get("/files/download", params=_query(sid, name))
    assert resp.status == 200 and await resp.read() == b"emoji\n"
    assert (await term.run("ls -A ~ | grep -c '[.]part$' || true")).strip() == "0"
    await _end(term, http)

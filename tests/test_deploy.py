"""The deploy kit through the real things: Debian's nginx with etc/nginx/termbridge.conf and a
self-signed certificate in front of a gateway, the systemd unit checked by systemd itself, and
`pip install .` into a throwaway venv serving the login page and xterm.js."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import re
import resource
import shutil
import signal
import socket
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from bridge.cli import EXIT_CONFIG
from bridge.web.login import COOKIE_NAME
from helpers import (
    PROMPT, ROOT, Gateway, Terminal, containers_gone, free_port, self_signed_cert, stop_process, wait_for,
    write_config,
)

NGINX = Path("/usr/sbin/nginx")
SITE = ROOT / "etc" / "nginx" / "termbridge.conf"
REPLICAS = ROOT / "etc" / "nginx" / "replicas.conf"
SUBPATH = ROOT / "etc" / "nginx" / "subpath.conf"
UNIT = ROOT / "etc" / "systemd" / "termbridge.service"
CLIENT_ADDRESS = "127.0.0.2"  # the loopback range is all ours: a client address that is not nginx's own


def replace_once(text: str, old: str, new: str) -> str:
    """Edit the shipped file; fail loudly if it no longer has the shape this test expects."""
    assert text.count(old) == 1, f"{old!r} should occur once in {SITE}"
    return text.replace(old, new)


def spki_pin(cert: Path) -> str:
    """The certificate's public key as Chromium's --ignore-certificate-errors-spki-list takes it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    key = x509.load_pem_x509_certificate(cert.read_bytes()).public_key()
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(der).digest()).decode()


@dataclass
class Nginx:
    https: str
    http: str
    cert: Path


async def _port_open(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    return True


@pytest.fixture
async def nginx_in_front(tmp_path: Path) -> AsyncIterator:
    """Starts Debian's nginx, as a child process with a private prefix, running the shipped site
    in front of a gateway address; stopped after the test."""
    if not NGINX.exists():
        pytest.fail(f"{NGINX} missing: apt-get install nginx (`make test` does)")
    procs: list[subprocess.Popen] = []

    async def start(*gateway_urls: str, subpath: bool = False) -> Nginx:
        """One gateway: the shipped site as is; several: with the upstream of etc/nginx/replicas.conf.
        `subpath`: the site's locations replaced by etc/nginx/subpath.conf (the terminal under
        /terminal/ of a site whose other paths are not termbridge's), included as it ships."""
        prefix = tmp_path / "nginx"
        prefix.mkdir()
        cert, key = self_signed_cert(prefix)
        https_port, http_port = free_port(), free_port()
        site = SITE.read_text()
        if len(gateway_urls) > 1:
            upstream = REPLICAS.read_text()
            upstream = upstream[upstream.index("upstream termbridge {"):]
            # Each `server` line keeps its parameters (max_fails=0); only the address changes.
            params = re.findall(r"    server 127\.0\.0\.1:\d+([^;\n]*);\n", upstream)
            servers = "".join(f"    server {url.removeprefix('http://')}{params[0] if params else ''};\n" for url in gateway_urls)
            upstream = re.sub(r"(    server 127\.0\.0\.1:\d+[^;\n]*;\n)+", servers, upstream)
            assert servers in upstream, f"{REPLICAS} should list its gateways as `server` lines"
            start, end = site.index("upstream termbridge {"), site.index("}", site.index("upstream termbridge {")) + 2
            site = site[:start] + upstream + site[end:]
        else:
            site = replace_once(site, "server 127.0.0.1:8080;", f"server {gateway_urls[0].removeprefix('http://')};")
        site = replace_once(site, "listen 443 ssl;", f"listen 127.0.0.1:{https_port} ssl;")
        site = replace_once(site, "listen 80;", f"listen 127.0.0.1:{http_port};")
        site = replace_once(site, "listen [::]:443 ssl;\n", "")
        site = replace_once(site, "listen [::]:80;\n", "")
        site = replace_once(site, "/etc/letsencrypt/live/term.example.org/fullchain.pem", str(cert))
        site = replace_once(site, "/etc/letsencrypt/live/term.example.org/privkey.pem", str(key))
        if subpath:
            first, last = site.index("    # Metrics are for the monitoring host"), site.rindex("}")
            shutil.copy(SUBPATH, prefix / "subpath.conf")
            site = site[:first] + f"    include {prefix}/subpath.conf;\n    location / {{\n        return 404;\n    }}\n" + site[last:]
        (prefix / "termbridge.conf").write_text(site)
        temp = " ".join(f"{kind}_temp_path {prefix}/{kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        (prefix / "nginx.conf").write_text(
            f"user root root;\nworker_processes 1;\npid {prefix}/nginx.pid;\nerror_log {prefix}/error.log info;\n"
            f"events {{ worker_connections 64; }}\n"
            f"http {{\n  access_log {prefix}/access.log;\n  {temp}\n  include {prefix}/termbridge.conf;\n}}\n"
        )
        test = subprocess.run([str(NGINX), "-t", "-p", str(prefix), "-c", str(prefix / "nginx.conf"),
                               "-e", str(prefix / "error.log")], capture_output=True, text=True)
        assert test.returncode == 0, test.stderr
        proc = subprocess.Popen(
            [str(NGINX), "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-e", str(prefix / "error.log"),
             "-g", "daemon off;"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        procs.append(proc)

        async def listening() -> bool:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else "nginx exited"
            return await _port_open(https_port)

        await wait_for(listening, what="nginx to listen")
        return Nginx(f"https://127.0.0.1:{https_port}", f"http://127.0.0.1:{http_port}", cert)

    yield start
    for proc in procs:
        stop_process(proc, signal.SIGQUIT)  # graceful: workers finish, master exits


async def test_login_and_terminal_through_nginx_with_tls(start_gateway, nginx_in_front, user, tmp_path):
    audit = tmp_path / "audit.log"
    gateway = await start_gateway(web={"trusted_proxies": ["127.0.0.1"]}, audit={"log": str(audit)})
    front = await nginx_in_front(gateway.url)
    tls = ssl.create_default_context(cafile=str(front.cert))

    def connector() -> aiohttp.TCPConnector:
        return aiohttp.TCPConnector(ssl=tls, local_addr=(CLIENT_ADDRESS, 0))

    async with aiohttp.ClientSession(connector=connector()) as anon:
        resp = await anon.get(front.http + "/login", allow_redirects=False)
        assert resp.status == 301 and resp.headers["Location"].startswith("https://")
        resp = await anon.get(front.https + "/login")
        assert resp.status == 200 and 'name="password"' in await resp.text()
        assert resp.headers["Strict-Transport-Security"].startswith("max-age=")
        assert (await anon.get(front.https + "/metrics")).status == 404  # kept inside

    proxied = Gateway(front.https, gateway.config, gateway.app)
    async with await proxied.login(user, connector=connector()) as http:
        [cookie] = [c for c in http.cookie_jar if c.key == COOKIE_NAME]
        assert cookie["secure"] and cookie["httponly"]  # the gateway believed X-Forwarded-Proto
        ws = await http.ws_connect("/ws", headers={"Origin": front.https}, max_msg_size=0)
        term = Terminal(ws)
        await term.resize(90, 20)
        session = await term.control("session")
        await term.expect(PROMPT)
        assert (await term.run("stty size")).strip() == "20 90"
        assert (await term.run("echo through-$((6*7))")).strip() == "through-42"
        blob = bytes(range(256)) * 4096  # 1 MiB: far above the site's 64k body limit, which uploads are exempt from
        resp = await http.put("/files/upload", params={"session": session["id"], "path": "big.bin"}, data=blob,
                              headers={"Origin": front.https})
        assert resp.status == 201, await resp.text()
        assert (await term.run("sha256sum big.bin")).split()[0] == hashlib.sha256(blob).hexdigest()
        await term.send("exit\r")
        assert (await term.control("exit"))["reason"] == "exit"
        await term.drain_until_closed()
    await containers_gone(**{"termbridge.session": session["id"]})

    logins = [json.loads(line) for line in audit.read_text().splitlines() if '"login"' in line]
    assert [(e["user"], e["rhost"], e["ok"]) for e in logins] == [(user.name, CLIENT_ADDRESS, True)]


@pytest.mark.browser
async def test_the_terminal_under_a_sub_path_through_nginx_in_chromium(start_gateway, nginx_in_front, user, pw,
                                                                       tmp_path):
    """web.base_path = "/terminal/" behind etc/nginx/subpath.conf with TLS: log in, type, upload,
    download and log out in Chromium, every request under /terminal/ (nginx answers 404 for
    anything else, so a URL the page built without the base would fail)."""
    from playwright.async_api import expect

    from helpers import CHROMIUM, CHROMIUM_FLAGS, log_in, screen_line

    gateway = await start_gateway(web={"trusted_proxies": ["127.0.0.1"], "base_path": "/terminal/"})
    front = await nginx_in_front(gateway.url, subpath=True)
    proxied = Gateway(front.https, gateway.config, gateway.app)
    # Chromium trusts the test's self-signed certificate by its key. The context's
    # ignore_https_errors does not reach the download manager: a download that needs a new
    # connection was refused ("certificate unknown" in nginx's log) and reported "canceled".
    browser = await pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                       args=[*CHROMIUM_FLAGS, f"--ignore-certificate-errors-spki-list={spki_pin(front.cert)}"])
    context = await browser.new_context(accept_downloads=True)
    page = await context.new_page()
    requests: list[str] = []
    page.on("request", lambda request: requests.append(request.url))
    sockets: list[str] = []
    page.on("websocket", lambda ws: sockets.append(ws.url))

    await log_in(page, proxied, user)
    await expect(page).to_have_url(f"{front.https}/terminal/", timeout=15_000)
    await expect(page.locator("body")).to_have_attribute("data-state", "running", timeout=30_000)
    await expect(page.locator(".xterm-rows")).to_contain_text("$", timeout=30_000)
    [cookie] = [c for c in await context.cookies() if c["name"] == COOKIE_NAME]
    assert cookie["path"] == "/terminal/" and cookie["secure"] and cookie["httpOnly"]
    session_id = await page.locator("body").get_attribute("data-session")
    await page.locator(".xterm-helper-textarea").focus()
    await page.keyboard.type("echo sub-$((6*7)) > made.txt; cat made.txt")
    await page.keyboard.press("Enter")
    await expect(screen_line(page, "sub-42")).to_have_count(1, timeout=15_000)

    data = bytes(range(256)) * 4096  # 1 MiB: more than nginx's default body size
    async with page.expect_file_chooser() as chooser:
        await page.get_by_role("button", name="Upload").click()
    await (await chooser.value).set_files([{"name": "up.bin", "mimeType": "application/octet-stream", "buffer": data}])
    row = page.locator('#uploads li[data-name="up.bin"]')
    await expect(row).to_have_attribute("data-status", "done", timeout=60_000)
    await page.locator(".xterm-helper-textarea").focus()
    await page.keyboard.type("clear; sha256sum up.bin")
    await page.keyboard.press("Enter")
    await expect(screen_line(page, f"{hashlib.sha256(data).hexdigest()}  up.bin")).to_have_count(1, timeout=30_000)

    await page.get_by_role("button", name="Files").click()
    async with page.expect_download() as download_info:
        await page.locator("#files").get_by_role("link", name="made.txt").click()
    await (await download_info.value).save_as(tmp_path / "made.txt")
    assert (tmp_path / "made.txt").read_text() == "sub-42\n"
    await page.locator("#files").get_by_role("button", name="Close files").click()

    await page.locator(".xterm-helper-textarea").focus()
    await page.keyboard.type("exit")
    await page.keyboard.press("Enter")
    await expect(page.locator("#ended")).to_be_visible(timeout=15_000)
    await page.get_by_role("button", name="Log out").click()
    await expect(page).to_have_url(f"{front.https}/terminal/login", timeout=15_000)
    assert not [c for c in await context.cookies() if c["name"] == COOKIE_NAME]
    await context.close()
    await browser.close()
    await containers_gone(**{"termbridge.session": session_id})

    assert sockets and all(url.startswith(f"wss://127.0.0.1:{front.https.rsplit(':', 1)[1]}/terminal/ws") for url in sockets)
    outside = [url for url in requests if not url.startswith(f"{front.https}/terminal/")]
    assert not outside, outside
    assert any("/terminal/files/upload" in url for url in requests)
    assert any("/terminal/static/vendor/xterm/" in url for url in requests)


# -- systemd --------------------------------------------------------------------------------------


def test_systemd_unit_is_valid_and_restarts_on_failure(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze missing: apt-get install systemd (`make test` does)")
    text = UNIT.read_text()
    # systemd insists that ExecStart exists: point it at this checkout's termbridge for the check
    local = replace_once(text, "ExecStart=/opt/termbridge/bin/termbridge", f"ExecStart={Path(sys.executable).parent}/termbridge")
    local = replace_once(local, "ExecStartPre=/opt/termbridge/bin/termbridge",
                         f"ExecStartPre={Path(sys.executable).parent}/termbridge")
    unit = tmp_path / "termbridge.service"
    unit.write_text(local)
    verify = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True)
    assert verify.returncode == 0 and not verify.stderr.strip(), verify.stderr
    security = subprocess.run([analyze, "security", "--offline=yes", str(unit)], capture_output=True, text=True)
    exposure = float(security.stdout.split("Overall exposure level for termbridge.service:")[1].split()[0])
    assert exposure < 4.0, security.stdout  # systemd's own scale: below 4 is "OK"
    settings = unit_settings()
    assert settings["Restart"] == "on-failure"
    assert settings["Type"] == "notify" and settings["NotifyAccess"] == "main"
    assert settings["RestartPreventExitStatus"] == str(EXIT_CONFIG)
    assert settings["ExecStartPre"].endswith("check --pre-start --config /etc/termbridge/termbridge.toml")
    assert settings["ExecStart"].endswith("serve --config /etc/termbridge/termbridge.toml")
    assert settings["StateDirectory"] == "termbridge" and settings["StateDirectoryMode"] == "0700"
    assert "MemoryDenyWriteExecute" not in settings  # python-pam's ctypes callback needs it off


def unit_settings() -> dict[str, str]:
    return dict(line.split("=", 1) for line in UNIT.read_text().splitlines() if "=" in line and not line.startswith("#"))


def in_units_sandbox(command: list[str], writable: Path) -> list[str]:
    """`command` confined the way the unit confines the gateway, as far as it matters to PAM and
    Docker: the unit's capability bounding set, no new privileges, and every file system
    read-only except `writable` (what StateDirectory= and LogsDirectory= give it) and a private
    /var/tmp (PrivateTmp=; /tmp itself holds `writable`)."""
    settings = unit_settings()
    assert settings["NoNewPrivileges"] == "yes" and settings["ProtectSystem"] == "strict"
    assert settings["ProtectHome"] == "read-only" and settings["User"] == "root"
    caps = ",".join("+" + cap.removeprefix("CAP_").lower() for cap in settings["CapabilityBoundingSet"].split())
    assert settings["PrivateTmp"] == "yes"
    # ReadWritePaths= outside /run (which stays writable here) stay writable; Docker's storage,
    # often a file system of its own, is made read-only like the rest, as ProtectSystem=strict does
    extra = [p.lstrip("-") for p in settings["ReadWritePaths"].split() if not p.lstrip("-").startswith("/run/")]
    binds = "".join(f'mount --bind "{p}" "{p}" && ' for p in extra if Path(p).exists())
    docker_mount = subprocess.run(["findmnt", "-n", "-o", "TARGET", "-T", "/var/lib/docker"],
                                  capture_output=True, text=True).stdout.strip()
    docker_ro = f'mount -o remount,bind,ro "{docker_mount}" && ' if docker_mount not in ("", "/") else ""
    script = (f'mount --bind "{writable}" "{writable}" && mount -t tmpfs -o mode=1777 tmpfs /var/tmp && '
              f'mkdir -p -m 0700 /run/termbridge && mount --bind /run/termbridge /run/termbridge && '
              f'{binds}mount -o remount,bind,ro / && {docker_ro}'
              f'exec setpriv --no-new-privs --bounding-set -all,{caps} --inh-caps=-all -- "$@"')
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sandbox", *command]


@asynccontextmanager
async def gateway_process(command: list[str], port: int, cwd: Path) -> AsyncIterator[tuple[Gateway, subprocess.Popen]]:
    """A gateway started as a command (installed, sandboxed), answering /healthz; stopped after."""
    proc = subprocess.Popen(command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"

    async def healthy() -> bool:
        assert proc.poll() is None, f"the gateway exited: {proc.stderr.read() if proc.stderr else ''}"
        try:
            async with aiohttp.ClientSession() as http, http.get(url + "/healthz") as resp:
                return resp.status == 200
        except aiohttp.ClientError:
            return False

    try:
        await wait_for(healthy, timeout=30, what="the gateway to answer /healthz")
        yield Gateway(url, None, None), proc  # type: ignore[arg-type]
    finally:
        stop_process(proc)


async def one_session(gateway: Gateway, user, word: str) -> None:
    """Log in (PAM), open a terminal (Docker, then SSH into the container), echo, exit."""
    async with await gateway.login(user) as http:
        term = await gateway.terminal(http)
        session = await term.control("session")
        await term.expect(PROMPT)
        assert (await term.run(f"echo {word}-$((6*7))")).strip() == f"{word}-42"
        await term.send("exit\r")
        await term.control("exit")
    await containers_gone(**{"termbridge.session": session["id"]})


@pytest.mark.parametrize("network", ["isolated", "internet"])  # internet: writes the container's resolv.conf
async def test_the_gateway_works_inside_the_units_sandbox(tmp_path, pam_service, state_dir, user, network):
    port = free_port()
    audit = tmp_path / "audit.log"
    config = write_config(tmp_path / "gw.toml", state_dir(), pam_service, web={"listen": f"127.0.0.1:{port}"},
                          audit={"log": str(audit)}, session={"network": network})
    termbridge = [sys.executable, "-m", "bridge"]
    check = subprocess.run(in_units_sandbox([*termbridge, "check", "--config", str(config)], tmp_path),
                           capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr  # the unit's ExecStartPre
    serve = in_units_sandbox([*termbridge, "serve", "--config", str(config)], tmp_path)
    async with gateway_process(serve, port, ROOT) as (gateway, proc):
        status = Path(f"/proc/{proc.pid}/status").read_text()
        bounding = int(re.search(r"CapBnd:\s*([0-9a-f]+)", status).group(1), 16)
        # DAC_READ_SEARCH, NET_BIND_SERVICE, NET_ADMIN, SYS_PTRACE, SYS_ADMIN, AUDIT_WRITE
        assert bounding == sum(1 << bit for bit in (2, 10, 12, 19, 21, 29))
        assert re.search(r"NoNewPrivs:\s*1", status)
        await one_session(gateway, user, "sandboxed")
    assert '"session_end"' in audit.read_text()


# -- pip install ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Iterator[Path]:
    """`pip install` of a wheel built from a copy of this checkout, into a throwaway venv; its
    dependencies come from the test venv (no registry needed), termbridge itself only from the wheel."""
    tmp = tmp_path_factory.mktemp("install")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".venv", ".git", "__pycache__", "build", "*.egg-info", "test-artifacts", "node_modules", ".pytest_cache"))
    for package in ("@xterm", "asciinema-player"):
        shutil.copytree(ROOT / "web" / "node_modules" / package, src / "web" / "node_modules" / package)
    dist = tmp / "dist"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(dist), str(src)],
        capture_output=True, text=True, timeout=300,
    )
    assert build.returncode == 0, build.stderr
    [wheel] = dist.glob("termbridge-*.whl")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    [site] = venv.glob("lib/python*/site-packages")
    [deps] = Path(sys.executable).parent.parent.glob("lib/python*/site-packages")
    (site / "termbridge-test-deps.pth").write_text(f"{deps}\n")
    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--quiet", "--no-deps",
         str(wheel)], capture_output=True, text=True, timeout=300,
    )
    assert install.returncode == 0, install.stderr
    shutil.rmtree(src)  # nothing may come from the source tree any more
    yield venv


def test_installed_package_carries_its_files(installed):
    probe = subprocess.run(
        [str(installed / "bin" / "python"), "-c",
         "import json, bridge, bridge.resources as r, bridge.store.redis, bridge.store.sqlite; "
         "print(json.dumps([bridge.__file__, str(r.web_root()), "
         "str(r.session_image_dir()), str(r.etc_dir())]))"],
        capture_output=True, text=True, cwd=installed, check=True,
    )
    module, web_root, image_dir, etc_dir = (Path(p) for p in json.loads(probe.stdout))
    for path in (module, web_root, image_dir, etc_dir):
        assert installed in path.parents, path
    assert (web_root / "node_modules" / "@xterm" / "xterm" / "css" / "xterm.css").is_file()
    player = web_root / "node_modules" / "asciinema-player" / "dist" / "bundle"
    assert (player / "asciinema-player.min.js").is_file() and (player / "asciinema-player.css").is_file()
    assert (image_dir / "Dockerfile").is_file() and (image_dir / "entrypoint.sh").is_file()
    assert (image_dir / "holder" / "tb-holder.c").is_file()
    for shipped in ("termbridge.toml", "pam.d/termbridge", "systemd/termbridge.service", "nginx/termbridge.conf",
                    "nginx/replicas.conf", "nginx/subpath.conf"):
        assert (etc_dir / shipped).read_text() == (ROOT / "etc" / shipped).read_text()


async def test_installed_termbridge_serves_login_xterm_and_a_session(installed, tmp_path, pam_service, state_dir, user):
    port = free_port()
    config = write_config(tmp_path / "gw.toml", state_dir(), pam_service, web={"listen": f"127.0.0.1:{port}"})
    check = subprocess.run([str(installed / "bin" / "termbridge"), "check", "--config", str(config)],
                           capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert check.returncode == 0, check.stdout
    assert f"ok   assets: {installed}" in check.stdout
    serve = [str(installed / "bin" / "termbridge"), "serve", "--config", str(config)]
    async with gateway_process(serve, port, tmp_path) as (gateway, _):
        async with aiohttp.ClientSession(base_url=gateway.url) as http:
            resp = await http.get("/login")
            assert resp.status == 200 and 'name="username"' in await resp.text()
            resp = await http.get("/static/vendor/xterm/lib/xterm.mjs")
            assert resp.status == 200 and "Terminal" in await resp.text()
            for asset in ("/static/vendor/xterm/css/xterm.css", "/static/vendor/addon-fit/lib/addon-fit.mjs",
                          "/static/terminal.js", "/static/termbridge.css"):
                assert (await http.get(asset)).status == 200, asset
        await one_session(gateway, user, "installed")


def test_systemd_unit_lifts_the_open_file_limit():
    assert int(unit_settings()["LimitNOFILE"]) >= 65536


# -- what a running gateway shows -----------------------------------------------------------------


def open_file_limits(pid: int) -> tuple[int, int]:
    line = next(x for x in Path(f"/proc/{pid}/limits").read_text().splitlines() if x.startswith("Max open files"))
    soft, hard = line.split()[3:5]
    return int(soft), int(hard)


async def test_the_gateway_serves_more_than_a_thousand_idle_connections(gateway_process):
    """Started with the usual soft limit of 1024 (as outside systemd), the gateway lifts it to the
    hard limit, and 1100 idle connections leave it answering."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 4096:
        pytest.fail(f"the hard open-file limit here is {hard}: this test needs at least 4096")
    process = gateway_process()
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))  # what the child inherits
    try:
        await process.start()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert process.proc is not None
    assert open_file_limits(process.proc.pid) == (hard, hard)
    idle: list[socket.socket] = []
    try:
        for _ in range(1100):
            idle.append(socket.create_connection(("127.0.0.1", process.port), timeout=5))
        async with aiohttp.ClientSession() as http, http.get(f"{process.gateway.url}/healthz") as resp:
            assert resp.status == 200
    finally:
        for sock in idle:
            sock.close()
    assert "Too many open files" not in process.log()


async def test_responses_do_not_name_the_server_software(gateway):
    async with aiohttp.ClientSession(base_url=gateway.url) as http:
        for path in ("/", "/login", "/healthz", "/no-such-page", "/static/boot.js"):
            async with http.get(path, allow_redirects=False) as resp:
                assert resp.headers.get("Server") == "termbridge", (path, resp.headers.get("Server"))
    # a request that does not even parse is answered by aiohttp itself, before any hook
    host, port = gateway.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n")
    head = (await asyncio.wait_for(reader.read(4096), 10)).split(b"\r\n\r\n")[0].decode()
    writer.close()
    assert head.startswith("HTTP/1.0 400") and "\r\nServer: termbridge" in head, head

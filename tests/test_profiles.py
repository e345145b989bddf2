"""Profiles: `[profiles.NAME]` config and its errors, the entitlement rule, and sessions of each
profile through both doors with the limits Docker reports for their containers. Real host groups
(groupadd, usermod), real PAM accounts, real containers, the real `ssh` client and asyncssh."""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncssh
import docker
import pytest

from bridge.app import SSH_DOOR
from bridge.config import SessionConfig, load_config, profile_keys
from bridge.errors import ConfigError, ProfileRefused
from bridge.profiles import entitled_in, pick
from bridge.web.keys import MANAGER, STORE
from helpers import (
    PROMPT, ROOT, TEST_IMAGE, HostUser, Terminal, containers_gone, metric, scrape, session_containers, wait_for,
)

# Three kinds of session: [session] (default), "big" and "small", each with its own limits.
DEFAULT_LIMITS = {"cpus": 0.5, "memory": "200m", "pids": 256}
BIG = {"cpus": 1.5, "memory": "400m", "pids": 300, "idle_timeout": "20m"}
SMALL = {"cpus": 0.25, "memory": "150m", "pids": 128, "tmpfs_size": "16m"}
MiB = 1024**2


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "p.toml"
    path.write_text(text)
    return path


@pytest.fixture
def course_image(docker_engine: docker.DockerClient) -> Iterator[str]:
    """A tag of its own for the session image, so that a profile's image is told apart."""
    tag = f"prof-{secrets.token_hex(4)}"
    docker_engine.images.get(TEST_IMAGE).tag("termbridge/session", tag)
    yield f"termbridge/session:{tag}"
    docker_engine.images.remove(f"termbridge/session:{tag}", noprune=True)


@pytest.fixture
def groups(make_group: Callable[[], str]) -> tuple[str, str]:
    return make_group(), make_group()


def profiles_config(groups: tuple[str, str], image: str, **extra: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Sections for start_gateway: [profiles.big] for the first group, [profiles.small] for the second."""
    return {
        "session": dict(DEFAULT_LIMITS),
        "profiles.big": {"groups": [groups[0]], "image": image, "description": "for the long labs", **BIG},
        "profiles.small": {"groups": [groups[1]], **SMALL},
        **extra,
    }


def inspect(container_id: str) -> dict[str, Any]:
    client = docker.from_env()
    try:
        return client.api.inspect_container(container_id)
    finally:
        client.close()


def assert_limits(info: dict[str, Any], profile: str, limits: dict[str, Any], image: str) -> None:
    """What Docker reports for a session container is `profile`'s."""
    host = info["HostConfig"]
    assert info["Config"]["Labels"]["termbridge.profile"] == profile
    assert info["Config"]["Image"] == image
    assert host["NanoCpus"] == int(limits["cpus"] * 1e9)
    assert host["Memory"] == host["MemorySwap"] == int(limits["memory"].rstrip("m")) * MiB
    assert host["PidsLimit"] == limits["pids"]
    if "tmpfs_size" in limits:
        assert f"size={int(limits['tmpfs_size'].rstrip('m')) * MiB}" in host["Tmpfs"]["/tmp"]
    if "idle_timeout" in limits:
        env = dict(e.split("=", 1) for e in info["Config"]["Env"])
        assert env["TERMBRIDGE_IDLE_TIMEOUT"] == "1200"


# -- config -----------------------------------------------------------------------------------------


def test_profile_keys_are_sessions_minus_the_gateways():
    keys = set(profile_keys())
    assert {"image", "cpus", "memory", "pids", "tmpfs_size", "idle_timeout", "max_lifetime", "max_per_user", "pool",
            "network", "user"} <= keys
    assert not {"max_total", "reconnect_grace", "on_shutdown", "uid_base", "firewall"} & keys
    # a key added to SessionConfig is a profile key without anyone listing it
    assert keys == {f for f in SessionConfig.__dataclass_fields__} - {
        "max_total", "reconnect_grace", "on_shutdown", "uid_base", "firewall", "backend"}


def test_profiles_inherit_from_session_and_keep_file_order(tmp_path, groups):
    config = load_config(write(tmp_path, f"""
[session]
cpus = 0.75
idle_timeout = "10m"
[profiles.zeta]
groups = ["{groups[0]}"]
memory = "1g"
[profiles.alpha]
groups = ["{groups[1]}", "{groups[0]}"]
description = "course"
user = "root"
"""), env={})
    assert [p.name for p in config.all_profiles()] == ["default", "zeta", "alpha"]
    zeta, alpha = config.profiles
    assert (zeta.session.cpus, zeta.session.memory, zeta.session.idle_timeout) == (0.75, 2**30, 600)
    assert (alpha.session.user, alpha.session.memory, alpha.groups, alpha.description) == (
        "root", 200 * MiB, (groups[1], groups[0]), "course")
    assert config.profile("default").session == config.session and config.profile("nope") is None


@pytest.mark.parametrize("body, needle", [
    ('groups = ["@G"]\ncpu = 2', "unknown configuration key 'profiles.p.cpu'"),
    ('groups = ["@G"]\nmax_total = 9', "'profiles.p.max_total': 'max_total' holds for the whole gateway"),
    ('groups = ["@G"]\nreconnect_grace = "1m"', "'profiles.p.reconnect_grace'"),
    ('groups = ["no-such-group-x"]', "'profiles.p.groups': there is no group 'no-such-group-x'"),
    ('groups = ["@G"]\nmemory = "lots"', "bad value for 'profiles.p.memory'"),
    ('groups = ["@G"]\nnetwork = "open"', "bad value for 'profiles.p.network'"),
    ('groups = ["@G"]\ncpus = -1', "bad value for 'profiles.p.cpus'"),
    ('cpus = 1', "'profiles.p.groups' is missing"),
    ('groups = []', "'profiles.p.groups' is empty"),
    ('groups = ["@G"]\nmax_per_user = 99', "'profiles.p.max_per_user' must not exceed 'session.max_total'"),
])
def test_profile_errors_name_the_key(tmp_path, groups, body, needle):
    with pytest.raises(ConfigError) as raised:
        load_config(write(tmp_path, "[profiles.p]\n" + body.replace("@G", groups[0]) + "\n"), env={})
    assert needle in raised.value.detail


@pytest.mark.parametrize("name", ["default", "Big", "a b", "x" * 33, "-x"])
def test_bad_profile_names_are_refused(tmp_path, groups, name):
    with pytest.raises(ConfigError, match="profile name"):
        load_config(write(tmp_path, f'[profiles."{name}"]\ngroups = ["{groups[0]}"]\n'), env={})


def test_warm_pools_of_all_profiles_must_fit_max_total(tmp_path, groups):
    text = f"""
[session]
max_total = 3
pool = 2
[profiles.a]
groups = ["{groups[0]}"]
[profiles.b]
groups = ["{groups[1]}"]
pool = 0
"""
    with pytest.raises(ConfigError) as raised:
        load_config(write(tmp_path, text), env={})
    assert raised.value.detail.startswith("warm pools conflict: 'session.pool' = 2 + 'profiles.a.pool' = 2 keep 4 containers, more than 'session.max_total' = 3")
    assert "inherits" in raised.value.detail
    ok = load_config(write(tmp_path, text.replace("max_total = 3", "max_total = 4")), env={})
    assert [p.session.pool for p in ok.all_profiles()] == [2, 2, 0]


def test_a_config_error_in_a_profile_stops_the_gateway_with_exit_2(tmp_path):
    bad = write(tmp_path, f'state_dir = "{tmp_path}/state"\n[profiles.lab]\ngroups = ["no-such-group-y"]\n')
    proc = subprocess.run([sys.executable, "-m", "bridge", "serve", "--config", str(bad)],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr
    assert "'profiles.lab.groups': there is no group 'no-such-group-y'" in proc.stderr
    assert "Traceback" not in proc.stderr


# -- the entitlement rule ---------------------------------------------------------------------------


def _config(tmp_path: Path, groups: tuple[str, str]):
    return load_config(write(tmp_path, f"""
[profiles.big]
groups = ["{groups[0]}"]
[profiles.small]
groups = ["{groups[1]}"]
"""), env={})


def test_entitlement_none_one_several(tmp_path, groups):
    config = _config(tmp_path, groups)
    names = lambda found: [p.name for p in found]  # noqa: E731
    assert names(entitled_in(config, frozenset({"users"}))) == ["default"]
    assert names(entitled_in(config, frozenset({groups[1]}))) == ["small"]
    both = entitled_in(config, frozenset(groups))
    assert names(both) == ["big", "small"]
    assert pick(config, "carol", both, None).name == "big"  # none remembered: the first in the file
    assert pick(config, "carol", both, None, remembered="small").name == "small"
    assert pick(config, "carol", both, None, remembered="gone").name == "big"
    assert pick(config, "carol", both, "small", remembered="big").name == "small"  # asked beats remembered
    only_small = entitled_in(config, frozenset({groups[1]}))
    assert pick(config, "bob", only_small, None, remembered="big").name == "small"  # remembered but no longer his
    for who, mine, asked, said in (
        ("bob", only_small, "big", "the profile 'big' is not open to you (yours: small)"),
        ("bob", only_small, "huge", "there is no profile 'huge' here (yours: small)"),
        ("dave", entitled_in(config, frozenset()), "big", "the profile 'big' is not open to you (yours: default)"),
    ):
        with pytest.raises(ProfileRefused) as refused:
            pick(config, who, mine, asked)
        assert refused.value.user_message == said
    assert pick(config, "dave", entitled_in(config, frozenset()), "default").name == "default"


# -- the web door -----------------------------------------------------------------------------------


async def web_session(gateway, user: HostUser, path: str = "/ws") -> tuple[dict[str, Any], dict[str, Any]]:
    """Start a web session of `user`; (its session message, Docker's inspect of its container).
    The session is ended (exit) and its container gone before this returns."""
    async with await gateway.login(user) as http:
        term = await gateway.terminal(http, path)
        started = await term.control("session")
        await term.expect(PROMPT)
        [container] = session_containers(**{"termbridge.session": started["id"]})
        info = inspect(container.id)
        await term.send("exit\r")
        await term.control("exit")
    await containers_gone(**{"termbridge.session": started["id"]})
    return started, info


async def test_web_sessions_get_their_profiles_limits(start_gateway, make_user, groups, course_image, tmp_path):
    audit = tmp_path / "audit.log"
    gateway = await start_gateway(**profiles_config(groups, course_image), audit={"log": str(audit)})
    alice = make_user(groups=(groups[0],))  # big
    bob = make_user()  # no profile group: the default
    carol = make_user(groups=groups)  # both

    started, info = await web_session(gateway, alice)
    assert started["profile"] == "big" and started["idle_timeout"] == 1200
    assert_limits(info, "big", BIG, course_image)

    started, info = await web_session(gateway, bob)
    assert started["profile"] == "default" and started["idle_timeout"] == 900
    assert_limits(info, "default", DEFAULT_LIMITS, TEST_IMAGE)

    # several: the socket names one; without a remembered choice the first in the file
    started, info = await web_session(gateway, carol, "/ws?profile=small")
    assert_limits(info, "small", SMALL, TEST_IMAGE)
    started, info = await web_session(gateway, carol)
    assert started["profile"] == "big"
    await gateway.app[STORE].put_profile_choice(carol.name, "small")
    started, info = await web_session(gateway, carol)
    assert started["profile"] == "small"

    # the audit trail names the profile of each start and end
    lines = [json.loads(line) for line in audit.read_text().splitlines()]
    assert [e["profile"] for e in lines if e["event"] == "session_start"] == ["big", "default", "small", "big", "small"]
    assert [e["image"] for e in lines if e["event"] == "session_start"][:2] == [course_image, TEST_IMAGE]
    await wait_for(lambda: len([e for e in map(json.loads, audit.read_text().splitlines())
                                if e["event"] == "session_end"]) == 5, what="five session_end events")
    ends = [json.loads(line) for line in audit.read_text().splitlines()]
    assert {e["profile"] for e in ends if e["event"] == "session_end"} == {"big", "default", "small"}


@pytest.mark.parametrize("asked, said", [
    ("big", "the profile 'big' is not open to you (yours: small)"),
    ("nope", "there is no profile 'nope' here (yours: small)"),
])
async def test_a_socket_asking_for_a_profile_not_theirs_is_refused(start_gateway, make_user, groups, course_image,
                                                                   caplog, asked, said):
    gateway = await start_gateway(**profiles_config(groups, course_image))
    bob = make_user(groups=(groups[1],))
    async with await gateway.login(bob) as http:
        term = await gateway.terminal(http, f"/ws?profile={asked}")
        error = await term.control("error")
        assert error["message"] == said
        assert (await term.control("exit"))["reason"] == "error"
    assert not session_containers(**{"termbridge.user": bob.name})
    assert any(f"profile {asked!r} refused for {bob.name}" in r.getMessage() for r in caplog.records)
    # and the gateway goes on serving him what is his
    started, info = await web_session(gateway, bob)
    assert_limits(info, "small", SMALL, TEST_IMAGE)


async def test_losing_the_group_loses_the_profile_at_the_next_start(start_gateway, make_user, groups, course_image):
    from testbed.accounts import run

    gateway = await start_gateway(**profiles_config(groups, course_image))
    alice = make_user(groups=(groups[0],))
    started, _ = await web_session(gateway, alice)
    assert started["profile"] == "big"
    run("gpasswd", "-d", alice.name, groups[0])
    started, info = await web_session(gateway, alice)
    assert started["profile"] == "default"
    assert_limits(info, "default", DEFAULT_LIMITS, TEST_IMAGE)


# -- the SSH door -----------------------------------------------------------------------------------


def ssh_argv(port: int, login: str, known_hosts: Path, *command: str) -> list[str]:
    return [
        "sshpass", "-e", "ssh", "-F", "/dev/null", "-o", f"UserKnownHostsFile={known_hosts}",
        "-o", "StrictHostKeyChecking=no", "-o", "PubkeyAuthentication=no", "-o", "NumberOfPasswordPrompts=1",
        "-p", str(port), f"{login}@127.0.0.1", *command,
    ]


async def run_ssh(argv: list[str], password: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv, env={"PATH": "/usr/bin:/bin", "SSHPASS": password}, stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode(), err.decode()


async def test_ssh_user_plus_profile_picks_it_with_the_real_client(start_gateway, make_user, groups, course_image,
                                                                   tmp_path, caplog):
    gateway = await start_gateway(**profiles_config(groups, course_image), ssh={"listen": "127.0.0.1:0"})
    port, known = gateway.app[SSH_DOOR].port, tmp_path / "known_hosts"
    carol = make_user(groups=groups)

    # the real client: `carol+small` runs in a small container, whose cgroup says so from inside
    rc, out, err = await run_ssh(
        ssh_argv(port, f"{carol.name}+small", known, "whoami; cat /sys/fs/cgroup/pids/pids.max; exit 3"),
        carol.password,
    )
    assert rc == 3, err
    assert out.split() == [carol.name, str(SMALL["pids"])]

    # asyncssh, held open: Docker's view of the container of `carol+big`
    async with asyncssh.connect(
        "127.0.0.1", port, username=f"{carol.name}+big", password=carol.password, known_hosts=None,
        client_keys=None, agent_path=None, config=[], preferred_auth="password",
    ) as conn:
        assert (await conn.run("whoami", check=True)).stdout.strip() == carol.name
        [container] = session_containers(**{"termbridge.user": carol.name})
        assert_limits(inspect(container.id), "big", BIG, course_image)
        assert container.labels["termbridge.door"] == "ssh"
        listed = [s for s in gateway.app[MANAGER].list() if s.user.name == carol.name]
        assert [s.profile for s in listed] == ["big"]
    await containers_gone(**{"termbridge.user": carol.name})

    # plain `carol`: her remembered choice (the web chooser's), else the first of hers
    rc, out, _ = await run_ssh(ssh_argv(port, carol.name, known, "cat /sys/fs/cgroup/pids/pids.max"), carol.password)
    assert (rc, out.strip()) == (0, str(BIG["pids"]))
    await gateway.app[STORE].put_profile_choice(carol.name, "small")
    rc, out, _ = await run_ssh(ssh_argv(port, carol.name, known, "cat /sys/fs/cgroup/pids/pids.max"), carol.password)
    assert (rc, out.strip()) == (0, str(SMALL["pids"]))
    # the login (PAM, the throttle, the audit trail) was carol's own name throughout
    assert not [r for r in caplog.records if f"{carol.name}+" in r.getMessage() and "login" in r.getMessage()]


@pytest.mark.parametrize("asked, said", [
    ("big", "termbridge: the profile 'big' is not open to you (yours: small)"),
    ("nope", "termbridge: there is no profile 'nope' here (yours: small)"),
    ("", "termbridge: there is no profile '' here"),
])
async def test_ssh_forbidden_and_unknown_profiles_are_one_line_errors(start_gateway, make_user, groups, course_image,
                                                                      tmp_path, caplog, asked, said):
    gateway = await start_gateway(**profiles_config(groups, course_image), ssh={"listen": "127.0.0.1:0"})
    port, known = gateway.app[SSH_DOOR].port, tmp_path / "known_hosts"
    bob = make_user(groups=(groups[1],))
    rc, out, err = await run_ssh(ssh_argv(port, f"{bob.name}+{asked}", known, "echo ran"), bob.password)
    assert rc != 0 and "ran" not in out
    lines = [line for line in err.splitlines() if line.startswith("termbridge:")]
    assert len(lines) == 1 and lines[0].startswith(said), err
    assert not session_containers(**{"termbridge.user": bob.name})
    assert any(f"{bob.name} asked for profile" in r.getMessage() for r in caplog.records)
    # a wrong password with a profile suffix is a wrong password of bob's, nothing more
    rc, _, err = await run_ssh(ssh_argv(port, f"{bob.name}+small", known, "true"), "not-" + bob.password)
    assert rc != 0 and "termbridge:" not in err


# -- pools, metrics, sessions list ------------------------------------------------------------------


async def test_each_profile_keeps_its_own_warm_pool(start_gateway, make_user, groups, course_image):
    gateway = await start_gateway(**profiles_config(
        groups, course_image, **{"profiles.big": {"groups": [groups[0]], "image": course_image, **BIG, "pool": 1}}))
    pools = gateway.app[MANAGER].pool
    assert set(pools.pools) == {"big"}  # [session] and small keep none
    await wait_for(lambda: len(pools.ready) == 1, timeout=60, what="the big pool to fill")
    [ready] = pools.ready
    assert_limits(inspect(ready.container.id), "big", BIG, course_image)
    assert inspect(ready.container.id)["Config"]["Labels"]["termbridge.door"] == "pool"

    bob = make_user(groups=(groups[1],))  # small: nothing pooled for him
    started, _ = await web_session(gateway, bob)
    assert started["id"] != ready.session_id and len(pools.ready) == 1
    alice = make_user(groups=(groups[0],))
    started, info = await web_session(gateway, alice)
    assert started["id"] == ready.session_id  # the pooled container, claimed
    assert_limits(info, "big", BIG, course_image)
    await wait_for(lambda: len(pools.ready) == 1, timeout=60, what="the big pool to refill")


async def test_metrics_and_sessions_list_show_the_profile(start_gateway, make_user, groups, course_image):
    gateway = await start_gateway(**profiles_config(groups, course_image))
    samples = await scrape(gateway.url)
    for profile in ("default", "big", "small"):  # every configured profile from the start, none other
        assert metric(samples, "termbridge_sessions_live", door="web", profile=profile) == 0
        assert metric(samples, "termbridge_session_starts_total", door="ssh", result="ok", profile=profile) == 0
    assert {dict(labels).get("profile") for name, labels in samples if name == "termbridge_sessions_live"} == {
        "default", "big", "small"}
    alice = make_user(groups=(groups[0],))
    async with await gateway.login(alice) as http:
        term = await gateway.terminal(http)
        started = await term.control("session")
        await term.expect(PROMPT)
        live = await scrape(gateway.url)
        assert metric(live, "termbridge_sessions_live", door="web", profile="big") == 1
        assert metric(live, "termbridge_sessions_live", profile="default") == 0
        assert metric(live, "termbridge_session_starts_total", door="web", result="ok", profile="big") == 1
        assert metric(live, "termbridge_session_start_seconds_count", door="web", profile="big") == 1

        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bridge", "sessions", "list", "--config", str(gateway.config_path),
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        out, err = await proc.communicate()
        assert proc.returncode == 0, err
        header, *rows = out.decode().splitlines()
        assert header.split()[:4] == ["ID", "USER", "DOOR", "PROFILE"]
        assert [row.split()[:4] for row in rows] == [[started["id"], alice.name, "web", "big"]]
        [record] = await gateway.app[STORE].list_sessions()
        assert record.profile == "big"  # the fleet-wide view has it too
        await term.send("exit\r")
        await term.control("exit")
    await containers_gone(**{"termbridge.session": started["id"]})


# -- the chooser ------------------------------------------------------------------------------------

CHOOSER_CSRF = re.compile(r'name="csrf" value="([^"]+)"')


async def test_chooser_checks_the_choice_and_remembers_it(start_gateway, make_user, groups, course_image):
    gateway = await start_gateway(**profiles_config(groups, course_image))
    carol, bob = make_user(groups=groups), make_user(groups=(groups[1],))
    async with await gateway.login(carol) as http:
        first = await http.get("/", allow_redirects=False)
        assert (first.status, first.headers["Location"]) == (303, "/profile")  # two profiles, none chosen
        page_ = await (await http.get("/profile")).text()
        assert 'value="big" checked' in page_ and 'value="small"' in page_
        assert "for the long labs (1.5 CPUs, 400 MiB memory, image " + course_image in page_
        token = CHOOSER_CSRF.search(page_).group(1)
        headers = {"Origin": gateway.origin}
        wrong = await http.post("/profile", data={"profile": "small", "csrf": "x" + token}, headers=headers)
        assert wrong.status == 403
        refused = await http.post("/profile", data={"profile": "root", "csrf": token}, headers=headers)
        assert refused.status == 403 and "There is no profile &#x27;root&#x27; here" in await refused.text()
        assert await gateway.app[STORE].get_profile_choice(carol.name) is None
        chosen = await http.post("/profile", data={"profile": "small", "csrf": token}, headers=headers,
                                 allow_redirects=False)
        assert (chosen.status, chosen.headers["Location"]) == (303, "/")
        assert await gateway.app[STORE].get_profile_choice(carol.name) == "small"
        terminal = await (await http.get("/", allow_redirects=False)).text()
        assert 'data-profile="small"' in terminal and 'id="profile-change" href="/profile" aria-label' in terminal
    async with await gateway.login(bob) as http:  # one profile: no chooser, no "change"
        assert (await http.get("/profile", allow_redirects=False)).headers["Location"] == "/"
        terminal = await (await http.get("/")).text()
        assert 'data-profile="small"' in terminal and "hidden>change</a>" in terminal


@pytest.mark.browser
async def test_chooser_in_chromium_by_keyboard_then_remembered(browser, start_gateway, make_user, groups, course_image):
    from playwright.async_api import expect

    from helpers import axe_check, goto, log_in

    gateway = await start_gateway(**profiles_config(groups, course_image))
    carol = make_user(groups=groups)
    context = await browser.new_context(color_scheme="light", viewport={"width": 1000, "height": 600})
    page = await context.new_page()
    await log_in(page, gateway, carol)
    await expect(page).to_have_url(re.compile(r"/profile$"))
    big, small = page.get_by_role("radio", name="big"), page.get_by_role("radio", name="small")
    await expect(big).to_be_checked()
    await axe_check(page, "profile-chooser-light")
    await page.emulate_media(color_scheme="dark")
    await axe_check(page, "profile-chooser-dark")

    # keyboard only: into the group, arrow to "small", tab to the button, Enter
    await big.focus()
    await page.keyboard.press("ArrowDown")
    await expect(small).to_be_checked()
    await page.keyboard.press("Tab")
    await expect(page.get_by_role("button", name="Continue")).to_be_focused()
    await page.keyboard.press("Enter")

    body = page.locator("body")
    await expect(body).to_have_attribute("data-state", "running", timeout=30_000)
    await expect(page.locator("#status-profile")).to_have_text("small")
    await expect(page.get_by_role("link", name="Change profile")).to_be_visible()
    await axe_check(page, "profile-terminal-dark")
    session_id = await body.get_attribute("data-session")
    [container] = session_containers(**{"termbridge.session": session_id})
    assert_limits(inspect(container.id), "small", SMALL, TEST_IMAGE)
    await page.locator(".xterm-helper-textarea").focus()
    await page.keyboard.type("exit")
    await page.keyboard.press("Enter")
    await expect(body).to_have_attribute("data-state", "ended", timeout=15_000)
    await context.close()
    await containers_gone(**{"termbridge.session": session_id})

    # another browser, another day: straight to the terminal with the remembered profile
    context = await browser.new_context()
    page = await context.new_page()
    await log_in(page, gateway, carol)
    body = page.locator("body")
    await expect(body).to_have_attribute("data-state", "running", timeout=30_000)
    await expect(page.locator("#status-profile")).to_have_text("small")
    second = await body.get_attribute("data-session")
    assert session_containers(**{"termbridge.session": second})[0].labels["termbridge.profile"] == "small"
    # and changeable from the status bar
    await page.get_by_role("link", name="Change profile").click()
    await expect(page).to_have_url(re.compile(r"/profile$"))
    await expect(page.get_by_role("radio", name="small")).to_be_checked()
    await goto(page, gateway.url + "/")
    await expect(body).to_have_attribute("data-state", "running", timeout=30_000)
    await page.get_by_role("button", name="End session").click()
    await page.get_by_role("dialog").get_by_role("button", name="End session").click()
    await expect(body).to_have_attribute("data-state", "ended", timeout=15_000)
    await context.close()
    await containers_gone(**{"termbridge.session": second})


def test_check_names_each_profiles_missing_image(tmp_path, groups, course_image, docker_engine):
    from bridge.check import check_docker

    config = load_config(write(tmp_path, f"""
[session]
image = "{TEST_IMAGE}"
[profiles.lab]
groups = ["{groups[0]}"]
image = "{course_image}"
[profiles.gone]
groups = ["{groups[1]}"]
image = "termbridge/no-such-image:{secrets.token_hex(3)}"
"""), env={})
    found = [(c.status, c.message) for c in check_docker(config, "") if c.name == "image"]
    assert found[0][0] == "ok" and found[1] == ("ok", f"profile lab: image {course_image} present")
    assert found[2][0] == "FAIL" and found[2][1].startswith("profile gone: image termbridge/no-such-image:")


def test_a_reload_reaches_inherited_keys_and_names_changed_profiles(tmp_path, groups):
    from bridge.config import apply_live, changed_keys

    text = f"""
[session]
cpus = 0.5
[profiles.lab]
groups = ["{groups[0]}"]
memory = "1g"
"""
    old = load_config(write(tmp_path, text), env={})
    new = load_config(write(tmp_path, text.replace("cpus = 0.5", "cpus = 0.75").replace('"1g"', '"2g"')), env={})
    assert changed_keys(old, new) == ["session.cpus", "profiles"]
    merged = apply_live(old, new)
    lab = merged.profile("lab")
    assert (lab.session.cpus, lab.session.memory) == (0.75, 2**30)  # inherited: new; its own: kept until a restart
    assert changed_keys(old, load_config(write(tmp_path, text), env={})) == []


async def test_the_chooser_lives_under_the_base_path(start_gateway, make_user, groups, course_image):
    import aiohttp

    from helpers import Terminal

    base = "/terminal/"
    gateway = await start_gateway(**profiles_config(groups, course_image), web={"base_path": base})
    carol = make_user(groups=groups)
    origin = {"Origin": gateway.url}
    async with aiohttp.ClientSession(base_url=gateway.url, cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        assert (await http.get("/profile", allow_redirects=False)).status == 404
        form = await (await http.get(base + "login")).text()
        await http.post(base + "login", headers=origin, allow_redirects=False, data={
            "username": carol.name, "password": carol.password, "csrf": CHOOSER_CSRF.search(form).group(1)})
        first = await http.get(base, allow_redirects=False)
        assert (first.status, first.headers["Location"]) == (303, base + "profile")
        chooser = await (await http.get(base + "profile")).text()
        links = re.findall(r'(?:href|src|action)="([^"]+)"', chooser)
        assert links and all(link.startswith(base) for link in links), links
        chosen = await http.post(base + "profile", headers=origin, allow_redirects=False,
                                 data={"profile": "small", "csrf": CHOOSER_CSRF.search(chooser).group(1)})
        assert (chosen.status, chosen.headers["Location"]) == (303, base)
        terminal = await (await http.get(base)).text()
        assert f'id="profile-change" href="{base}profile"' in terminal
        term = Terminal(await http.ws_connect(base + "ws?profile=small", headers=origin))
        await term.resize(80, 24)
        started = await term.control("session")
        assert started["profile"] == "small"
        await term.expect(PROMPT)
        await term.send("exit\r")
        await term.control("exit")
    await containers_gone(**{"termbridge.session": started["id"]})


async def test_network_user_mode_and_max_per_user_come_from_the_profile(start_gateway, make_user, groups, course_image):
    gateway = await start_gateway(**profiles_config(groups, course_image, **{
        "profiles.small": {"groups": [groups[1]], **SMALL, "network": "internet", "user": "root", "max_per_user": 1},
    }))
    bob = make_user(groups=(groups[1],))
    async with await gateway.login(bob) as http:
        term = await gateway.terminal(http)
        started = await term.control("session")
        await term.expect(PROMPT)
        assert (await term.run("id -u")).strip() == "0"  # user = "root"
        [container] = session_containers(**{"termbridge.session": started["id"]})
        info = inspect(container.id)
        assert list(info["NetworkSettings"]["Networks"]) == ["termbridge-internet"]
        assert info["HostConfig"]["ReadonlyRootfs"] is False
        second = await gateway.terminal(http)
        refused = await second.control("error")
        assert refused["message"] == (
            "you already have 1 sessions, the most allowed (profiles.small.max_per_user); end one first")
        await term.send("exit\r")
        await term.control("exit")
    await containers_gone(**{"termbridge.session": started["id"]})
    alice = make_user(groups=(groups[0],))  # big: [session]'s network and user mode
    _, info = await web_session(gateway, alice)
    assert list(info["NetworkSettings"]["Networks"]) == ["termbridge-isolated"]
    assert info["HostConfig"]["ReadonlyRootfs"] is True


async def test_a_session_whose_profile_left_the_config_is_adopted_under_session_clocks(
    gateway_process, make_user, groups, course_image
):
    """The gateway restarted without the profile a running session was started with still adopts
    it: its container keeps the limits it was made with, the page comes back to the same shell,
    the clocks are [session]'s from then on, and the log says why."""
    sections = profiles_config(groups, course_image)
    sections["session"] = {**sections["session"], "on_shutdown": "keep"}
    process = gateway_process(**sections)
    await process.start()
    alice = make_user(groups=(groups[0],))
    async with await process.gateway.login(alice) as http:
        term = await process.gateway.terminal(http)
        started = await term.control("session")
        assert started["profile"] == "big" and started["idle_timeout"] == 1200
        await term.expect(PROMPT)
        await term.send("echo kept > /tmp/mark\r")
        await term.expect(PROMPT)
        process.signal(signal.SIGTERM)
        await term.drain_until_closed(timeout=10)
        assert await process.wait(20) == 0

    config = process.config_path.read_text()
    without = re.sub(r"\[profiles\.big\]\n(?:[^\[\n].*\n|\n)*", "", config)
    assert "[profiles.big]" in config and "profiles.big" not in without and "[profiles.small]" in without
    process.config_path.write_text(without)
    await process.start()
    [container] = session_containers(**{"termbridge.session": started["id"]})
    assert_limits(inspect(container.id), "big", BIG, course_image)

    async with await process.gateway.login(alice) as http:
        ws = await http.ws_connect(f"/ws?session={started['id']}&offset={term.received}",
                                   headers={"Origin": process.gateway.origin}, max_msg_size=0)
        again = Terminal(ws)
        resumed = await again.control("session", timeout=20)
        assert resumed["id"] == started["id"] and resumed["idle_timeout"] == 900, resumed
        await again.send("cat /tmp/mark\r")
        await again.expect(b"kept")
        assert "its profile 'big' is no longer configured; [session]'s clocks apply" in process.log()
        await again.send("exit\r")
        assert (await again.control("exit", timeout=20))["reason"] == "exit"
    await containers_gone(**{"termbridge.session": started["id"]})

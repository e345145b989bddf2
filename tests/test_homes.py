"""Persistent homes: real ext4 images on real loop devices, real containers, real PAM accounts,
both doors. Each test checks on the way out that no loop device or mount it made is left.

The session image must have the `persistent-home` feature (session-image/ of this tree):
TB_TEST_IMAGE names it."""

from __future__ import annotations

import asyncio
import io
import json
import os
import pwd
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from bridge.config import load_config
from bridge.errors import ConfigError
from bridge.homes import HomeError, HomeInUse, HomeStore, loops_of, mounted_at
from helpers import ROOT, containers_gone, session_containers, wait_for
from testbed.gateway import PROMPT, TEST_IMAGE

HOME = {"home": "persistent", "home_size": "64m"}
MiB = 1024**2


def _loops_under(path: Path) -> list[str]:
    out = subprocess.run(["losetup", "--list", "--noheadings", "--output", "NAME,BACK-FILE"],
                         capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if str(path) in line]


def _mounts_under(path: Path) -> list[str]:
    with open("/proc/self/mountinfo") as info:
        return [line for line in info if f" {path}/" in line or f" {path} " in line]


@pytest.fixture(scope="module", autouse=True)
def image_keeps_homes(docker_engine) -> None:
    """The session image under test must be built from this tree's session-image/."""
    labels = docker_engine.images.get(TEST_IMAGE).labels or {}
    if "persistent-home" not in (labels.get("termbridge.features") or "").split(","):
        pytest.fail(f"{TEST_IMAGE} has no persistent-home feature: build session-image/ and set TB_TEST_IMAGE")


@pytest.fixture(autouse=True)
async def no_leftover_mounts(tmp_path: Path):
    """Whatever a test mounted under its directory is gone once its gateways stopped."""
    yield
    root = tmp_path.resolve()
    try:
        await wait_for(lambda: not _mounts_under(root) and not _loops_under(root), timeout=30,
                       what=f"mounts and loop devices under {root} to go")
    finally:  # a failed test must not leave them to the next ones
        for line in _mounts_under(root):
            subprocess.run(["umount", "-l", line.split()[4]], check=False)


async def _web(gateway, user):
    http = await gateway.login(user)
    term = await gateway.terminal(http)
    session = await term.control("session")
    await term.expect(PROMPT)
    return http, term, session["id"]


async def _exit(term, http) -> None:
    await term.send("exit\r")
    await term.drain_until_closed()
    await http.close()


async def _ssh(port: int, user, command: str, known_hosts: Path) -> tuple[int, str, str]:
    """Debian's OpenSSH client through sshpass: (exit status, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        "sshpass", "-e", "ssh", "-F", "/dev/null", "-o", f"UserKnownHostsFile={known_hosts}",
        "-o", "StrictHostKeyChecking=no", "-p", str(port), f"{user.name}@127.0.0.1", command,
        env={**os.environ, "SSHPASS": user.password}, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 90)
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")


def _uid(user) -> int:
    return pwd.getpwnam(user.name).pw_uid


def _free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


async def _cli(config_path: Path, *args: str) -> subprocess.CompletedProcess:
    """`termbridge homes ...` as the admin runs it (the gateway under test runs on this loop)."""
    argv = [sys.executable, "-m", "bridge", "homes", *args, "--config", str(config_path)]
    proc = await asyncio.create_subprocess_exec(*argv, cwd=ROOT, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    return subprocess.CompletedProcess(argv, proc.returncode, out.decode(), err.decode())


# -- configuration -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("session", "needle"),
    [
        ({"home": "persistent", "user": "root"}, "'session.user' = \"login\""),
        ({"home": "persistent", "pool": 2}, "set 'session.pool' = 0"),
        ({"home": "somewhere"}, "'session.home'"),
        ({"home_size": "1m"}, "'session.home_size' must be at least 16m"),
    ],
)
def test_config_refuses_what_a_persistent_home_cannot_do(tmp_path, session, needle):
    lines = ["[session]", *(f"{k} = {v!r}".replace("'", '"') for k, v in session.items())]
    path = tmp_path / "c.toml"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert needle in info.value.detail


# Unit options that give a service a mount namespace (or a device policy) of its own: a home the
# gateway mounts there would never reach dockerd.
NAMESPACE_OPTIONS = {
    "ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices", "PrivateMounts", "ProtectKernelTunables",
    "ProtectKernelModules", "ProtectKernelLogs", "ProtectControlGroups", "ProtectProc", "ProtectHostname",
    "ProtectClock", "ReadWritePaths", "ReadOnlyPaths", "InaccessiblePaths", "TemporaryFileSystem", "BindPaths",
    "BindReadOnlyPaths", "DeviceAllow", "PrivateNetwork", "MountFlags",
}


def _unit_options(path: Path) -> dict[str, str]:
    lines = [line.strip() for line in path.read_text().splitlines()]
    return dict(line.split("=", 1) for line in lines if "=" in line and not line.startswith("#"))


def test_the_systemd_drop_in_undoes_every_private_mount_namespace_of_the_unit():
    unit = _unit_options(ROOT / "etc" / "systemd" / "termbridge.service")
    drop_in = _unit_options(ROOT / "etc" / "systemd" / "persistent-homes.conf")
    for option in NAMESPACE_OPTIONS & set(unit):
        assert drop_in.get(option) in ("no", "default", ""), f"{option}={unit[option]} is not undone by the drop-in"
    assert "@mount" in drop_in["SystemCallFilter"] and "CAP_CHOWN" in drop_in["CapabilityBoundingSet"]


def test_homes_dir_defaults_under_state_dir_and_can_be_set(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(f'state_dir = "{tmp_path}/state"\n')
    assert load_config(path, env={}).homes_path == tmp_path / "state" / "homes"
    path.write_text(f'state_dir = "{tmp_path}/state"\nhomes_dir = "/srv/homes"\n')
    assert load_config(path, env={}).homes_path == Path("/srv/homes")


# -- the home store on real loop devices ----------------------------------------------------------


def test_store_creates_mounts_once_grows_and_removes(tmp_path):
    homes = HomeStore(tmp_path / "homes", uid_base=1_000_000_000)
    uid = 4242
    point = homes.mount("someone", uid, 32 * MiB)
    image = homes.image(uid)
    st = os.stat(point)
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (1_000_004_242, 1_000_004_242, 0o700)
    assert os.listdir(point) == []  # no lost+found in a person's home
    assert mounted_at(point)[0] == "ext4"
    assert os.stat(image).st_blocks * 512 >= 32 * MiB  # preallocated: filling it takes nothing more
    # a second mount is the same mount: one loop device, one entry in mountinfo
    assert homes.mount("someone", uid, 32 * MiB) == point
    assert len(loops_of(image)) == 1
    assert len(_mounts_under(point)) == 1

    info = homes.info(uid)
    assert info.mounted and 24 * MiB < info.size <= 32 * MiB and info.used < info.size
    # in use: neither unmounted nor removed
    assert not homes.unmount(uid, lambda: True)
    with pytest.raises(HomeInUse):
        homes.remove(uid, lambda: True)
    assert homes.unmount(uid, lambda: False) and mounted_at(point) is None
    assert not homes.info(uid).mounted and homes.info(uid).size == info.size  # read from the image

    # a larger home_size grows it at the next mount; the data stays
    homes.mount("someone", uid, 32 * MiB)
    (point / "keep.txt").write_text("kept")
    os.chown(point / "keep.txt", 1_000_004_242, 1_000_004_242)
    homes.unmount(uid, lambda: False)
    homes.mount("someone", uid, 48 * MiB)
    assert (point / "keep.txt").read_text() == "kept"
    assert homes.info(uid).size > 36 * MiB
    # the uid of a deleted account given to a new one: the new one does not get the old files
    with pytest.raises(HomeError) as info:
        homes.mount("newcomer", uid, 48 * MiB)
    assert "earlier account" in info.value.user_message and "'someone'" in info.value.detail
    assert homes.info(uid).user == "someone"
    homes.unmount(uid, lambda: False)
    # session.uid_base changed: the files go to the new session uid
    moved = HomeStore(tmp_path / "homes", uid_base=2_000_000_000)
    point_again = moved.mount("someone", uid, 48 * MiB)
    for path in (point_again, point_again / "keep.txt"):
        assert os.lstat(path).st_uid == 2_000_004_242
    moved.remove(uid, lambda: False)
    assert not image.exists() and mounted_at(point) is None and homes.uids() == []
    assert not homes.owner_file(uid).exists()


def test_store_refuses_a_foreign_mount_at_the_mount_point(tmp_path):
    homes = HomeStore(tmp_path / "homes", uid_base=1_000_000_000)
    homes.mount("someone", 7, 16 * MiB)
    homes.unmount(7, lambda: False)
    point = homes.mount_point(7)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(point)], check=True)
    try:
        with pytest.raises(Exception) as info:
            homes.mount("someone", 7, 16 * MiB)
        assert "tmpfs" in info.value.detail
    finally:
        subprocess.run(["umount", str(point)], check=True)
    homes.remove(7, lambda: False)


# -- through real gateways, containers and both doors ----------------------------------------------


async def test_a_file_survives_exit_and_comes_back_through_the_ssh_door(start_gateway, user, tmp_path):
    gateway = await start_gateway(session=HOME, ssh={"listen": "127.0.0.1:0"})
    from bridge.app import SSH_DOOR

    http, term, _ = await _web(gateway, user)
    home = (await term.run("stat -c '%U %a' ~; command ls -A ~")).split()
    assert home == [user.name, "700", ".bash_logout", ".bashrc", ".profile"]  # /etc/skel, no lost+found
    await term.run("echo 'homework 1' > ~/notes.txt; echo '# tb-mine' >> ~/.bashrc")
    await _exit(term, http)
    await containers_gone(**{"termbridge.user": user.name})
    homes = gateway.config.homes_path
    await wait_for(lambda: not _mounts_under(homes.resolve()), what="the home to be unmounted after its last session")

    status, out, err = await _ssh(gateway.app[SSH_DOOR].port, user, "cat ~/notes.txt; grep -c tb-mine ~/.bashrc",
                                  tmp_path / "kh")
    assert status == 0, err
    assert out.split("\n")[:2] == ["homework 1", "1"]  # the person's .bashrc was not replaced by /etc/skel's
    # and back: written through the SSH door, read on the web
    status, _, err = await _ssh(gateway.app[SSH_DOOR].port, user, "echo from ssh > ~/answer.txt", tmp_path / "kh")
    assert status == 0, err
    http, term, _ = await _web(gateway, user)
    assert await term.run("cat ~/answer.txt") == "from ssh\n"
    await _exit(term, http)


async def test_a_file_survives_a_gateway_restart(gateway_process, user):
    process = gateway_process(session={**HOME, "image": TEST_IMAGE})
    await process.start()
    gateway = process.gateway
    http, term, _ = await _web(gateway, user)
    await term.run("date > ~/before-restart")
    written = await term.run("cat ~/before-restart")
    await _exit(term, http)
    process.signal(signal.SIGTERM)
    assert await process.wait(30) == 0
    await process.start()
    http, term, _ = await _web(gateway, user)
    assert await term.run("cat ~/before-restart") == written
    await _exit(term, http)
    process.stop()


async def test_a_full_home_is_the_persons_disk_full_not_the_hosts(start_gateway, user):
    gateway = await start_gateway(session={"home": "persistent", "home_size": "256m"})
    http, term, _ = await _web(gateway, user)  # the home is created (preallocated) at the first start
    image = gateway.config.homes_path / "images" / f"{_uid(user)}.img"
    state = gateway.config.state_dir
    allocated = os.stat(image).st_blocks
    noise_before = _free(state)
    await asyncio.sleep(2)
    before = _free(state)
    out = await term.run("dd if=/dev/zero of=~/fill bs=1M 2>&1 | grep -o 'No space left on device'; sync; "
                         "df -B1 --output=avail ~ | tail -1", timeout=120)
    after = _free(state)
    assert "No space left on device" in out
    assert int(out.split()[-1]) < 1 * MiB  # the home is full ...
    # ... and the host's disk did not pay for it: the image's blocks on the host were all allocated
    # before (fallocate) and are exactly as many after
    assert os.stat(image).st_blocks == allocated
    # statvfs of state_dir says the same when the disk is quiet (other helpers write to it: a
    # disk busy by more than 8 MiB in 2 s cannot show a 64 MiB margin)
    if abs(noise_before - before) < 8 * MiB:
        assert before - after < 64 * MiB, f"the host lost {(before - after) / MiB:.0f} MiB"
    # the file panel sees the same full disk
    sid = (await term.control("session"))["id"]
    resp = await http.put("/files/upload", params={"session": sid, "path": "more.bin"}, data=os.urandom(2 * MiB),
                          headers={"Origin": gateway.origin})
    assert resp.status == 507, await resp.text()
    await term.run("rm ~/fill")
    resp = await http.put("/files/upload", params={"session": sid, "path": "more.bin"}, data=b"uploaded",
                          headers={"Origin": gateway.origin})
    assert resp.status == 201, await resp.text()
    assert await term.run("cat ~/more.bin; echo") == "uploaded\n"
    await _exit(term, http)
    # the upload went to the persistent home: the next session has it, and the panel downloads it
    http, term, sid = await _web(gateway, user)
    resp = await http.get("/files/download", params={"session": sid, "path": "more.bin"})
    assert resp.status == 200 and await resp.read() == b"uploaded"
    await _exit(term, http)


async def test_no_one_else_sees_a_home(start_gateway, make_user):
    alice, bob = make_user(), make_user()
    gateway = await start_gateway(session=HOME)
    http_a, term_a, _ = await _web(gateway, alice)
    await term_a.run("echo secret > ~/diary")
    http_b, term_b, _ = await _web(gateway, bob)
    assert (await term_b.run("command ls -A /home")).split() == [bob.name]
    seen = await term_b.run(f"cat /home/{alice.name}/diary 2>&1; grep -c {alice.name} /proc/self/mountinfo")
    assert seen.split()[-1] == "0"  # not in bob's mount table
    assert "No such file" in await term_b.run(f"cat /home/{alice.name}/diary 2>&1")
    assert (await term_b.run("cat ~/diary 2>&1")).startswith("cat:")  # bob's home is his own, and empty of hers
    # bob's container has his home and nothing else from the host; named by uid, not by name
    (container_b,) = session_containers(**{"termbridge.user": bob.name})
    homes = gateway.config.homes_path.resolve()
    assert [(m["Source"], m["Destination"]) for m in container_b.attrs["Mounts"]] == [
        (str(homes / "mnt" / str(_uid(bob))), f"/home/{bob.name}")
    ]
    # and on the host, alice's home is hers (session uid) and closed to everyone else
    st = os.stat(homes / "mnt" / str(_uid(alice)))
    assert (st.st_uid, st.st_mode & 0o777) == (gateway.config.session.uid_base + _uid(alice), 0o700)
    await _exit(term_b, http_b)
    await _exit(term_a, http_a)


async def test_two_sessions_of_one_person_share_the_home(start_gateway, user):
    gateway = await start_gateway(session=HOME)
    # both at once, for a person with no home yet: one makes and mounts it, the other waits and uses it
    (http1, term1, _), (http2, term2, _) = await asyncio.gather(_web(gateway, user), _web(gateway, user))
    homes = gateway.config.homes_path.resolve()
    assert len(_loops_under(homes)) == 1  # one image, one loop device for both containers
    await term1.run("echo from-one > ~/shared")
    assert await term2.run("cat ~/shared") == "from-one\n"
    await _exit(term1, http1)
    await containers_gone(**{"termbridge.session": term1.controls[0]["id"]})
    await term2.run("echo from-two >> ~/shared")  # still mounted for the session that lives on
    assert len(_mounts_under(homes)) == 1
    await _exit(term2, http2)
    http3, term3, _ = await _web(gateway, user)
    assert await term3.run("cat ~/shared") == "from-one\nfrom-two\n"
    await _exit(term3, http3)


async def test_homes_list_du_rm(start_gateway, make_user):
    alice, bob = make_user(), make_user()
    gateway = await start_gateway(session=HOME)
    http, term, _ = await _web(gateway, alice)
    await term.run("head -c 3000000 /dev/urandom > ~/three-mb")
    listed = await _cli(gateway.config_path, "list")
    assert listed.returncode == 0, listed.stderr
    header, row = listed.stdout.splitlines()
    assert header.split() == ["USER", "UID", "SIZE", "USED", "USE%", "MOUNTED"]
    fields = row.split()
    assert fields[:2] == [alice.name, str(_uid(alice))] and fields[-1] == "yes"
    du = await _cli(gateway.config_path, "du", alice.name)
    used = du.stdout.splitlines()[1].split()[4:6]  # USER UID SIZE(2) USED(2)
    assert du.returncode == 0 and used[1] == "MiB" and float(used[0]) >= 2.8, du.stdout

    refused = await _cli(gateway.config_path, "rm", alice.name)
    assert refused.returncode == 1 and "has 1 live session" in refused.stderr
    assert gateway.config.homes_path.joinpath("images", f"{_uid(alice)}.img").exists()
    nobody = await _cli(gateway.config_path, "rm", bob.name)
    assert nobody.returncode == 1 and f"{bob.name} has no home" in nobody.stderr
    unknown = await _cli(gateway.config_path, "du", "no-such-user-xyz")
    assert unknown.returncode == 1 and "no such user" in unknown.stderr

    await _exit(term, http)
    await containers_gone(**{"termbridge.user": alice.name})
    removed = await _cli(gateway.config_path, "rm", alice.name)
    assert removed.returncode == 0, removed.stderr
    assert f"removed the home of {alice.name}" in removed.stdout
    assert (await _cli(gateway.config_path, "list")).stdout.splitlines()[1:] == []
    # the next session starts with a fresh home
    http, term, _ = await _web(gateway, alice)
    assert "three-mb" not in await term.run("command ls -A ~")
    await _exit(term, http)


async def test_the_benchmark_measures_both_kinds_of_home(tmp_path):
    """benchmarks/bench_homes.py in its smallest run: both columns measured, nothing left."""
    out = tmp_path / "homes.json"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "benchmarks.bench_homes", "--runs", "1", "--home-size", "32m", "--json", str(out),
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 240)
    assert proc.returncode == 0, err.decode()[-3000:]
    results = json.loads(out.read_text())
    assert results["first_login_making_the_home_ms"] > 0 and results["home_store_make_ms"] > 0
    assert results["home_store_mount"]["n"] == results["home_store_unmount"]["n"] == 1
    for kind in ("ephemeral", "persistent"):
        assert results[f"ws_login_to_prompt_{kind}"]["n"] == 1
    assert not [line for line in _loops_under(Path("/tmp")) if "tb-bench-" in line]


async def test_check_fails_when_the_gateway_has_a_mount_namespace_of_its_own(tmp_path):
    """`termbridge check` on the host: homes fine; the same check in a private mount namespace
    (what systemd's sandboxing makes) fails and names the drop-in."""
    config = tmp_path / "c.toml"
    config.write_text(f'state_dir = "{tmp_path}/state"\n[session]\nhome = "persistent"\n')

    async def check(*prefix: str) -> str:
        proc = await asyncio.create_subprocess_exec(
            *prefix, sys.executable, "-m", "bridge", "check", "--config", str(config), cwd=ROOT,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await asyncio.wait_for(proc.communicate(), 120)
        return next(line for line in out.decode().splitlines() if line.split()[1:2] == ["homes:"])

    assert (await check()).startswith("ok   homes: tools present, host mount namespace")
    private = await check("unshare", "--mount", "--propagation", "slave")
    assert private.startswith("FAIL homes: the gateway runs in a mount namespace of its own")
    assert "persistent-homes.conf" in private


async def test_an_image_without_the_feature_is_a_clear_refusal(start_gateway, user, docker_engine):
    """A session image built before persistent homes (no `persistent-home` in its
    termbridge.features label) would fail deep in its setup: the person is told, nothing is left."""
    old = "termbridge/session:homes-test-old"
    dockerfile = f'FROM {TEST_IMAGE}\nLABEL termbridge.features=""\n'.encode()
    built, _ = docker_engine.images.build(fileobj=io.BytesIO(dockerfile), tag=old, rm=True)
    try:
        gateway = await start_gateway(session={**HOME, "image": old})
        http = await gateway.login(user)
        term = await gateway.terminal(http)
        await term.drain_until_closed()
        messages = [c.get("message", "") for c in term.controls]
        assert any("cannot keep your home directory" in m for m in messages), term.controls
        await http.close()
        await containers_gone(**{"termbridge.user": user.name})
    finally:
        docker_engine.images.remove(built.id, force=True)


async def test_the_reaper_unmounts_homes_no_session_uses(start_gateway, make_user):
    """A home a killed gateway left mounted is unmounted by the reaper's next round; the home of
    a person with a live session stays."""
    from bridge.app import reap_once
    from bridge.web.keys import MANAGER

    alice, bob = make_user(), make_user()
    gateway = await start_gateway(session=HOME)
    manager = gateway.app[MANAGER]
    http, term, _ = await _web(gateway, alice)
    left = await asyncio.to_thread(manager.homes.store.mount, bob.name, _uid(bob), 32 * MiB)  # as a killed run leaves it
    assert mounted_at(left) is not None
    await reap_once(manager)
    assert mounted_at(left) is None
    assert mounted_at(manager.homes.store.mount_point(_uid(alice))) is not None  # alice's session uses hers
    assert await term.run("echo still here > ~/x; cat ~/x") == "still here\n"
    await _exit(term, http)


async def test_a_home_mounted_where_docker_cannot_see_it_is_refused(gateway_process, user):
    """The trap `termbridge check` and the systemd drop-in are about: a gateway in a mount
    namespace of its own would mount the home where dockerd never sees it (a container would get
    the bare mount point). It refuses to, and says why in its log: no shell, no container, nothing
    mounted."""
    process = gateway_process(session={**HOME, "image": TEST_IMAGE})
    process.prefix = ("unshare", "--mount", "--propagation", "slave")
    await process.start()
    gateway = process.gateway
    http = await gateway.login(user)
    term = await gateway.terminal(http)
    await term.drain_until_closed(timeout=60)
    assert not [c for c in term.controls if c.get("type") == "session"], term.controls
    assert any(c.get("type") in ("error", "exit") for c in term.controls), term.controls
    assert "the gateway runs in a mount namespace of its own" in process.log()
    await http.close()
    await containers_gone(**{"termbridge.user": user.name})
    homes = load_config(process.config_path, env={}).homes_path
    assert not (homes / "mnt" / str(_uid(user))).exists() or os.listdir(homes / "mnt" / str(_uid(user))) == []
    process.stop()

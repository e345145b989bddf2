"""Persistent homes: one ext4 file system per person, in a preallocated image file on this host.

Why a file system of its own: its size is the kernel's limit (a full home is ENOSPC to its owner
and to nobody else), and because the image is preallocated (fallocate), filling it takes nothing
more from the host's disk. The image is loop-mounted on the host at `<root>/mnt/<uid>` while the
person has sessions, and each of their containers gets that directory bind-mounted at
/home/<user>. Files are named by the person's host uid (names can be reused by a new account;
the uid is what the session uid derives from).

The same image is never mounted twice through two loop devices (two kernels' worth of ext4 on one
disk would corrupt it): every mount or unmount of one person's home runs under their lock (a
thread lock in this process and a `flock` across processes), checks /proc/self/mountinfo first,
and `mount -o loop` reuses the loop device an image is still attached to (a container that
outlived the host's mount keeps it attached). Every call here blocks: run them in a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import logging
import os
import pwd
import re
import subprocess
import threading
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import BridgeError

log = logging.getLogger("termbridge.homes")

IMAGE_SUFFIX = ".img"
MOUNT_OPTIONS = "loop,nosuid,nodev,noatime"
_TOOL_TIMEOUT = 300


class HomeError(BridgeError):
    """A home that cannot be made, mounted, read or removed; the detail says why, for the admin."""

    user_message = "your home directory could not be prepared; ask the admin"


class HomeInUse(HomeError):
    """The home is mounted in a container still: it cannot be removed now."""


@dataclass(frozen=True)
class HomeInfo:
    """One home as `termbridge homes list` shows it."""

    uid: int
    user: str  # the account it was made for ("" when unknown)
    size: int  # bytes the person may use (the file system's size)
    used: int  # bytes in use
    mounted: bool

    def as_json(self) -> dict[str, object]:
        return {"uid": self.uid, "user": self.user, "size": self.size, "used": self.used, "mounted": self.mounted}


def _run(*argv: str, ok: tuple[int, ...] = (0,)) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=_TOOL_TIMEOUT, check=False)
    except FileNotFoundError as exc:
        raise HomeError(detail=f"{argv[0]} is not installed (package e2fsprogs or util-linux): {exc}") from exc
    except subprocess.TimeoutExpired as exc:
        raise HomeError(detail=f"{' '.join(argv)} took longer than {_TOOL_TIMEOUT} s") from exc
    if done.returncode not in ok:
        raise HomeError(detail=f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    return done.stdout


def _unescape(field: str) -> str:
    """Mountinfo escapes space, tab, newline and backslash as octal."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mount_points() -> list[str]:
    """Every mount point in /proc/self/mountinfo."""
    with open("/proc/self/mountinfo") as info:
        return [_unescape(line.split()[4]) for line in info if len(line.split()) >= 5]


def mounted_at(path: Path) -> tuple[str, str] | None:
    """(file system type, source device) of what is mounted at `path`, from /proc/self/mountinfo;
    None when nothing is. The last entry wins (a mount stacked on another hides it)."""
    found = None
    target = str(path)
    with open("/proc/self/mountinfo") as info:
        for line in info:
            left, _, right = line.partition(" - ")
            fields = left.split()
            if len(fields) >= 5 and _unescape(fields[4]) == target:
                rest = right.split()
                found = (rest[0], _unescape(rest[1])) if len(rest) >= 2 else ("?", "?")
    return found


def loop_backing_file(device: str) -> str | None:
    """The file behind /dev/loopN, as the kernel says (None for anything else)."""
    name = Path(device).name
    if not name.startswith("loop"):
        return None
    try:
        return Path(f"/sys/block/{name}/loop/backing_file").read_text().strip()
    except OSError:
        return None


DOCKER_PID_FILES = (Path("/run/docker.pid"), Path("/var/run/docker.pid"))


def shares_docker_mount_namespace() -> bool:
    """Whether this process mounts where dockerd (which resolves bind mounts) sees it: a mount
    made in a namespace of its own (systemd's sandboxing makes one) never reaches a container.
    Compared with dockerd's namespace, else PID 1's; OSError when neither can be read."""
    own = os.readlink("/proc/self/ns/mnt")
    for pid_file in DOCKER_PID_FILES:
        try:
            return own == os.readlink(f"/proc/{int(pid_file.read_text().strip())}/ns/mnt")
        except (OSError, ValueError):
            continue
    return own == os.readlink("/proc/1/ns/mnt")


def account_name(uid: int) -> str:
    """The host account of `uid` now; "" when it has none (deleted)."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return ""


def loops_of(image: Path) -> list[str]:
    """Loop devices attached to `image` (mounted, or held by a container's mount)."""
    out = _run("losetup", "--noheadings", "--output", "NAME", "--associated", str(image))
    return [line.strip() for line in out.splitlines() if line.strip()]


def _preallocate(image: Path, size: int) -> None:
    """Every block of the image's first `size` bytes allocated on the host now (fallocate: no
    data written), so that filling the home never takes more of the host's disk."""
    fd = os.open(image, os.O_WRONLY)
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        raise HomeError(
            "there is no room on the server for your home directory; ask the admin",
            detail=f"preallocating {size} bytes for {image}: {exc}",
        ) from exc
    finally:
        os.close(fd)


def _hand_over(root: Path, old: int, new: int) -> None:
    """Everything of uid (and gid) `old` under `root` to `new`, links themselves not followed."""
    for directory, dirs, files in os.walk(root):
        for name in [directory, *(os.path.join(directory, n) for n in dirs + files)]:
            st = os.lstat(name)
            if st.st_uid == old or st.st_gid == old:
                os.lchown(name, new if st.st_uid == old else -1, new if st.st_gid == old else -1)
    log.info("home %s handed over from uid %d to %d", root, old, new)


def _drop_lost_found(point: Path) -> None:
    """mkfs and e2fsck make an empty root-owned lost+found; it has no place in a person's home
    (a file system check makes it again if it ever needs one). The person's own is left alone."""
    lost = point / "lost+found"
    try:
        if lost.lstat().st_uid == 0 and not any(lost.iterdir()):
            lost.rmdir()
    except OSError:
        pass


class HomeStore:
    """The homes under `root`: images/<uid>.img, mnt/<uid> (mount points), locks/<uid>.lock."""

    def __init__(self, root: Path, uid_base: int) -> None:
        self.root = root.resolve()  # compared with the kernel's loop backing file names
        self.uid_base = uid_base
        self._locks: dict[int, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._namespace_ok = False

    def image(self, uid: int) -> Path:
        return self.root / "images" / f"{uid}{IMAGE_SUFFIX}"

    def mount_point(self, uid: int) -> Path:
        return self.root / "mnt" / str(uid)

    def _prepare_dirs(self) -> None:
        for sub in ("", "images", "mnt", "locks"):
            path = self.root / sub
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(path, 0o700)

    @contextlib.contextmanager
    def locked(self, uid: int) -> Iterator[None]:
        """One person's home, one change at a time: threads here, processes through flock."""
        self._prepare_dirs()
        with self._locks_guard:
            lock = self._locks.setdefault(uid, threading.Lock())
        with lock:
            fd = os.open(self.root / "locks" / f"{uid}.lock", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)

    # -- for sessions ----------------------------------------------------------------------------

    def mount(self, user: str, uid: int, size: int) -> Path:
        """`user`'s home (host uid `uid`) mounted on the host, created at `size` on first use and
        grown to `size` when it is smaller and not mounted; the directory to bind into a container."""
        self._check_namespace()
        session_uid = self.uid_base + uid
        with self.locked(uid):
            image = self.image(uid)
            fresh = not image.exists()
            if fresh:
                self._create(image, size, user)
                self._record_owner(uid, user)
            else:
                self._check_owner(uid, user)
            point = self.mount_point(uid)
            point.mkdir(mode=0o700, exist_ok=True)
            if self._check_mounted(image, point):
                if image.stat().st_size < size:
                    log.info("home of %s (uid %d) is in use: it grows to %d bytes once unmounted", user, uid, size)
            else:
                self._reserve_and_grow(image, size, user)
                _run("mount", "-t", "ext4", "-o", MOUNT_OPTIONS, str(image), str(point))
                if not self._check_mounted(image, point):
                    raise HomeError(detail=f"mounted {image} at {point}, but mountinfo does not show it")
                log.info("home of %s (uid %d) mounted at %s", user, uid, point)
            _drop_lost_found(point)
            st = point.stat()
            if st.st_uid not in (0, session_uid):
                _hand_over(point, st.st_uid, session_uid)  # session.uid_base changed since
            if (st.st_uid, st.st_gid, st.st_mode & 0o7777) != (session_uid, session_uid, 0o700):
                os.chmod(point, 0o700)
                os.chown(point, session_uid, session_uid)
            return point

    def _check_namespace(self) -> None:
        if self._namespace_ok:
            return
        try:
            shared = shares_docker_mount_namespace()
        except OSError:
            # cannot tell (no access to dockerd's /proc): the image's setup still refuses a bare mount point
            shared = True
        if not shared:
            raise HomeError(
                detail="the gateway runs in a mount namespace of its own: a home it mounts never reaches dockerd "
                "(under systemd: install etc/systemd/persistent-homes.conf, see README, Persistent homes)"
            )
        self._namespace_ok = True

    def owner_file(self, uid: int) -> Path:
        return self.root / "images" / f"{uid}.owner"

    def _record_owner(self, uid: int, user: str) -> None:
        fd = os.open(self.owner_file(uid), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(user + "\n")

    def _check_owner(self, uid: int, user: str) -> None:
        """A uid can be given to a new account after the old one was deleted: the new one must
        not get the old one's files."""
        try:
            owner = self.owner_file(uid).read_text().strip()
        except FileNotFoundError:
            self._record_owner(uid, user)
            return
        if owner != user:
            raise HomeError(
                "your home directory is still that of an earlier account with your uid; ask the admin",
                detail=f"{self.image(uid)} belongs to {owner!r}, not {user!r} (both uid {uid}): keep what is "
                f"needed, then `termbridge homes rm {uid}`",
            )

    def owner(self, uid: int) -> str:
        """The account the home was made for ("" if unknown)."""
        try:
            return self.owner_file(uid).read_text().strip()
        except FileNotFoundError:
            return account_name(uid)

    def _create(self, image: Path, size: int, user: str) -> None:
        """A new image: preallocated, then ext4 with no blocks reserved for root (the person
        may use all of it) and no discard (which would punch the preallocation out again)."""
        partial = image.with_suffix(".new")
        partial.unlink(missing_ok=True)
        os.close(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        try:
            _preallocate(partial, size)
            # Inode tables and journal zeroed now: zeroed lazily after mount, they would go through
            # the loop device as "write zeroes", which punches holes in the preallocated image.
            _run("mkfs.ext4", "-q", "-F", "-m", "0", "-E", "nodiscard,lazy_itable_init=0,lazy_journal_init=0",
                 "-L", f"tb-home-{image.stem}"[:16], str(partial))
            os.rename(partial, image)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        log.info("home of %s created: %s, %d bytes", user, image, size)

    def _reserve_and_grow(self, image: Path, size: int, user: str) -> None:
        """Before a mount: allocate the whole image again (a trim through the loop device punches
        holes that a later write would take from the host's disk), and grow it when `size` says so."""
        current = image.stat().st_size
        target = max(current, size)
        _preallocate(image, target)
        if target > current:
            _run("e2fsck", "-f", "-p", str(image), ok=(0, 1))  # 1: something was fixed
            _run("resize2fs", str(image))
            log.info("home of %s grown from %d to %d bytes", user, current, target)

    def _check_mounted(self, image: Path, point: Path) -> bool:
        """Whether `image` is what is mounted at `point`; anything else there is an error."""
        found = mounted_at(point)
        if found is None:
            return False
        fstype, source = found
        backing = loop_backing_file(source)
        if fstype != "ext4" or backing is None or Path(backing.removesuffix(" (deleted)")) != image:
            raise HomeError(detail=f"{point} has {fstype} from {source} ({backing}) mounted, not {image}")
        return True

    def unmount(self, uid: int, in_use: Callable[[], bool]) -> bool:
        """Unmount a home unless `in_use()` says a session of this gateway still counts on it
        (asked under the lock, so a session mounting it meanwhile is seen). A container still
        holding its own mount keeps the loop device (and the file system) alive; the next mount
        reuses it. True when unmounted now."""
        with self.locked(uid):
            if in_use():
                return False
            return self._unmount(uid)

    def _unmount(self, uid: int) -> bool:
        point = self.mount_point(uid)
        if not self._check_mounted(self.image(uid), point):
            return False
        _run("umount", str(point))
        log.info("home of uid %d unmounted", uid)
        return True

    def mounted_uids(self) -> list[int]:
        """The uids whose home is mounted on this host now."""
        mnt = self.root / "mnt"
        found = {Path(point) for point in mount_points()}
        return sorted(int(p.name) for p in found if p.parent == mnt and p.name.isdigit())

    # -- for the admin ---------------------------------------------------------------------------

    def uids(self) -> list[int]:
        images = self.root / "images"
        if not images.is_dir():
            return []
        return sorted(int(p.stem) for p in images.glob(f"*{IMAGE_SUFFIX}") if p.stem.isdigit())

    def info(self, uid: int) -> HomeInfo:
        image = self.image(uid)
        if not image.exists():
            raise HomeError(f"uid {uid} has no home", detail=f"{image} does not exist")
        user = self.owner(uid)
        point = self.mount_point(uid)
        if self._check_mounted(image, point):
            st = os.statvfs(point)
            size, used = st.f_blocks * st.f_frsize, (st.f_blocks - st.f_bfree) * st.f_frsize
            return HomeInfo(uid, user, size, used, True)
        fields = dict(
            line.split(":", 1) for line in _run("dumpe2fs", "-h", str(image)).splitlines() if ":" in line
        )
        # as statvfs counts a mounted one: the file system's own metadata is neither size nor use
        block = int(fields["Block size"])
        blocks = int(fields["Block count"]) - int(fields.get("Overhead clusters", "0"))
        free = int(fields["Free blocks"])
        return HomeInfo(uid, user, blocks * block, (blocks - free) * block, False)

    def remove(self, uid: int, in_use: Callable[[], bool]) -> None:
        """Unmount and delete. Raises HomeInUse while a session of this gateway counts on it
        (`in_use()`, asked under the lock) or a container still has it mounted."""
        with self.locked(uid):
            image = self.image(uid)
            if not image.exists():
                raise HomeError(f"uid {uid} has no home", detail=f"{image} does not exist")
            if in_use():
                raise HomeInUse(f"the home of uid {uid} is in use by a session; end it first", detail="in use here")
            self._unmount(uid)
            held = loops_of(image)
            if held:
                raise HomeInUse(
                    f"the home of uid {uid} is still mounted in a container; end its sessions first",
                    detail=f"{image} is attached to {', '.join(held)}",
                )
            image.unlink()
            self.owner_file(uid).unlink(missing_ok=True)
            with contextlib.suppress(FileNotFoundError, OSError):
                self.mount_point(uid).rmdir()
            log.info("home of uid %d removed", uid)


class HomeMounts:
    """Which of this gateway's sessions count on whose home, by session id: set before the mount,
    dropped once the session's container is gone (or another gateway serves it). A home is
    unmounted when the last session here that counts on it goes, unless `held_elsewhere(user)`
    says another gateway on this host holds a session of that person (a rolling restart)."""

    def __init__(self, store: HomeStore, held_elsewhere: Callable[[str], Awaitable[bool]]) -> None:
        self.store = store
        self._held_elsewhere = held_elsewhere
        self._uids: dict[str, int] = {}

    def in_use(self, uid: int) -> bool:
        """Whether a session of this gateway counts on `uid`'s home (safe to call from a thread)."""
        return uid in list(self._uids.values())

    def note(self, session_id: str, uid: int) -> None:
        """The session's container may have `uid`'s home mounted: unmount only after it."""
        self._uids[session_id] = uid

    def forget(self, session_id: str) -> None:
        """The session runs on without this gateway, its container keeping the home."""
        self._uids.pop(session_id, None)

    async def mount(self, session_id: str, username: str, uid: int, size: int) -> str:
        """The person's home mounted on the host (made on first use): the directory the container gets."""
        self.note(session_id, uid)
        return str(await asyncio.to_thread(self.store.mount, username, uid, size))

    async def release(self, session_id: str, username: str) -> None:
        """The session's container is gone: unmount its home if nothing else counts on it."""
        uid = self._uids.pop(session_id, None)
        if uid is not None:
            await self._unmount(username, uid)

    async def _unmount(self, username: str, uid: int) -> bool:
        if await self._held_elsewhere(username):
            return False
        try:
            return await asyncio.to_thread(self.store.unmount, uid, functools.partial(self.in_use, uid))
        except HomeError as exc:
            log.warning("home of %s not unmounted: %s", username, exc.detail)
            return False

    async def sweep(self) -> int:
        """Unmount the homes on this host that no session uses: what a killed gateway left
        mounted, or the home of a session whose leftover container the reaper removed. (A home
        left mounted costs a loop device, never data: a container keeps its own mount.)"""
        swept = 0
        for uid in await asyncio.to_thread(self.store.mounted_uids):
            if not self.in_use(uid):
                swept += await self._unmount(await asyncio.to_thread(self.store.owner, uid), uid)
        return swept

"""Files in a session's home directory, over SFTP on the gateway's own SSH connection to the container
(opened by `upstream`, which owns every asyncssh call; this module is the policy on top).

Every path comes from the person, so it is checked twice: by its text before the container is
asked anything (relative, no `..`, no NUL or control characters, bounded), and after the
container's sftp-server resolved it (`realpath`), so that a symlink cannot lead outside the home.
The sftp-server runs as the session's user inside that session's own container: a race between
the check and the use (a symlink swapped in between) reaches nothing that person's own shell
could not reach. The check keeps the endpoints' promise; the container is the security boundary.

Data moves in bounded chunks both ways; nothing here ever holds a whole file. Uploads go to a
hidden temporary name first and are renamed into place only when complete, so a failed or
aborted upload leaves nothing behind and never truncates the file it would have replaced.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import PurePosixPath

from .errors import BridgeError
from .upstream import FileAttrs, FileKind, RemoteFiles, Sftp, SftpFailure, Upstream

MAX_PATH = 4096
MAX_NAME = 255
CHUNK = 256 * 1024
MAX_ENTRIES = 2000


class FileError(BridgeError):
    """A file request that cannot be done; `user_message` says why, fit to show."""


class BadPath(FileError):
    """The path is malformed: absolute, `..`, NUL, control characters, too long."""


class OutsideHome(FileError):
    """The path resolves (through a symlink) outside the home directory."""


class FileNotFound(FileError):
    user_message = "no such file or directory"


class WrongType(FileError):
    """A directory where a file is needed, or the other way round."""


class TooLarge(FileError):
    """Bigger than the configured upload limit."""


class DiskFull(FileError):
    """The container's file system has no room for it."""


class TransferFailed(FileError):
    user_message = "the file transfer failed"


def clean_relative(path: str) -> PurePosixPath:
    """The person's `path` as a path relative to the home, or BadPath. `""` and `"."` are the
    home itself. Absolute paths and any `..` component are refused outright, not normalised:
    a request that tries to climb out says something about the client, and gets a clear no."""
    if len(path) > MAX_PATH:
        raise BadPath(f"the path is longer than {MAX_PATH} characters")
    if any(ord(c) < 32 or ord(c) == 127 for c in path):
        raise BadPath("the path contains control characters")
    if path.startswith("/"):
        raise BadPath("give a path relative to your home directory, not an absolute one")
    parts = [part for part in path.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise BadPath("paths may not contain '..'")
    if any(len(part.encode()) > MAX_NAME for part in parts):
        raise BadPath(f"a file name is longer than {MAX_NAME} bytes")
    return PurePosixPath(*parts)


def is_inside(home: str, resolved: str) -> bool:
    """Whether the canonical `resolved` is `home` or below it (by components, not by prefix:
    /home/al is not inside /home/alice)."""
    home_path, target = PurePosixPath(home), PurePosixPath(resolved)
    return target == home_path or home_path in target.parents


def display_path(home: str, resolved: str) -> str:
    """`~/dir/name` for the person."""
    rel = PurePosixPath(resolved).relative_to(home)
    return "~" if rel == PurePosixPath(".") else f"~/{rel}"


@dataclass(frozen=True)
class Entry:
    name: str
    type: str  # file, dir, link (a link also says what it points to in `target`), other
    size: int
    mtime: int | None
    target: str | None = None  # for links: file, dir, other, or broken

    def as_json(self) -> dict[str, object]:
        data: dict[str, object] = {"name": self.name, "type": self.type, "size": self.size, "mtime": self.mtime}
        if self.target is not None:
            data["target"] = self.target
        return data


@dataclass(frozen=True)
class Listing:
    path: str  # relative to the home, "" for the home itself
    display: str
    entries: list[Entry]
    truncated: bool


@dataclass(frozen=True)
class RemoteFile:
    resolved: str
    name: str
    size: int


class HomeFiles:
    """One SFTP conversation with a session's container, confined to the session user's home.
    Open with `HomeFiles.open(upstream)`; every method takes the person's path text."""

    def __init__(self, sftp: RemoteFiles, home: str) -> None:
        self.sftp = sftp
        self.home = home

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, upstream: Upstream) -> AsyncIterator[HomeFiles]:
        """A new sftp-server in the container, on the session's existing SSH connection. The home
        is whatever the server says the login directory is (/home/<user>, or /root). SFTP errors
        inside the block become FileErrors; anything else (the browser going away) passes."""
        try:
            async with upstream.open_files() as sftp:
                yield cls(sftp, await sftp.realpath("."))
        except SftpFailure as exc:
            raise _translate(exc) from exc

    async def resolve(self, path: str) -> tuple[PurePosixPath, str]:
        """(relative path, canonical absolute path inside the home). The last component need not
        exist (the container's realpath allows that); anything above it must."""
        rel = clean_relative(path)
        target = str(PurePosixPath(self.home) / rel)
        try:
            resolved = await self.sftp.realpath(target)
        except SftpFailure as exc:
            if exc.kind is not Sftp.NO_SUCH_FILE:
                raise
            raise FileNotFound(f"{self._shown(rel)}: no such directory") from None
        if not is_inside(self.home, resolved):
            raise OutsideHome(
                f"{self._shown(rel)} leads outside your home directory",
                detail=f"{target!r} resolves to {resolved!r}, outside {self.home!r}",
            )
        return rel, resolved

    def _shown(self, rel: PurePosixPath) -> str:
        return "~" if not rel.parts else f"~/{rel}"

    async def _stat(self, resolved: str, rel: PurePosixPath, missing: str = "no such file or directory") -> FileAttrs:
        try:
            return await self.sftp.stat(resolved)
        except SftpFailure as exc:
            if exc.kind is not Sftp.NO_SUCH_FILE:
                raise
            raise FileNotFound(f"{self._shown(rel)}: {missing}") from None

    async def list(self, path: str = "") -> Listing:
        rel, resolved = await self.resolve(path)
        attrs = await self._stat(resolved, rel)
        if attrs.kind is not FileKind.DIR:
            raise WrongType(f"{self._shown(rel)} is not a directory")
        entries: list[Entry] = []
        truncated = False
        async for name, item in self.sftp.scandir(resolved):
            if name in (".", ".."):
                continue
            if len(entries) >= MAX_ENTRIES:
                truncated = True
                break
            entries.append(await self._entry(resolved, name, item))
        entries.sort(key=lambda e: (e.type != "dir" and e.target != "dir", e.name.lower()))
        return Listing(path=str(rel) if rel.parts else "", display=self._shown(rel), entries=entries, truncated=truncated)

    async def _entry(self, directory: str, name: str, attrs: FileAttrs) -> Entry:
        target = None
        if attrs.kind is FileKind.LINK:
            try:
                target = (await self.sftp.stat(f"{directory}/{name}")).kind.value
            except SftpFailure as exc:
                if exc.kind is Sftp.UNAVAILABLE:
                    raise
                target = "broken"
        return Entry(name=name, type=attrs.kind.value, size=attrs.size, mtime=attrs.mtime, target=target)

    async def stat_file(self, path: str) -> RemoteFile:
        """A regular file to download (a symlink to one inside the home will do)."""
        rel, resolved = await self.resolve(path)
        if not rel.parts:
            raise WrongType("name a file to download")
        attrs = await self._stat(resolved, rel)
        if attrs.kind is not FileKind.FILE:
            raise WrongType(f"{self._shown(rel)} is not a regular file")
        return RemoteFile(resolved=resolved, name=rel.name, size=attrs.size)

    async def read(self, file: RemoteFile) -> AsyncIterator[bytes]:
        """The file's bytes in chunks, at most the size it had when stat'ed (the promised length)."""
        async with self.sftp.open(file.resolved, "rb") as fh:
            offset = 0
            while offset < file.size:
                chunk = await fh.read(min(CHUNK, file.size - offset), offset)
                if not chunk:
                    raise TransferFailed(
                        "the file shrank while it was being downloaded",
                        detail=f"{file.resolved!r}: EOF at {offset} of {file.size}",
                    )
                offset += len(chunk)
                yield chunk

    async def free_space(self, resolved_dir: str) -> int | None:
        try:
            return await self.sftp.free_space(resolved_dir)
        except SftpFailure as exc:
            if exc.kind is Sftp.UNAVAILABLE:
                raise
            return None

    async def upload(
        self,
        path: str,
        chunks: AsyncIterator[bytes],
        *,
        limit: int,
        length: int | None = None,
        on_chunk: Callable[[int], None] | None = None,
    ) -> RemoteFile:
        """Write `chunks` to `path` (a file in an existing directory inside the home), replacing a
        regular file of that name. Refuses to write through a symlink. `length`, when the client
        said it, is checked against the limit and the free space before anything is written."""
        rel = clean_relative(path)
        if not rel.parts:
            raise BadPath("name the file to upload")
        _, parent = await self.resolve(str(rel.parent))
        parent_attrs = await self._stat(parent, rel.parent, missing="no such directory")
        if parent_attrs.kind is not FileKind.DIR:
            raise WrongType(f"{self._shown(rel.parent)} is not a directory")
        final = f"{parent}/{rel.name}"
        await self._check_replaceable(final, rel)
        if length is not None:
            if length > limit:
                raise TooLarge(_too_large(rel, limit), detail=f"{length} bytes announced, limit {limit}")
            free = await self.free_space(parent)
            if free is not None and length > free:
                raise DiskFull(
                    f"not enough space for {rel.name}: it needs {human_size(length)}, {human_size(free)} are free",
                    detail=f"{length} bytes announced, {free} free in {parent!r}",
                )
        # Bounded in bytes whatever the final name is: a 255-byte name plus a suffix would not fit.
        temp = f"{parent}/.tb-upload-{secrets.token_hex(8)}.part"
        written = 0
        done = False
        try:
            async with self.sftp.open(temp, "xb") as fh:
                async for chunk in chunks:
                    if written + len(chunk) > limit:
                        raise TooLarge(_too_large(rel, limit), detail=f"more than {limit} bytes sent")
                    try:
                        await fh.write(chunk, written)
                    except SftpFailure as exc:
                        if exc.kind is Sftp.UNAVAILABLE:
                            raise
                        raise await self._write_failed(exc, parent, rel) from exc
                    written += len(chunk)
                    if on_chunk is not None:
                        on_chunk(written)
            if length is not None and written != length:
                raise TransferFailed("the upload was incomplete", detail=f"{written} of {length} bytes arrived")
            await self.sftp.replace(temp, final)
            done = True
        finally:
            if not done:
                with contextlib.suppress(SftpFailure, OSError):
                    await self.sftp.remove(temp)
        return RemoteFile(resolved=final, name=rel.name, size=written)

    async def _check_replaceable(self, final: str, rel: PurePosixPath) -> None:
        try:
            existing = await self.sftp.lstat(final)
        except SftpFailure as exc:
            if exc.kind is not Sftp.NO_SUCH_FILE:
                raise
            return
        if existing.kind is FileKind.LINK:
            raise OutsideHome(
                f"{self._shown(rel)} is a symbolic link; uploads do not write through links",
                detail=f"upload onto symlink {final!r} refused",
            )
        if existing.kind is not FileKind.FILE:
            raise WrongType(f"{self._shown(rel)} exists and is not a regular file")

    async def _write_failed(self, exc: SftpFailure, parent: str, rel: PurePosixPath) -> FileError:
        """OpenSSH's sftp-server reports ENOSPC as a plain "Failure": ask the file system."""
        free = await self.free_space(parent)
        if exc.kind is Sftp.NO_SPACE or free == 0:
            return DiskFull(f"the disk is full: {rel.name} could not be written", detail=f"write failed: {exc!r}, {free} free")
        return _translate(exc)


def human_size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n} bytes"


def _too_large(rel: PurePosixPath, limit: int) -> str:
    return f"{rel.name} is larger than the upload limit of {human_size(limit)}"


def _translate(exc: SftpFailure) -> FileError:
    if exc.kind is Sftp.UNAVAILABLE:
        return TransferFailed("the container's file service is not available", detail=exc.detail)
    if exc.kind is Sftp.NO_SUCH_FILE:
        return FileNotFound(detail=exc.detail)
    if exc.kind is Sftp.PERMISSION:
        return FileError("permission denied", detail=exc.detail)
    if exc.kind is Sftp.NO_SPACE:
        return DiskFull("the disk is full", detail=exc.detail)
    return TransferFailed(detail=exc.detail)

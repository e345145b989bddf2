"""Throwaway host accounts for PAM logins, created with useradd/chpasswd and removed after."""

from __future__ import annotations

import secrets
import subprocess
from dataclasses import dataclass


@dataclass
class HostUser:
    name: str
    password: str


# Every password given to a throwaway account: the suite checks none ever shows up in a log line.
PASSWORDS: list[str] = []


def run(*cmd: str, input: str | None = None) -> None:
    subprocess.run(cmd, check=True, input=input, text=True, capture_output=True)


def create_user(
    *, shell: str = "/bin/bash", locked: bool = False, expired: bool = False, groups: tuple[str, ...] = ()
) -> HostUser:
    name = "tb" + secrets.token_hex(4)
    password = "pw-" + secrets.token_urlsafe(12)
    PASSWORDS.append(password)
    run("useradd", "--create-home", "--shell", shell, name)
    run("chpasswd", input=f"{name}:{password}\n")
    if groups:
        run("usermod", "-a", "-G", ",".join(groups), name)
    if locked:
        run("usermod", "-L", name)
    if expired:
        run("chage", "-E", "2000-01-01", name)
    return HostUser(name, password)


def create_group() -> str:
    name = "tbg" + secrets.token_hex(3)
    run("groupadd", name)
    return name


def delete_group(name: str) -> None:
    subprocess.run(["groupdel", name], capture_output=True)


def delete_user(user: HostUser) -> None:
    subprocess.run(["userdel", "-r", "-f", user.name], capture_output=True)

"""The SSH door's channels: what a client's channel may store (`env` caps) and how any request,
sftp included, runs through the door's handler."""

from __future__ import annotations

import logging
from typing import Any

import asyncssh

log = logging.getLogger("termbridge.ssh")

PASSED_ENV = ("LANG", "TERM")
# asyncssh keeps every `env` request on the channel until it closes: a client could fill the
# gateway's memory with them. Only names that pass are kept, and only this many and this much.
MAX_ENV_VARS = 32  # per channel
MAX_ENV_BYTES = 16 * 1024  # names and values, per channel
MAX_ENV_BYTES_PER_CONNECTION = 256 * 1024  # over all its channels, for its whole life


def env_passes(name: str) -> bool:
    return name in PASSED_ENV or name.startswith("LC_")


class EnvBudget:
    """What one connection may still store of `env` requests (see MAX_ENV_BYTES_PER_CONNECTION)."""

    def __init__(self) -> None:
        self.left = MAX_ENV_BYTES_PER_CONNECTION
        self.refused = 0


class EnvCappedChannel(asyncssh.SSHServerChannel):
    """A session channel that refuses `env` requests beyond the caps, and names that would not be
    passed to the container anyway (like sshd's AcceptEnv), instead of keeping them all."""

    env_budget: EnvBudget

    def _process_env_request(self, packet: asyncssh.packet.SSHPacket) -> bool:
        name, value = packet.get_string(), packet.get_string()
        packet.check_end()
        size = len(name) + len(value)
        stored = sum(len(k) + len(v) for k, v in self._env.items() if k != name)
        budget = self.env_budget
        if not env_passes(name.decode("utf-8", "replace")):
            return False
        if (name not in self._env and len(self._env) >= MAX_ENV_VARS) or stored + size > MAX_ENV_BYTES or size > budget.left:
            budget.refused += 1
            if budget.refused == 1:
                log.warning(
                    "ssh env requests from %s refused: over %d variables or %d bytes per channel, or %d per connection",
                    self.get_extra_info("peername", ("-",))[0], MAX_ENV_VARS, MAX_ENV_BYTES, MAX_ENV_BYTES_PER_CONNECTION,
                )
            return False
        budget.left -= size
        self._env[name] = value
        return True


# -- channels -------------------------------------------------------------------------------------


def say(process: asyncssh.SSHServerProcess, text: str) -> None:
    """One line on the channel's stderr (the person's terminal, not the program's output)."""
    end = "\r\n" if process.term_type else "\n"
    try:
        process.stderr.write(f"termbridge: {text}{end}".encode())
    except OSError:
        pass  # the channel is already closing


def refuse(process: asyncssh.SSHServerProcess, text: str, status: int = 1) -> None:
    say(process, text)
    process.exit(status)


class ChannelProcess(asyncssh.SSHServerProcess):
    """One channel a client opened. asyncssh would serve "sftp" itself (given an sftp_factory) or
    refuse it; here sftp is the container's sshd's to serve, like a shell or a command."""

    def __init__(self, handler: Any) -> None:
        super().__init__(handler, None, 0, False)

    def subsystem_requested(self, subsystem: str) -> bool:
        return subsystem == "sftp"

    def session_started(self) -> None:
        start_as_process(self)


def start_as_process(process: asyncssh.SSHServerProcess) -> None:
    """Run `process`'s handler on its channel, as asyncssh does for a shell or a command, whatever
    the request (sftp included). asyncssh has no public call for this (its own session_started
    hands "sftp" to its built-in SFTP server), so this is the one place that uses a private one:
    `SSHServerProcess._start_process(stdin, stdout, stderr)`. tests/test_ssh_front.py checks that
    asyncssh still has it, so an upgrade that changes it fails there, not in production."""
    chan = process.channel
    handler = process._start_process(  # noqa: SLF001 - see the docstring
        asyncssh.SSHReader(process, chan),
        asyncssh.SSHWriter(process, chan),
        asyncssh.SSHWriter(process, chan, asyncssh.EXTENDED_DATA_STDERR),
    )
    chan.get_connection().create_task(handler)

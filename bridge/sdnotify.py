"""systemd's readiness protocol (`Type=notify`), without a dependency: one datagram with
`READY=1` or `STOPPING=1` to the unix socket named by $NOTIFY_SOCKET. Without that variable
(not started by systemd) it does nothing."""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("termbridge")


def sd_notify(state: str) -> bool:
    """Tell the service manager `state`; False when there is none to tell or it cannot be
    told (a gateway that cannot notify still serves: systemd then times the start out)."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as exc:
        log.warning("cannot notify the service manager (%s) of %s: %s", address.lstrip("\0"), state, exc)
        return False
    return True

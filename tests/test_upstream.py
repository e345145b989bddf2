"""The gateway's SSH client to a session container, through a real gateway and container."""

from __future__ import annotations

from bridge.upstream import CIPHERS
from bridge.web.keys import MANAGER
from helpers import PROMPT


async def test_upstream_negotiates_the_cheapest_cipher_first(gateway, user):
    """AES-GCM (AES-NI) before chacha20-poly1305: the benchmark's echo and throughput depend on it."""
    async with await gateway.login(user) as http:
        term = await gateway.terminal(http)
        session = await term.control("session")
        await term.expect(PROMPT)
        conn = gateway.app[MANAGER].get(session["id"]).upstream.conn
        assert conn.get_extra_info("send_cipher") == CIPHERS[0] == "aes128-gcm@openssh.com"
        assert conn.get_extra_info("recv_cipher") == CIPHERS[0]
        await term.send("exit\r")
        await term.control("exit")

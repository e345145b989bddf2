"""GET /metrics: real Prometheus text from a real gateway, parsed with prometheus-client's parser."""

from __future__ import annotations

import aiohttp
import docker

from bridge.config import SessionConfig
from bridge.backends.docker import DockerBackend
from bridge.web.http import address_in
from bridge.web.keys import MANAGER
from helpers import PROMPT, TEST_IMAGE, containers_gone, metric, scrape, wait_for


async def test_sessions_logins_and_time_to_prompt_are_counted(gateway, user):
    before = await scrape(gateway.url)
    assert metric(before, "termbridge_sessions_live", door="web") == 0
    assert metric(before, "termbridge_sessions_live", door="ssh") == 0
    assert metric(before, "termbridge_login_attempts_total", door="web", result="denied") == 0
    assert metric(before, "termbridge_session_start_seconds_count", door="web") == 0
    assert ("process_resident_memory_bytes", ()) in before
    assert not [name for name, _ in before if name.endswith("_created")]

    assert await gateway.attempt_login(user.name, "nope") == 401
    async with await gateway.login(user) as http:
        term = await gateway.terminal(http)
        await term.control("session")
        await term.expect(PROMPT)
        live = await scrape(gateway.url)
        assert metric(live, "termbridge_sessions_live", door="web") == 1
        assert metric(live, "termbridge_login_attempts_total", door="web", result="denied") == 1
        assert metric(live, "termbridge_login_attempts_total", door="web", result="ok") == 1
        assert metric(live, "termbridge_session_starts_total", door="web", result="ok") == 1
        assert metric(live, "termbridge_session_start_seconds_count", door="web") == 1
        seconds = metric(live, "termbridge_session_start_seconds_sum", door="web")
        assert seconds > 0
        # the histogram puts that one start in the first bucket at or above it, and every later one
        buckets = {float(dict(k[1])["le"]): v for k, v in live.items()
                   if k[0] == "termbridge_session_start_seconds_bucket" and dict(k[1])["door"] == "web"}
        assert all(count == (1 if le >= seconds else 0) for le, count in buckets.items())
        await term.send("exit\r")
        await term.control("exit")

    async def ended() -> bool:
        return metric(await scrape(gateway.url), "termbridge_session_ends_total", door="web", reason="exit") == 1

    await wait_for(ended, what="the end to be counted")
    after = await scrape(gateway.url)
    assert metric(after, "termbridge_sessions_live", door="web") == 0
    assert metric(after, "termbridge_session_bytes_total", door="web", direction="in") == len(b"exit\r")
    assert metric(after, "termbridge_session_bytes_total", door="web", direction="out") > 0


async def test_docker_errors_are_counted(start_gateway, user, tmp_path):
    nowhere = f"unix://{tmp_path}/no-docker.sock"
    gateway = await start_gateway(backend=DockerBackend(SessionConfig(image=TEST_IMAGE), "unreachable", base_url=nowhere))
    async with aiohttp.ClientSession(base_url=gateway.url) as anon:
        assert (await anon.get("/healthz")).status == 503
    async with await gateway.login(user) as http:
        term = await gateway.terminal(http)
        assert (await term.control("exit"))["reason"] == "error"
    samples = await scrape(gateway.url)
    # the reaper's listing at startup, the /healthz ping, the start
    assert metric(samples, "termbridge_docker_errors_total", operation="ping", kind="unavailable") == 1
    assert metric(samples, "termbridge_docker_errors_total", operation="list", kind="unavailable") == 1
    assert metric(samples, "termbridge_docker_errors_total", operation="start", kind="unavailable") == 1
    assert metric(samples, "termbridge_session_starts_total", door="web", result="error") == 1


async def test_reaped_containers_are_counted(gateway, docker_engine):
    instance = (gateway.config.state_dir / "instance-id").read_text().strip()
    stray = docker_engine.containers.create(
        TEST_IMAGE, labels={"termbridge.session": "stray", "termbridge.gateway": instance}, entrypoint=["sleep", "60"]
    )
    try:
        assert await gateway.app[MANAGER].reap() == 1
        samples = await scrape(gateway.url)
        assert metric(samples, "termbridge_containers_reaped_total") == 1
        await containers_gone(**{"termbridge.session": "stray"})
    finally:
        try:
            stray.remove(force=True)
        except docker.errors.NotFound:
            pass


async def test_metrics_are_for_allowed_addresses_only(start_gateway):
    closed = await start_gateway(web={"metrics_allow": []})
    async with aiohttp.ClientSession() as http:
        resp = await http.get(closed.url + "/metrics")
        assert resp.status == 403 and "web.metrics_allow" in await resp.text()

    # Behind a trusted proxy, the client is the forwarded address, not the proxy's loopback.
    proxied = await start_gateway(web={"trusted_proxies": ["127.0.0.1"]})
    async with aiohttp.ClientSession() as http:
        resp = await http.get(proxied.url + "/metrics", headers={"X-Forwarded-For": "203.0.113.9"})
        assert resp.status == 403
    monitoring = await start_gateway(web={"trusted_proxies": ["127.0.0.1"], "metrics_allow": ["203.0.113.0/24"]})
    await scrape(monitoring.url, headers={"X-Forwarded-For": "203.0.113.9"})
    async with aiohttp.ClientSession() as http:
        assert (await http.get(monitoring.url + "/metrics")).status == 403  # loopback itself is not listed


def test_address_matching():
    assert address_in("127.0.0.1", ("127.0.0.1", "::1"))
    assert address_in("::ffff:127.0.0.1", ("127.0.0.1",))
    assert address_in("10.1.2.3", ("10.0.0.0/8",))
    assert not address_in("10.1.2.3", ("10.1.2.4",))
    assert not address_in("not-an-ip", ("0.0.0.0/0",))
    assert not address_in("127.0.0.1", ())

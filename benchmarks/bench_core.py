"""Core timings of the web door on this machine: login-to-prompt (WebSocket client and browser),
reattach time, and the resume buffer's memory per session.

    .venv/bin/python -m benchmarks.bench_core [--runs N] [--no-browser] [--json FILE]

Needs what the tests need (root, Docker, the session image, Debian's chromium). It creates a
throwaway PAM account and removes it, and talks only to loopback and its own containers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from benchmarks.harness import ROOT, bench_account, summary, workdir
from bridge.app import build_app
from bridge.config import load_config
from bridge.web.keys import MANAGER
from testbed.gateway import CHROMIUM, CHROMIUM_FLAGS, PROMPT, Gateway, wait_for_js, write_config


async def start_gateway(tmp: Path, pam_service: str, name: str = "bench", **sections: dict[str, Any]):
    """In this process (the measurements below read the session manager's buffers); `sections`
    go into its config."""
    path = write_config(tmp / f"{name}.toml", tmp / f"state-{name}", pam_service, **sections)
    config = load_config(path, env={})
    app = build_app(config, web_root=ROOT / "web")
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    return runner, Gateway(f"http://{host}:{port}", config, app, path)


async def ws_login_to_prompt(gateway, user, runs: int) -> list[float]:
    samples = []
    async with await gateway.login(user) as http:
        for _ in range(runs):
            t0 = time.perf_counter()
            term = await gateway.terminal(http)
            await term.expect(PROMPT)
            samples.append(time.perf_counter() - t0)
            await term.send("exit\r")
            await term.control("exit")
    return samples


async def reattach(gateway, user, runs: int) -> tuple[list[float], dict[str, int]]:
    samples = []
    async with await gateway.login(user) as http:
        term = await gateway.terminal(http)
        session = await term.control("session")
        await term.expect(PROMPT)
        manager = gateway.app[MANAGER]
        idle_held = manager.get(session["id"]).stream.output.held
        for _ in range(runs):
            await term.ws.close()
            t0 = time.perf_counter()
            term = await gateway.terminal(http, path=f"/ws?session={session['id']}&offset=0")
            await term.control("session")
            await term.expect(PROMPT)  # the replayed screen, through the last prompt
            samples.append(time.perf_counter() - t0)
        await term.send("head -c 3000000 /dev/zero | tr '\\0' x; echo; echo BIG-DONE\r")
        await term.expect(b"\r\nBIG-DONE\r\n", timeout=120)
        full_held = manager.get(session["id"]).stream.output.held
        await term.send("exit\r")
        await term.control("exit")
    return samples, {"idle_session_bytes": idle_held, "after_3MB_output_bytes": full_held}


async def browser_login_to_prompt(gateway, user, runs: int) -> list[float]:
    from playwright.async_api import async_playwright

    samples = []
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        for _ in range(runs):
            context = await browser.new_context()
            page = await context.new_page()
            await page.goto(gateway.url + "/login")
            await page.get_by_label("Username").fill(user.name)
            await page.get_by_label("Password").fill(user.password)
            t0 = time.perf_counter()
            await page.get_by_role("button", name="Log in").click()
            await wait_for_js(
                page,
                "!!document.querySelector('.xterm-rows')"
                " && /[$#] *$/m.test(document.querySelector('.xterm-rows').innerText)",
                timeout=30,
                interval=0.005,  # a timing: poll finely
            )
            samples.append(time.perf_counter() - t0)
            await page.locator(".xterm-helper-textarea").focus()
            await page.keyboard.type("exit\n")
            await wait_for_js(page, "document.body.dataset.state === 'ended'")
            await context.close()
        await browser.close()
    return samples


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--no-browser", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    results: dict[str, object] = {}
    async with bench_gateway() as (gateway, user):
        results["ws_login_to_prompt"] = summary(await ws_login_to_prompt(gateway, user, args.runs))
        reattach_samples, memory = await reattach(gateway, user, args.runs)
        results["reattach_to_prompt"] = summary(reattach_samples)
        results["resume_buffer"] = memory
        if not args.no_browser:
            results["browser_login_to_prompt"] = summary(await browser_login_to_prompt(gateway, user, max(3, args.runs // 2)))
    report(results, args.json)
    return 0


@contextlib.asynccontextmanager
async def bench_gateway():
    """A gateway on loopback and a throwaway PAM account, both gone afterwards."""
    async with bench_gateways({"bench": {}}) as (gateways, user):
        yield gateways["bench"], user


@contextlib.asynccontextmanager
async def bench_gateways(configs: dict[str, dict[str, dict[str, Any]]]):
    """Gateways on loopback, one per name (its config sections), and one throwaway PAM account
    they share, all gone afterwards."""
    tmp = workdir()
    runners = []
    with bench_account() as (pam_service, user):
        try:
            gateways = {}
            for name, sections in configs.items():
                runner, gateways[name] = await start_gateway(tmp, pam_service, name, **sections)
                runners.append(runner)
            yield gateways, user
        finally:
            for runner in reversed(runners):
                await runner.cleanup()
            shutil.rmtree(tmp, ignore_errors=True)


def report(results: dict[str, object], json_path: Path | None) -> None:
    text = json.dumps(results, indent=2)
    print(text)
    if json_path:
        json_path.write_text(text + "\n")


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))

"""Watch, join and both doors in real Chromium: an admin and a student in two browser contexts
against the real gateway, PAM accounts, host groups and containers; the real `ssh` client for
the other door. Screenshots of the watch and join views and of the owner's banner go to
test-artifacts/; axe-core checks the watch page in light and dark."""

from __future__ import annotations

import re

import pytest
from playwright.async_api import expect

from bridge.app import INSTANCE, SSH_DOOR
from helpers import ARTIFACTS, axe_check, containers_gone, goto, log_in
from test_attach import SshClient

pytestmark = pytest.mark.browser


async def type_in(page, text: str) -> None:
    await page.locator(".xterm-helper-textarea").focus()
    await page.keyboard.type(text)
    await page.keyboard.press("Enter")


@pytest.fixture
async def lab(browser, start_gateway, make_user, make_group, tmp_path):
    """A gateway with an admin group and SSH door, a student's page with a running shell, and an
    admin's browser context."""
    group = make_group()
    gateway = await start_gateway(auth={"admin_groups": [group]}, ssh={"listen": "127.0.0.1:0"},
                                  audit={"log": str(tmp_path / "audit.log")})
    student, admin = make_user(), make_user(groups=(group,))
    contexts = []

    async def context_for(user, scheme: str = "light"):
        context = await browser.new_context(color_scheme=scheme, viewport={"width": 1000, "height": 600})
        contexts.append(context)
        page = await context.new_page()
        await log_in(page, gateway, user)
        return page

    owner_page = await context_for(student)
    await expect(owner_page.locator("body")).to_have_attribute("data-state", "running", timeout=30_000)
    await expect(owner_page.locator(".xterm-rows")).to_contain_text("$", timeout=30_000)
    yield gateway, student, admin, owner_page, context_for
    for context in contexts:
        await context.close()


async def test_admin_watches_then_joins_a_students_session(lab):
    gateway, student, admin, owner_page, context_for = lab
    sid = await owner_page.locator("body").get_attribute("data-session")
    await type_in(owner_page, "echo before-$((6*7))")
    await expect(owner_page.locator(".xterm-rows")).to_contain_text("before-42")

    admin_page = await context_for(admin)
    await goto(admin_page, f"{gateway.url}/admin/watch/{sid}")
    rows = admin_page.locator(".xterm-rows")
    await expect(admin_page.locator("#status-conn")).to_have_text("watching", timeout=15_000)
    await expect(rows).to_contain_text("before-42")  # the screen so far, replayed
    # the owner sees who watches: banner and status bar
    banner = owner_page.locator("#banner")
    await expect(banner).to_contain_text(f"{admin.name} watching")
    await expect(owner_page.locator("#status-viewers")).to_have_text(f"{admin.name} watching")
    ARTIFACTS.mkdir(exist_ok=True)
    await owner_page.screenshot(path=str(ARTIFACTS / "watch-owner-banner.png"))

    await type_in(owner_page, "echo live-$((7*7))")
    await expect(rows).to_contain_text("live-49")
    await type_in(admin_page, "echo sneaky-$((2*2))")  # typing in a watch does nothing
    await type_in(owner_page, "echo mine-$((9*9))")
    await expect(rows).to_contain_text("mine-81")
    await expect(owner_page.locator(".xterm-rows")).not_to_contain_text("sneaky")
    await admin_page.screenshot(path=str(ARTIFACTS / "watch-view.png"))

    # join: from the watch view's link; the admin's command runs in the student's shell
    await admin_page.get_by_role("link", name="join").click()
    await expect(admin_page.locator("#status-conn")).to_have_text("joined", timeout=15_000)
    await expect(owner_page.locator("#status-viewers")).to_have_text(f"{admin.name} joined (can type)")
    await type_in(admin_page, "echo helped-$((5*5))")
    await expect(owner_page.locator(".xterm-rows")).to_contain_text("helped-25")
    await expect(rows).to_contain_text("helped-25")
    await admin_page.screenshot(path=str(ARTIFACTS / "join-view.png"))
    await owner_page.screenshot(path=str(ARTIFACTS / "join-owner-banner.png"))

    # the admin leaves: the banner and the status go
    await admin_page.close()
    await expect(banner).to_be_hidden()
    await expect(owner_page.locator("#status-viewers")).to_be_hidden()

    # a student gets 403 on the admin pages
    other = await context_for(student)
    response = await other.goto(f"{gateway.url}/admin/watch/{sid}")
    assert response is not None and response.status == 403
    await type_in(owner_page, "exit")
    await containers_gone(**{"termbridge.session": sid})


@pytest.mark.parametrize("scheme", ["light", "dark"])
async def test_watch_page_passes_axe(lab, scheme):
    gateway, _, admin, owner_page, context_for = lab
    sid = await owner_page.locator("body").get_attribute("data-session")
    admin_page = await context_for(admin, scheme)
    for mode in ("watch", "join"):
        await goto(admin_page, f"{gateway.url}/admin/{mode}/{sid}")
        await expect(admin_page.locator("#status-conn")).to_have_text(re.compile("watching|joined"), timeout=15_000)
        await expect(admin_page.locator("body")).to_have_attribute("data-theme", scheme)
        await axe_check(admin_page, f"{mode}-{scheme}")
    await expect(owner_page.locator("#banner")).to_be_visible()
    await axe_check(owner_page, f"watched-owner-{scheme}")
    await owner_page.locator("#sessions summary").click()
    await expect(owner_page.locator("#sessions-list")).to_contain_text("(this page)")
    await axe_check(owner_page, f"sessions-menu-{scheme}")


async def test_ssh_attach_and_the_page_on_one_session(lab, tmp_path):
    """Type in the page, see it over ssh; type over ssh, take the session back in the page and
    see it there."""
    gateway, student, _, owner_page, _ = lab
    sid = await owner_page.locator("body").get_attribute("data-session")
    await type_in(owner_page, "echo from-web-$((3*3))")
    ssh = await SshClient.start(gateway.app[SSH_DOOR].port, student, known_hosts=tmp_path / "known_hosts")
    try:
        await ssh.expect(rb"from-web-9")
        await expect(owner_page.locator("#ended-reason")).to_contain_text("attached from ssh", timeout=15_000)
        ssh.type("echo from-ssh-$((4*4))\r")
        await ssh.expect(rb"from-ssh-16")
        await owner_page.get_by_role("button", name="Take it back here").click()
        await expect(owner_page.locator("body")).to_have_attribute("data-state", "running", timeout=15_000)
        await expect(owner_page.locator(".xterm-rows")).to_contain_text("from-ssh-16")
        assert await owner_page.locator("body").get_attribute("data-session") == sid
        assert await ssh.wait() == 0
    finally:
        ssh.kill()
    await type_in(owner_page, "exit")
    await containers_gone(**{"termbridge.session": sid})


async def test_the_page_attaches_an_ssh_door_session(lab, tmp_path):
    """The Sessions menu lists the person's SSH-door session; "Attach here" takes it over."""
    gateway, student, _, owner_page, _ = lab
    web_sid = await owner_page.locator("body").get_attribute("data-session")
    ssh = await SshClient.start(gateway.app[SSH_DOOR].port, student, known_hosts=tmp_path / "known_hosts", command=())
    try:
        await ssh.expect(rb"[$#] ")
        ssh.type("echo over-ssh-$((6*6))\r")
        await ssh.expect(rb"over-ssh-36")
        await owner_page.locator("#sessions summary").click()
        attach = owner_page.get_by_role("button", name=re.compile(r"Attach session \w+ \(ssh\) here"))
        await attach.click()
        rows = owner_page.locator(".xterm-rows")
        await expect(rows).to_contain_text("over-ssh-36", timeout=15_000)
        ssh_sid = await owner_page.locator("body").get_attribute("data-session")
        assert ssh_sid != web_sid
        assert await ssh.wait() == 0
        await type_in(owner_page, "echo in-page-$((7*6))")
        await expect(rows).to_contain_text("in-page-42")
        await owner_page.screenshot(path=str(ARTIFACTS / "ssh-session-in-page.png"))
        await type_in(owner_page, "exit")
        await containers_gone(**{"termbridge.session": ssh_sid})
    finally:
        ssh.kill()


async def test_from_the_console_on_one_gateway_to_a_session_another_serves(
    browser, start_gateway, make_user, make_group, redis_url, tmp_path
):
    """Two gateways sharing a Redis store. The admin's console on the second lists the student's
    session, which the first serves. Its Watch link opens the view through the relay: the screen
    so far, then live output, and no keystrokes. The Join link lets the admin's command run in the
    student's shell. The student's page, on the other gateway, shows who is there."""
    group = make_group()
    store = {"url": redis_url, "secret_file": str(tmp_path / "store-key")}
    serving = await start_gateway(store=store, auth={"admin_groups": [group]})
    viewing = await start_gateway(store=store, auth={"admin_groups": [group]})
    student, admin = make_user(), make_user(groups=(group,))
    owner_context = await browser.new_context(viewport={"width": 1000, "height": 600})
    admin_context = await browser.new_context(viewport={"width": 1200, "height": 700})
    try:
        owner_page = await owner_context.new_page()
        await log_in(owner_page, serving, student)
        await expect(owner_page.locator(".xterm-rows")).to_contain_text("$", timeout=30_000)
        sid = await owner_page.locator("body").get_attribute("data-session")
        await type_in(owner_page, "echo before-$((6*7))")
        await expect(owner_page.locator(".xterm-rows")).to_contain_text("before-42")

        admin_page = await admin_context.new_page()
        await log_in(admin_page, viewing, admin)
        await goto(admin_page, f"{viewing.url}/admin")
        row = admin_page.locator(f'#sessions tr[data-session="{sid}"]')
        await expect(row.locator('td[data-col="user"]')).to_have_text(student.name, timeout=15_000)
        await expect(row.locator('td[data-col="gateway"]')).to_have_text(serving.app[INSTANCE])
        await row.get_by_role("link", name=f"Watch {student.name}'s session {sid[:8]}").click()
        rows = admin_page.locator(".xterm-rows")
        await expect(admin_page.locator("#status-conn")).to_have_text("watching", timeout=15_000)
        await expect(rows).to_contain_text("before-42")
        await expect(owner_page.locator("#status-viewers")).to_have_text(f"{admin.name} watching", timeout=15_000)
        await type_in(owner_page, "echo live-$((7*7))")
        await expect(rows).to_contain_text("live-49")
        await type_in(admin_page, "echo sneaky-$((2*2))")
        await type_in(owner_page, "echo mine-$((9*9))")
        await expect(rows).to_contain_text("mine-81")
        await expect(owner_page.locator(".xterm-rows")).not_to_contain_text("sneaky")

        await admin_page.get_by_role("link", name="join").click()
        await expect(admin_page.locator("#status-conn")).to_have_text("joined", timeout=15_000)
        await expect(owner_page.locator("#status-viewers")).to_have_text(f"{admin.name} joined (can type)",
                                                                         timeout=15_000)
        await type_in(admin_page, "echo helped-$((5*5))")
        await expect(owner_page.locator(".xterm-rows")).to_contain_text("helped-25")
        await admin_page.close()
        await expect(owner_page.locator("#status-viewers")).to_be_hidden(timeout=15_000)
        await type_in(owner_page, "exit")
        await containers_gone(**{"termbridge.session": sid})
    finally:
        await owner_context.close()
        await admin_context.close()

"""The terminal page says what is happening while a start takes a while: Debian's Chromium
against a real gateway whose session image (the test image with an entrypoint that sleeps
first, built here under a private tag and removed after) takes seconds to start."""

from __future__ import annotations

import re
import uuid

import pytest
from playwright.async_api import expect

from helpers import ARTIFACTS, TEST_IMAGE, log_in

pytestmark = pytest.mark.browser
SLOW_START = 3  # seconds the entrypoint sleeps before the real one runs


@pytest.fixture
def slow_image(docker_engine, tmp_path):
    """Torn down after the gateway (ask for it first): an image a container uses cannot go."""
    (tmp_path / "slow-entrypoint").write_text(
        f'#!/bin/sh\nsleep {SLOW_START}\nexec /usr/local/sbin/termbridge-entrypoint "$@"\n'
    )
    (tmp_path / "slow-entrypoint").chmod(0o755)  # the classic builder keeps the mode
    (tmp_path / "Dockerfile").write_text(
        f"FROM {TEST_IMAGE}\nCOPY slow-entrypoint /usr/local/sbin/slow-entrypoint\n"
        'ENTRYPOINT ["/usr/local/sbin/slow-entrypoint"]\n'
    )
    tag = f"termbridge/session:conv-slow-{uuid.uuid4().hex[:8]}"
    docker_engine.images.build(path=str(tmp_path), tag=tag, rm=True, forcerm=True)
    yield tag
    docker_engine.images.remove(tag)


async def test_the_page_counts_the_seconds_of_a_slow_start(slow_image, browser, start_gateway, user):
    gateway = await start_gateway(session={"image": slow_image})
    context = await browser.new_context(viewport={"width": 1000, "height": 600})
    page = await context.new_page()
    await log_in(page, gateway, user)
    progress = page.get_by_role("status").filter(has_text="starting your container")
    await expect(progress).to_have_text(re.compile(r"^starting your container… [1-9] s$"), timeout=10_000)
    assert await page.locator("body").get_attribute("data-state") == "connecting"
    await expect(progress).to_have_text(re.compile(r"^starting your container… [2-9] s$"), timeout=5_000)  # it counts
    await page.screenshot(path=str(ARTIFACTS / "ux-starting.png"))
    await expect(page.locator("body")).to_have_attribute("data-state", "running", timeout=30_000)
    await expect(page.locator(".xterm-rows")).to_contain_text("$", timeout=30_000)
    await expect(page.locator("#start-progress")).to_be_hidden()
    await expect(page.locator("#start-progress")).to_have_text("")
    await context.close()


"""
Listen-in on the live page, in a real headless chromium (the fixtures of
tests/test_page.py): the page hears a leg's tone and reports its level,
Stop and closing the tab end the server's listener, and a read token is
refused with a message that names the scope.
"""

from __future__ import annotations

import math
import os
import uuid
from pathlib import Path
from typing import Any

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import LoopingCall

from audiohangup.wire import Kind, encode_frame
from tests import test_page
from tests.conftest import LogCapture, Server, until
from tests.test_page import Browser, leg, live_row

# The page tests' fixtures, shared: a headless chromium, skipped (saying why) without one.
browser, chromium = test_page.browser, test_page.chromium

try:
    from playwright.async_api import expect
except ImportError:  # pragma: no cover - the chromium fixture skips, saying why
    pass

READ = "read-token-0123456789"
LISTEN = "listen-token-0123456789"
SCREENSHOT = Path(__file__).parent.parent / "docs" / "screenshots" / "listen.png"


def tone(frame: int, hertz: float = 440.0, amplitude: int = 12000) -> bytes:
    """20 ms of a sine at 8 kHz, the C{frame}-th of a continuous tone."""
    start = frame * 160
    return b"".join(
        int(amplitude * math.sin(2 * math.pi * hertz * (start + i) / 8000)).to_bytes(2, "little", signed=True)
        for i in range(160)
    )


async def tokens_server(make_server: Any, tmp_path: Path) -> Server:
    path = tmp_path / "tokens"
    path.write_text(f"read {READ}\nlisten {LISTEN}\n")
    os.chmod(path, 0o600)
    server: Server = await make_server(api_tokens_file=str(path))
    return server


def listen_button(call_id: str, role: str | None) -> str:
    if role is None:
        return f'#live tr.call button.listen[data-listen-call="{call_id}"]'
    return f'#live button.listen[data-listen-call="{call_id}"][data-listen-role="{role}"]'


def active(server: Server) -> float:
    return server.service.api.metrics.get_sample_value("audiohangup_listens_active", {}) or 0.0


async def sign_in(browser: Browser, server: Server, token: str) -> Any:
    page = await browser.run(lambda: browser.open(server.url + "/"))
    await browser.run(lambda: page.fill("#token", token))
    await browser.run(lambda: page.press("#token", "Enter"))
    return page


@pytest_twisted.ensureDeferred
async def test_listen_from_the_page(logs: LogCapture, make_server: Any, tmp_path: Path, browser: Browser) -> None:
    """
    With a listen token, a leg's Listen button plays it: the page gets the
    tone and reports a level well above silence, the server has a listener;
    Stop ends it, and so does closing the tab.
    """
    server = await tokens_server(make_server, tmp_path)
    call_id = str(uuid.uuid4())
    visitor = await leg(server, "visitor", call_id)
    resident = await leg(server, "resident", call_id)
    await until(lambda: len(server.registry) == 2, what="two live legs")
    frames = iter(range(1_000_000))
    sending = LoopingCall(lambda: visitor.send(encode_frame(Kind.SLIN, tone(next(frames)))))
    sending.clock = reactor
    sending.start(0.02)
    try:
        page = await sign_in(browser, server, LISTEN)
        button = page.locator(listen_button(call_id, "visitor"))
        await browser.run(lambda: expect(button).to_be_visible())
        await browser.run(lambda: page.locator(listen_button(call_id, None)).wait_for())
        await browser.run(lambda: button.click())
        bar = page.locator("#listen-bar")
        await browser.run(lambda: expect(bar).to_have_attribute("data-state", "listening"))
        await browser.run(lambda: expect(bar).to_contain_text(f"Listening to the visitor leg of call {call_id}"))
        await browser.run(lambda: expect(button).to_have_attribute("aria-pressed", "true"))
        await browser.run(lambda: page.wait_for_function(
            "Number(document.getElementById('listen-bar').dataset.level) > -30"
        ))
        level = float(await browser.run(lambda: bar.get_attribute("data-level")))
        received = int(await browser.run(lambda: bar.get_attribute("data-bytes")))
        assert -30 < level <= 0 and received >= 320, (level, received)
        assert active(server) == 1
        await browser.run(lambda: expect(bar).to_contain_text("visitor -"))
        if os.environ.get("AUDIOHANGUP_SCREENSHOTS"):  # docs/screenshots/listen.png, made on purpose only
            await browser.run(lambda: page.set_viewport_size({"width": 1280, "height": 640}))  # as docs/screenshots.py
            await browser.run(lambda: page.screenshot(path=str(SCREENSHOT)))

        await browser.run(lambda: page.click("#listen-bar button.listen-stop"))
        await until(lambda: active(server) == 0, what="the server's listener to end on Stop")
        await browser.run(lambda: expect(bar).to_have_attribute("data-state", "ended"))
        await browser.run(lambda: expect(button).to_have_attribute("aria-pressed", "false"))
        [visitor_leg] = [one for one in server.registry.call(call_id) if one.role == "visitor"]
        assert visitor_leg.taps == [] and visitor_leg.live

        # The whole call, then the tab closes.
        await browser.run(lambda: page.click(listen_button(call_id, None)))
        await browser.run(lambda: expect(bar).to_contain_text("both parties"))
        await until(lambda: active(server) == 1, what="a listener of the call")
        await browser.run(lambda: page.close())
        await until(lambda: active(server) == 0, what="the server's listener to end with the tab")
        assert all(not one.taps for one in server.registry.call(call_id))
        metrics = server.service.api.metrics
        # Stop closes cleanly; a closed tab may send its close frame or just drop the connection.
        closed = metrics.get_sample_value("audiohangup_listens_total", {"result": "closed"}) or 0
        failed = metrics.get_sample_value("audiohangup_listens_total", {"result": "failed"}) or 0
        assert closed >= 1 and closed + failed == 2, (closed, failed)
        assert len(server.registry) == 2  # the call goes on
    finally:
        sending.stop()
    visitor.close()
    resident.close()
    await until(lambda: len(server.registry) == 0, what="the legs to end")


@pytest_twisted.ensureDeferred
async def test_listen_needs_the_scope(logs: LogCapture, make_server: Any, tmp_path: Path, browser: Browser) -> None:
    """A read token shows the calls, but Listen is refused, and the page says why."""
    server = await tokens_server(make_server, tmp_path)
    call_id = str(uuid.uuid4())
    visitor = await leg(server, "visitor", call_id)
    await until(lambda: len(server.registry) == 1, what="the live leg")
    page = await sign_in(browser, server, READ)
    await browser.run(lambda: expect(page.locator(live_row(call_id, "visitor"))).to_be_visible())
    await browser.run(lambda: page.click(listen_button(call_id, "visitor")))
    bar = page.locator("#listen-bar")
    await browser.run(lambda: expect(bar).to_have_attribute("data-state", "refused"))
    await browser.run(lambda: expect(bar).to_contain_text("it needs the listen scope (or control)"))
    await browser.run(lambda: expect(bar).to_contain_text("read scope"))
    metrics = server.service.api.metrics
    assert metrics.get_sample_value("audiohangup_listens_total", {"result": "refused"}) == 1
    assert active(server) == 0
    visitor.close()
    await until(lambda: len(server.registry) == 0, what="the leg to end")

"""
The live calls page in a real headless browser: the system's chromium, driven
by Playwright for Python, against a real server with fake Asterisk legs.

Playwright's asyncio API runs on an event loop of its own, in a thread of its
own, so the reactor keeps serving the page, the API and the AudioSocket legs
while the browser works. Each browser step is handed to that loop by
L{Browser.run} and awaited on the reactor as a Deferred, so a test reads as
one sequence: the browser clicks, the fake Asterisk receives C{00 00 00}, the
browser sees the leg in the ended list.
"""

from __future__ import annotations

import asyncio
import math
import os
import re
import shutil
import struct
import threading
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Future
from typing import Any, TypeVar

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure

from audiohangup.wire import Kind, encode_frame
from tests.conftest import LogCapture, Server, until
from tests.fake_asterisk import SILENCE_20MS, FakeAsterisk, connect
from tests.ws_app import App

try:
    from playwright.async_api import Page, async_playwright, expect
except ImportError:  # pragma: no cover - depends on the machine
    async_playwright = None
else:
    expect.set_options(timeout=10_000)

T = TypeVar("T")

SCREENSHOT = "/tmp/audiohangup-page.png"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    # A name of "another site" that resolves to loopback, as a DNS rebinding would make it.
    "--host-resolver-rules=MAP rebound.test 127.0.0.1",
]
TOKEN = "t0ken"


def find_chromium() -> str | None:
    if os.access("/usr/bin/chromium", os.X_OK):
        return "/usr/bin/chromium"
    return shutil.which("chromium")


class Browser:
    """A headless chromium on a Playwright event loop in its own thread."""

    def __init__(self, executable: str) -> None:
        self.executable = executable
        #: Uncaught JavaScript errors of every page opened: there must be none.
        self.page_errors: list[str] = []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._serve, name="playwright", daemon=True)
        self.thread.start()
        self._playwright: Any = None
        self._browser: Any = None

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, step: Callable[[], Awaitable[T]]) -> Deferred[T]:
        """Run C{step()} on the browser's loop; the Deferred fires on the reactor."""

        async def call() -> T:
            return await step()

        result: Deferred[T] = Deferred()

        def fire(future: Future[T]) -> None:
            if future.cancelled():
                result.errback(Failure(asyncio.CancelledError("browser step cancelled")))
            elif future.exception() is not None:
                result.errback(Failure(future.exception()))
            else:
                result.callback(future.result())

        future = asyncio.run_coroutine_threadsafe(call(), self.loop)
        future.add_done_callback(lambda done: reactor.callFromThread(fire, done))
        return result

    async def _launch(self) -> None:
        self._playwright = await async_playwright().start()
        self._browser = await self._playwright.chromium.launch(
            executable_path=self.executable, headless=True, args=CHROMIUM_ARGS
        )

    async def open(self, url: str) -> Page:
        """A fresh page (its own sessionStorage) showing C{url}; call through L{run}."""
        context = await self._browser.new_context(viewport={"width": 1100, "height": 640})
        page = await context.new_page()
        page.set_default_timeout(10_000)
        page.on("pageerror", lambda error: self.page_errors.append(str(error)))
        await page.goto(url)
        return page

    async def _close(self) -> None:
        if self._browser is not None:
            await self._browser.close()
        if self._playwright is not None:
            await self._playwright.stop()

    async def start(self) -> None:
        await self.run(self._launch)

    async def stop(self) -> None:
        try:
            await self.run(self._close)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()


@pytest.fixture
def chromium() -> str:
    """The browser's path; the page tests are skipped, saying why, without one."""
    if async_playwright is None:
        pytest.skip("Playwright for Python is not installed (python -m pip install playwright)")
    executable = find_chromium()
    if executable is None:
        pytest.skip("no chromium browser: /usr/bin/chromium is missing and chromium is not on PATH "
                    "(.ci/run installs it with apt-get install chromium)")
    return executable


@pytest_twisted.async_yield_fixture
async def browser(make_server: Any, chromium: str) -> AsyncIterator[Browser]:
    # Depends on make_server so that the browser closes before the server stops.
    driver = Browser(chromium)
    try:
        await driver.start()
        yield driver
    finally:
        await driver.stop()
    assert driver.page_errors == []


def live_row(call_id: str, role: str) -> str:
    return f'#live tr.leg[data-call-id="{call_id}"][data-role="{role}"]'


def ended_row(call_id: str, role: str, reason: str) -> str:
    return f'#ended tr[data-call-id="{call_id}"][data-role="{role}"][data-reason="{reason}"]'


def leg_button(call_id: str, role: str) -> str:
    return f'#live button[data-call-id="{call_id}"][data-role="{role}"]'


def call_button(call_id: str) -> str:
    return f'#live tr.call button[data-call-id="{call_id}"]'


async def leg(server: Server, role: str, call_id: str) -> FakeAsterisk:
    fake = await connect(server.port(role), on_hangup="close")
    fake.send_uuid(uuid.UUID(call_id))
    return fake


@pytest_twisted.ensureDeferred
async def test_hang_up_from_the_page(logs: LogCapture, make_server: Any, browser: Browser) -> None:
    """
    The page lists the live legs per call; a leg's button ends that leg
    (Asterisk gets C{00 00 00}, closes, the leg shows up as ended with
    C{hangup_clean}), the call's button ends every leg of the other call.
    """
    server = await make_server()
    call_id, other_id = str(uuid.uuid4()), str(uuid.uuid4())
    fake = await leg(server, "visitor", call_id)
    others = [await leg(server, "visitor", other_id), await leg(server, "resident", other_id)]
    for digit in b"42#":
        others[1].send(encode_frame(Kind.DTMF, bytes([digit])))
    for _ in range(5):
        others[0].send(SILENCE_20MS)
    await until(lambda: len(server.registry) == 3, what="three live legs")

    page = await browser.run(lambda: browser.open(server.url + "/"))
    row = page.locator(live_row(call_id, "visitor"))
    await browser.run(lambda: expect(row).to_be_visible())
    await browser.run(lambda: expect(row.locator("td.state")).to_have_text("live"))
    await browser.run(lambda: expect(page.locator(live_row(other_id, "resident")).locator("td.dtmf")).to_have_text("42#"))
    [frames_in] = [leg.frames_in for leg in server.registry.call(other_id) if leg.role == "visitor"]
    assert frames_in >= 5  # the audio sent above, and no more arrives
    frames = page.locator(live_row(other_id, "visitor")).locator("td.frames")
    await browser.run(lambda: expect(frames).to_have_text(re.compile(rf"^{frames_in} / [1-9][0-9]*$")))
    # A leg's live streams show in its row.
    app = await App().listen()
    try:
        response = await treq.post(
            f"{server.url}/calls/{call_id}/streams", json={"url": app.url(), "mode": "listen"}, persistent=False
        )
        assert response.code == 201, await response.text()
        streams = page.locator(live_row(call_id, "visitor")).locator("td.streams")
        await browser.run(lambda: expect(streams).to_have_text("twilio listen (streaming)"))
    finally:
        await app.close()
    label = await browser.run(lambda: page.get_attribute(leg_button(call_id, "visitor"), "aria-label"))
    assert label == f"Hang up the visitor leg of call {call_id}"

    await browser.run(lambda: page.click(leg_button(call_id, "visitor")))
    await until(lambda: fake.got_hangup, what="00 00 00 at the fake Asterisk")
    await until(lambda: fake.closed.called, what="the leg to close")
    assert fake.ended_with_single_hangup()

    ended = page.locator(ended_row(call_id, "visitor", "hangup_clean"))
    await browser.run(lambda: expect(ended).to_be_visible())
    await browser.run(lambda: expect(ended.locator("td.cause")).to_have_text("api"))
    await browser.run(lambda: expect(row).to_have_count(0))
    assert [str(event["reason"]) for event in logs.ended(call_id)] == ["hangup_clean"]
    # The other call is untouched, and still on the page.
    assert not any(other.got_hangup for other in others)
    await browser.run(lambda: expect(page.locator(live_row(other_id, "visitor"))).to_be_visible())
    await browser.run(lambda: expect(page.locator("#status")).to_contain_text("1 call, 2 legs"))
    await browser.run(lambda: page.screenshot(path=SCREENSHOT, full_page=True))

    await browser.run(lambda: page.click(call_button(other_id)))
    for other in others:
        await until(lambda other=other: other.closed.called, what="the other call's legs to close")
        assert other.ended_with_single_hangup()
    for role in ("visitor", "resident"):
        ended = page.locator(ended_row(other_id, role, "hangup_clean"))
        await browser.run(lambda ended=ended: expect(ended).to_be_visible())
    await browser.run(lambda: expect(page.locator("#live tbody")).to_have_count(0))
    await browser.run(lambda: expect(page.locator("#live-empty")).to_be_visible())


@pytest_twisted.ensureDeferred
async def test_page_asks_for_the_token(logs: LogCapture, make_server: Any, browser: Browser) -> None:
    """With --api-token the page asks for it, keeps it for the tab, and can forget it."""
    server = await make_server(api_token=TOKEN)
    call_id = str(uuid.uuid4())
    fake = await leg(server, "visitor", call_id)
    await until(lambda: len(server.registry) == 1, what="the live leg")

    page = await browser.run(lambda: browser.open(server.url + "/"))
    form, row = page.locator("#token-form"), page.locator(live_row(call_id, "visitor"))
    await browser.run(lambda: expect(form).to_be_visible())
    await browser.run(lambda: expect(page.locator("#message")).to_have_text("The API needs a token."))
    await browser.run(lambda: expect(row).to_have_count(0))

    await browser.run(lambda: page.fill("#token", "not-the-token"))
    await browser.run(lambda: page.press("#token", "Enter"))
    await browser.run(lambda: expect(page.locator("#message")).to_contain_text("did not accept"))
    await browser.run(lambda: expect(form).to_be_visible())

    await browser.run(lambda: page.fill("#token", TOKEN))
    await browser.run(lambda: page.press("#token", "Enter"))
    await browser.run(lambda: expect(row).to_be_visible())
    await browser.run(lambda: expect(form).to_be_hidden())

    # The token lasts as long as the tab: a reload needs no new one.
    await browser.run(lambda: page.reload())
    await browser.run(lambda: expect(row).to_be_visible())
    await browser.run(lambda: expect(form).to_be_hidden())

    # The POST carries it too.
    await browser.run(lambda: page.click(leg_button(call_id, "visitor")))
    await until(lambda: fake.closed.called, what="the leg to close")
    assert fake.ended_with_single_hangup()
    await browser.run(lambda: expect(page.locator(ended_row(call_id, "visitor", "hangup_clean"))).to_be_visible())

    await browser.run(lambda: page.click("#forget-token"))
    await browser.run(lambda: expect(form).to_be_visible())
    await browser.run(lambda: expect(page.locator("#forget-token")).to_be_hidden())


ATTACK_PAGE = """<!doctype html><title>another site</title>
<form id="form" method="post" enctype="text/plain" action="{api}/calls/{call_id}/hangup"></form>
<script>
fetch("{api}/calls/{call_id}/hangup?role=visitor", {{method: "POST", mode: "no-cors"}})
  .finally(() => document.getElementById("form").submit());
</script>"""


@pytest_twisted.ensureDeferred
async def test_other_sites_cannot_use_a_loopback_api(logs: LogCapture, make_server: Any, browser: Browser) -> None:
    """
    The tokenless loopback default, in a real browser: a page of another site
    (another port) POSTs to hang a call up, without a body as a no-cors fetch
    and as an empty text/plain form; a page on a name rebound to 127.0.0.1
    reads the calls. Both are refused, and the call goes on.
    """
    from twisted.internet.endpoints import TCP4ServerEndpoint
    from twisted.web.resource import Resource
    from twisted.web.server import Site
    from twisted.web.static import Data

    server = await make_server()
    call_id = str(uuid.uuid4())
    fake = await leg(server, "visitor", call_id)
    await until(lambda: len(server.registry) == 1, what="the live leg")
    api_port = server.service.getServiceNamed("http").port.getHost().port
    page_html = ATTACK_PAGE.format(api=server.url, call_id=call_id).encode()
    root = Resource()
    root.putChild(b"", Data(page_html, "text/html"))
    attacker = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Site(root))
    try:
        metrics = server.service.api.metrics
        route = "/calls/<string:call_id>/hangup"

        def answered(status: str) -> float:
            return metrics.get_sample_value(
                "audiohangup_http_requests_total", {"route": route, "method": "POST", "status": status}
            ) or 0.0

        await browser.run(lambda: browser.open(f"http://127.0.0.1:{attacker.getHost().port}/"))
        await until(lambda: sum(map(answered, ("200", "403", "404"))) >= 2, timeout=10, what="both POSTs to arrive")
        assert (answered("403"), answered("200")) == (2, 0)
        assert len(server.registry) == 1 and not fake.closed.called

        rebound = await browser.run(lambda: browser.open(f"http://rebound.test:{api_port}/"))
        text = await browser.run(lambda: rebound.evaluate("fetch('/calls').then(r => r.status + ' ' + r.text())"))
        read = await browser.run(lambda: rebound.evaluate("fetch('/calls').then(r => r.text())"))
        assert text.startswith("421") and "bad_host" in read and call_id not in read, (text, read)
    finally:
        await attacker.stopListening()
    fake.close()
    await until(lambda: len(server.registry) == 0, what="the leg to end")


def tone_frame(amplitude: float = 0.3, hertz: float = 440.0) -> bytes:
    """One 20 ms slin frame of a sine at C{amplitude} of full scale (about -13 dBFS at 0.3)."""
    samples = (round(amplitude * 32767 * math.sin(2 * math.pi * hertz * n / 8000)) for n in range(160))
    return encode_frame(Kind.SLIN, b"".join(struct.pack("<h", sample) for sample in samples))


def dbfs_of(page: Page, call_id: str, role: str, direction: str) -> Awaitable[float | None]:
    """The level a leg's meter shows (its data-dbfs), None before any."""
    return page.evaluate(
        "([call, role, direction]) => { const m = document.querySelector("
        "`#live tr.leg[data-call-id=\"${call}\"][data-role=\"${role}\"] meter.level.${direction}`);"
        " return m && m.dataset.dbfs !== '' ? Number(m.dataset.dbfs) : null; }",
        [call_id, role, direction],
    )


@pytest_twisted.ensureDeferred
async def test_levels_show_who_talks(logs: LogCapture, make_server: Any, browser: Browser) -> None:
    """
    A visitor sending a tone and a resident sending digital silence, bridged:
    the visitor's meter in reads the tone's level (about -13 dBFS) and says
    it is speaking, the resident's reads the floor, and what the resident is
    sent (its meter out) is the tone. The same numbers are in GET /calls.
    """
    server = await make_server()
    call_id = str(uuid.uuid4())
    talker, quiet = await leg(server, "visitor", call_id), await leg(server, "resident", call_id)
    loud = tone_frame()

    def send() -> None:
        talker.send(loud)
        quiet.send(SILENCE_20MS)

    sending = LoopingCall(send)
    sending.start(0.02)
    try:
        await until(lambda: len(server.registry) == 2, what="two live legs")
        page = await browser.run(lambda: browser.open(server.url + "/"))
        await browser.run(lambda: page.wait_for_function(
            "() => { const m = document.querySelector('#live tr.leg[data-role=\"visitor\"] meter.level.in');"
            " return m && m.dataset.dbfs !== '' && Number(m.dataset.dbfs) > -20; }"
        ))
        talking = await browser.run(lambda: dbfs_of(page, call_id, "visitor", "in"))
        silent = await browser.run(lambda: dbfs_of(page, call_id, "resident", "in"))
        heard = await browser.run(lambda: dbfs_of(page, call_id, "resident", "out"))
        assert talking is not None and -15 < talking < -11, talking
        assert silent is not None and silent <= -80, silent
        assert heard is not None and -15 < heard < -11, heard
        voice = page.locator(live_row(call_id, "visitor")).locator("td.levels .voice")
        await browser.run(lambda: expect(voice).to_have_text("speaking"))
        quiet_voice = page.locator(live_row(call_id, "resident")).locator("td.levels .voice")
        await browser.run(lambda: expect(quiet_voice).to_have_text("no voice yet"))
        response = await treq.get(f"{server.url}/calls/{call_id}", persistent=False)
        legs = {entry["role"]: entry for entry in (await response.json())["legs"]}
        assert legs["visitor"]["level_in_dbfs"] > -20 and legs["visitor"]["voice_at"] is not None
        assert legs["resident"]["level_in_dbfs"] <= -80 and legs["resident"]["voice_at"] is None
    finally:
        sending.stop()


@pytest_twisted.ensureDeferred
async def test_recordings_view_plays_a_recording(
    logs: LogCapture, make_server: Any, browser: Browser, tmp_path: Any
) -> None:
    """
    A call recorded in the test is listed once it ended (call, duration,
    size), found by its call id; Play fetches it with the token and the
    player's source answers audio/wav.
    """
    server = await make_server(api_token=TOKEN, record_every_call=True, record_dir=str(tmp_path / "rec"))
    call_id, other_id = str(uuid.uuid4()), str(uuid.uuid4())
    for each in (call_id, other_id):
        fake = await leg(server, "visitor", each)
        for _ in range(50):  # a second of audio
            fake.send(tone_frame())
        await until(lambda: len(server.registry) == 1, what="the live leg")
        fake.close()
        await until(lambda: len(server.registry) == 0, what="the leg to end")
        await until(lambda: not server.service.recorder.active, what="the recording to finish")

    page = await browser.run(lambda: browser.open(server.url + "/"))
    await browser.run(lambda: page.fill("#token", TOKEN))
    await browser.run(lambda: page.press("#token", "Enter"))
    rows = page.locator("#recordings-body tr")
    await browser.run(lambda: expect(rows).to_have_count(2))
    await browser.run(lambda: page.fill("#recordings-call", call_id.upper()))
    await browser.run(lambda: page.press("#recordings-call", "Enter"))
    await browser.run(lambda: expect(rows).to_have_count(1))
    row = page.locator(f'#recordings-body tr[data-call-id="{call_id}"]')
    await browser.run(lambda: expect(row.locator("td.size")).to_have_text(re.compile(r"^[0-9.]+ kB$")))
    await browser.run(lambda: expect(row.locator("td.seconds")).to_have_text(re.compile(r"^[0-9.]+ s$")))

    async def play() -> tuple[int, str | None, int]:
        async with page.expect_response(lambda answer: answer.url.endswith(f"/calls/{call_id}/recording")) as info:
            await row.locator("button.play").click()
        answer = await info.value
        return answer.status, await answer.header_value("content-type"), len(await answer.body())

    status, content_type, size = await browser.run(play)
    assert (status, content_type) == (200, "audio/wav") and size > 44
    player = page.locator("#player")
    await browser.run(lambda: expect(player).to_have_attribute("data-call-id", call_id))
    source = await browser.run(lambda: player.get_attribute("src"))
    assert source is not None and source.startswith("blob:")
    # Chromium read the WAV from that source (the CSP let it): it knows how long it is.
    await browser.run(lambda: page.wait_for_function("() => document.getElementById('player').duration > 0"))
    # The route it came from answers audio/wav itself, to the token.
    response = await treq.get(
        f"{server.url}/calls/{call_id}/recording", headers={"Authorization": f"Bearer {TOKEN}"}, persistent=False
    )
    assert response.code == 200 and response.headers.getRawHeaders("content-type") == ["audio/wav"]
    assert len(await response.content()) == size


@pytest_twisted.ensureDeferred
async def test_charts_show_the_hour(logs: LogCapture, make_server: Any, browser: Browser) -> None:
    """
    Legs started and ended in the test are drawn in the current minute, the
    ended ones under their close reason: two hung up through the API
    (hangup_clean), one closed by its peer (peer_closed).
    """
    server = await make_server()
    call_id, other_id = str(uuid.uuid4()), str(uuid.uuid4())
    fakes = [await leg(server, "visitor", call_id), await leg(server, "resident", call_id)]
    other = await leg(server, "visitor", other_id)
    await until(lambda: len(server.registry) == 3, what="three live legs")
    response = await treq.post(f"{server.url}/calls/{call_id}/hangup", persistent=False)
    assert response.code == 200
    for fake in fakes:
        await until(lambda fake=fake: fake.closed.called, what="the call's legs to close")
    other.close()
    await until(lambda: len(server.registry) == 0, what="every leg to end")
    hour = await (await treq.get(f"{server.url}/stats/hour", persistent=False)).json()
    # The test's minute, and the one before should a minute have turned while it ran.
    recent = hour["minutes"][-2:]
    expected = {
        ("chart-started", "started"): 3, ("chart-ended", "hangup_clean"): 2, ("chart-ended", "peer_closed"): 1,
    }
    for (_chart, series), total in expected.items():
        key = "legs_started" if series == "started" else "legs_ended"
        counts = [m[key] if series == "started" else m[key].get(series, 0) for m in recent]
        assert sum(counts) == total, (series, recent)
    assert all(not m["legs_started"] and not m["legs_ended"] for m in hour["minutes"][:-2])

    page = await browser.run(lambda: browser.open(server.url + "/"))

    def bar(chart: str, series: str, start: str) -> str:
        return f'#{chart} rect.bar[data-minute="{start}"][data-series="{series}"]'

    for (chart, series), _ in expected.items():
        for minute in recent:
            count = minute["legs_started"] if series == "started" else minute["legs_ended"].get(series, 0)
            drawn = page.locator(bar(chart, series, minute["start"]))
            if count:
                await browser.run(lambda drawn=drawn, count=count: expect(drawn).to_have_attribute("data-count", str(count)))
            else:
                await browser.run(lambda drawn=drawn: expect(drawn).to_have_count(0))
    # The minutes before saw nothing of it: the bars are all in the test's minutes.
    drawn_minutes = await browser.run(lambda: page.eval_on_selector_all(
        "#chart-ended rect.bar, #chart-started rect.bar", "bars => [...new Set(bars.map(b => b.dataset.minute))]"
    ))
    assert set(drawn_minutes) <= {minute["start"] for minute in recent}, drawn_minutes
    legend = page.locator("#chart-ended .legend")
    await browser.run(lambda: expect(legend).to_contain_text("ended: hangup_clean"))
    await browser.run(lambda: expect(page.locator("#chart-live circle.dot[data-series=\"live_legs\"]")).not_to_have_count(0))

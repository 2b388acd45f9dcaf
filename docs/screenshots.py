#!/usr/bin/env python3
"""
The live page's screenshots in docs/screenshots/, made again from scratch.

Starts an audiohangup service in this process (loopback ports the kernel
picks, records and recordings in a temporary directory, every call
recorded), plays a few calls into it as Asterisk would (20 ms slin frames: a
voice-like tone that comes and goes, a quiet line, digital silence), ends
some so that the recordings view has files, and photographs the page in the
system's headless chromium through Playwright:

- ``live.png``: the live calls with their level meters;
- ``hour.png``: the last hour's charts. A server started a minute ago has
  one minute to show, so the charts are given an hour of made-up traffic
  (legs, reasons, close times, failures; seeded, so the same every run),
  through the same buckets the server keeps (``audiohangup.hour.Hour``);
- ``recordings.png``: the recordings view, a recording loaded in the player;
- ``phone.png``: the whole page at a phone's width.

Run from the repository root (needs chromium and ``playwright``, as the page
tests do)::

    python docs/screenshots.py
    python docs/screenshots.py --out /tmp/shots --chromium /usr/bin/chromium
"""

from __future__ import annotations

import argparse
import math
import os
import random
import shutil
import struct
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from twisted.internet import reactor, task
from twisted.internet.defer import ensureDeferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.threads import deferToThread

from audiohangup.hour import Hour, Readings
from audiohangup.reasons import CloseReason, Role
from audiohangup.service import Config, build_service
from audiohangup.wire import FrameDecoder, Kind, encode_frame, encode_uuid

LOOPBACK = "tcp:0:interface=127.0.0.1"


def frame(amplitude: float, hertz: float, phase: int) -> bytes:
    """20 ms of a sine at C{amplitude} of full scale, plus a little noise (seeded)."""
    noise = random.Random(phase)
    samples = (
        round(amplitude * 32767 * math.sin(2 * math.pi * hertz * (phase * 160 + n) / 8000)) + noise.randint(-40, 40)
        for n in range(160)
    )
    return encode_frame(Kind.SLIN, b"".join(struct.pack("<h", max(-32768, min(32767, s))) for s in samples))


class Leg(Protocol):
    """One AudioSocket leg as Asterisk drives it: its UUID, then a frame every 20 ms."""

    def __init__(self, call_id: uuid.UUID, voice: str) -> None:
        self.call_id = call_id
        self.voice = voice  # "talk" (comes and goes), "quiet" (line noise), "silent"
        self.count = 0
        self.loop = task.LoopingCall(self.tick)
        self.decoder = FrameDecoder()

    def connectionMade(self) -> None:
        self.transport.write(encode_uuid(self.call_id))
        self.loop.start(0.02)

    def tick(self) -> None:
        self.count += 1
        if self.voice == "talk":
            amplitude = 0.25 * max(0.0, math.sin(self.count / 40)) + 0.002
        elif self.voice == "quiet":
            amplitude = 0.003
        else:
            amplitude = 0.0
        self.transport.write(frame(amplitude, 300 + 20 * (self.count % 7), self.count))

    def dataReceived(self, data: bytes) -> None:
        if any(frame.kind == Kind.HANGUP for frame in self.decoder.feed(data)):
            self.stop()  # as Asterisk does

    def stop(self) -> None:
        if self.loop.running:
            self.loop.stop()
        self.transport.loseConnection()

    def connectionLost(self, reason: Any = None) -> None:
        if self.loop.running:
            self.loop.stop()


async def leg(port: int, call_id: uuid.UUID, voice: str) -> Leg:
    protocol = Leg(call_id, voice)
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), protocol)
    return protocol


def made_up_hour(now: float) -> Hour:
    """An hour of traffic, seeded: a busy spell, a few resets, a stream and webhook failure or two."""
    clock = task.Clock()
    clock.advance(now - 3600)
    rng = random.Random(24)
    live = [0]
    streams = [0, 0.0, 0.0]
    hour = Hour(clock, lambda: live[0], lambda: Readings(streams[0], streams[1], streams[2]), seed=24)

    class Ended:
        def __init__(self, reason: CloseReason, ms: float | None) -> None:
            self.close_reason, self.hangup_to_close_ms = reason, ms
            self.call_id, self.role = "made-up", Role.VISITOR

    for minute in range(60):
        busy = 6 + 10 * math.exp(-(((minute - 38) / 9) ** 2))
        for _ in range(rng.randint(int(busy) - 3, int(busy) + 3)):
            clock.advance(0.01)
            live[0] += 1
            hour.legStarted(Ended(CloseReason.HANGUP_CLEAN, None))  # type: ignore[arg-type]
        ends = rng.randint(max(0, int(busy) - 4), int(busy) + 2)
        for _ in range(min(ends, live[0])):
            roll = rng.random()
            reason = (
                CloseReason.HANGUP_CLEAN if roll < 0.55 else CloseReason.PEER_HANGUP if roll < 0.85
                else CloseReason.HANGUP_RESET if roll < 0.95 else CloseReason.PEER_RESET
            )
            ms = rng.lognormvariate(1.2, 0.5) if reason is CloseReason.HANGUP_CLEAN else None
            if 40 <= minute <= 42 and ms is not None:
                ms *= 8  # a slow spell
            hour.legEnded(Ended(reason, ms))  # type: ignore[arg-type]
            live[0] -= 1
        streams[0] = max(0, int(live[0] / 3) + rng.randint(-1, 1))
        if minute in (41, 42):
            streams[1] += rng.randint(1, 3)
        if minute == 47:
            streams[2] += 2
        hour.sample()
        clock.advance(60 - (clock.seconds() % 60) + 1)
    clock.advance(now - clock.seconds())
    return hour


def photograph(url: str, out: Path, chromium: str) -> None:
    """The browser's part, on a thread of its own (Playwright's sync API) while the reactor serves."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 800}, device_scale_factor=1)
        page.goto(url)
        page.wait_for_function(
            "() => [...document.querySelectorAll('meter.level.in')].some(m => Number(m.dataset.dbfs) > -25)"
        )
        page.wait_for_selector("#charts figure")
        page.wait_for_selector("#recordings-body tr")
        page.wait_for_timeout(600)  # one more refresh, so every meter has moved
        page.locator("main > section").first.screenshot(path=str(out / "live.png"))
        page.locator("#hour").screenshot(path=str(out / "hour.png"))
        page.locator("#recordings-body tr button.play").first.click()
        page.wait_for_function("() => document.getElementById('player').duration > 0")
        page.evaluate("() => document.getElementById('player').pause()")
        page.locator("#recordings").screenshot(path=str(out / "recordings.png"))
        phone = browser.new_page(viewport={"width": 390, "height": 844}, device_scale_factor=2)
        phone.goto(url)
        phone.wait_for_selector("#charts figure")
        phone.wait_for_function("() => document.querySelectorAll('#live meter.level').length > 0")
        phone.wait_for_timeout(600)
        phone.screenshot(path=str(out / "phone.png"), full_page=True)
        browser.close()


async def main(out: Path, chromium: str) -> None:
    work = Path(tempfile.mkdtemp(prefix="audiohangup-shots-"))
    config = Config(
        visitor=LOOPBACK, resident=LOOPBACK, http=LOOPBACK, records=str(work / "records.sqlite3"),
        record_every_call=True, record_dir=str(work / "recordings"),
    )
    service = build_service(config, reactor)
    service.privilegedStartService()
    service.startService()
    legs: list[Leg] = []
    try:
        port = {role: service.getServiceNamed(f"audiosocket-{role}").port.getHost().port for role in ("visitor", "resident")}
        url = f"http://127.0.0.1:{service.getServiceNamed('http').port.getHost().port}/"
        # A few calls that end: the recordings view's files, the ended list's rows.
        for number in range(3):
            call_id = uuid.UUID(int=random.Random(number).getrandbits(128), version=4)
            ended = [await leg(port["visitor"], call_id, "talk"), await leg(port["resident"], call_id, "quiet")]
            await task.deferLater(reactor, 1.0 + number, lambda: None)
            ended[number % 2].stop()
            await task.deferLater(reactor, 0.3, lambda: None)
            for each in ended:
                each.stop()
        await task.deferLater(reactor, 0.5, lambda: None)
        # The live calls: one talking to a quiet line, one quiet both ways, one silent and alone.
        for number, voices in enumerate((("talk", "quiet"), ("quiet", "talk"), ("silent",))):
            call_id = uuid.UUID(int=random.Random(100 + number).getrandbits(128), version=4)
            for role, voice in zip(("visitor", "resident"), voices):
                legs.append(await leg(port[role], call_id, voice))
        service.api.hour = made_up_hour(reactor.seconds())
        await deferToThread(photograph, url, out, chromium)
    finally:
        for each in legs:
            each.stop()
        await service.stopService()
        shutil.rmtree(work, ignore_errors=True)


def run() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "screenshots"))
    parser.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    options = parser.parse_args()
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    failed: list[BaseException] = []

    def done(result: Any) -> None:
        if isinstance(result, BaseException) or hasattr(result, "value"):
            failed.append(getattr(result, "value", result))
        reactor.stop()

    reactor.callWhenRunning(lambda: ensureDeferred(main(out, options.chromium)).addBoth(done))
    reactor.run()
    if failed:
        raise SystemExit(f"screenshots failed: {failed[0]!r}")
    for name in sorted(os.listdir(out)):
        print(out / name)


if __name__ == "__main__":
    run()

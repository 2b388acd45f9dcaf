"""
One timeline per leg, over real loopback: fake Asterisk legs, a real
WebSocket app (tests/ws_app.py) in converse mode, and the server in-process
or as a twistd child. Frames are counted as they arrive at the fake Asterisk,
over windows of seconds; a tick the machine ran late is a slot whose audio
the server drops by design, so those slots (the pacer counts them) stand in
for their frames in a rate.
"""

from __future__ import annotations

import signal
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.task import LoopingCall, deferLater

from audiohangup.reasons import Role
from audiohangup.streams.manager import StreamConfig
from audiohangup.wire import Frame, Kind, encode_frame
from tests.conftest import LogCapture, Server, until
from tests.fake_asterisk import FakeAsterisk
from tests.twistd_child import Spawn, start_server
from tests.ws_app import App, Connection

RATE = 8000
SAMPLES = 160  # a 20 ms frame of slin 8 kHz


def tone(frequency: float, n: int, amplitude: int = 6000) -> bytes:
    """Frame C{n} of a continuous sine: slin, little-endian."""
    t = (n * SAMPLES + np.arange(SAMPLES)) / RATE
    return (amplitude * np.sin(2 * np.pi * frequency * t)).astype("<i2").tobytes()


def numbered(n: int) -> bytes:
    """A frame whose every sample is C{n}: the app's frames, told apart at the leg."""
    return n.to_bytes(2, "little", signed=True) * SAMPLES


class Timed(FakeAsterisk):
    """A fake Asterisk leg that notes when each audio frame arrives."""

    def __init__(self) -> None:
        super().__init__(on_hangup="close")
        self.arrivals: list[tuple[float, bytes]] = []
        self.call_id: uuid.UUID | None = None

    def frameReceived(self, frame: Frame) -> None:
        super().frameReceived(frame)
        if frame.kind == Kind.SLIN:
            self.arrivals.append((reactor.seconds(), frame.payload))

    def between(self, start: float, end: float) -> list[tuple[float, bytes]]:
        return [(at, payload) for at, payload in self.arrivals if start <= at < end]


async def timed(port: int, call_id: uuid.UUID) -> Timed:
    leg: Timed = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), Timed())
    leg.send_uuid(call_id)
    leg.call_id = call_id
    return leg


def worst_100ms(times: list[float]) -> int:
    """The most frames that arrived within any 100 ms."""
    return max((sum(1 for t in times if start <= t < start + 0.1) for start in times), default=0)


def repeat(interval: float, action: Callable[[], None]) -> LoopingCall:
    loop = LoopingCall(action)
    loop.start(interval, now=True)
    return loop


async def wait(seconds: float) -> None:
    await deferLater(reactor, seconds)


async def streamed(make_server: Any, app: App, **options: Any) -> tuple[Server, Connection, Timed, Timed]:
    """A bridged call whose visitor is streamed, in converse mode, to the app (the binary protocol)."""
    server = await make_server(
        streams=StreamConfig(url=app.url("/s"), roles=(Role.VISITOR,), protocol="audiohangup", **options)
    )
    call_id = uuid.uuid4()
    visitor = await timed(server.port("visitor"), call_id)
    resident = await timed(server.port("resident"), call_id)
    await until(lambda: len(server.registry) == 2, what="two legs")
    await until(lambda: app.connections and app.connections[0].events("start"), what="the stream's start")
    return server, app.connections[0], visitor, resident


@pytest_twisted.async_yield_fixture
async def app() -> Any:
    made = App()
    yield await made.listen()
    await made.close()


class Speaker:
    """The app's voice: frames of a tone, sent as a pattern asks."""

    def __init__(self, stream: Connection, frequency: float) -> None:
        self.stream = stream
        self.frequency = frequency
        self.sent = 0

    def send(self, count: int) -> None:
        audio = b"".join(tone(self.frequency, self.sent + k) for k in range(count))
        self.sent += count
        self.stream.send_binary(audio)


#: How the app speaks: (seconds between sends, frames a send).
PATTERNS = {"half real time": (0.040, 1), "bursts": (0.200, 10), "real time": (0.020, 1)}


@pytest.mark.parametrize("mode", ["floor", "mix"])
@pytest_twisted.ensureDeferred
async def test_one_frame_a_tick_whoever_speaks(make_server: Any, app: App, logs: LogCapture, mode: str) -> None:
    """
    A bridged leg whose converse app speaks at half real time, in bursts and
    in real time gets 50 frames/s (within 1) and never more than 6 in 100 ms,
    in both --stream-audio modes; in mix mode it hears both voices.
    """
    server, stream, visitor, resident = await streamed(make_server, app, audio=mode)
    pacer = server.service.pacer
    sent = 0
    # What the server wrote to the visitor, when and in which slot: the one timeline itself, free of the
    # fake Asterisk's own reads, which a busy machine can bunch (this test shares one reactor with them).
    writes: list[tuple[float, int]] = []
    leg = server.registry.get(str(visitor.call_id), Role.VISITOR)
    original = leg._write

    def spy(data: bytes) -> None:
        if data[:1] == bytes([Kind.SLIN]):
            writes.append((reactor.seconds(), pacer.slot))
        original(data)

    leg._write = spy

    def bridged() -> None:
        nonlocal sent
        resident.send(encode_frame(Kind.SLIN, tone(1000, sent)))
        sent += 1

    bridge_loop = repeat(0.020, bridged)
    await wait(0.5)
    voice = Speaker(stream, 440)
    try:
        for pattern, (interval, frames) in PATTERNS.items():
            loop = repeat(interval, lambda frames=frames: voice.send(frames))
            await wait(0.5)  # settled in the pattern
            start, first, missed = reactor.seconds(), pacer.slot, pacer.missed_slots
            await wait(3.0)
            end, last, missed = reactor.seconds(), pacer.slot, pacer.missed_slots - missed
            loop.stop()
            window = visitor.between(start, end)
            # Counted in the timeline's 20 ms slots, not against the wall clock, which a busy machine
            # (and the fake Asterisk's reads, on this reactor) would make the measure: every slot wrote
            # one frame or was missed, 50 a second. Two feeds would write 1.5 frames a slot.
            written = [(at, slot) for at, slot in writes if first < slot <= last]
            assert abs(len(written) + missed - (last - first)) <= 1, (pattern, len(written), missed, last - first)
            assert max(Counter(slot for _, slot in written).values()) == 1, pattern  # a frame a slot
            assert worst_100ms([at for at, _ in written]) <= 6, pattern
            if mode == "mix":
                heard = np.frombuffer(b"".join(payload for _, payload in window), "<i2").astype(float)
                spectrum = np.abs(np.fft.rfft(heard))
                frequencies = np.fft.rfftfreq(len(heard), 1 / RATE)

                def level(f: float, spectrum: Any = spectrum, frequencies: Any = frequencies) -> float:
                    return float(spectrum[np.abs(frequencies - f) < 5].max())

                noise = float(np.median(spectrum))
                assert level(440) > 50 * noise and level(1000) > 50 * noise, (pattern, level(440), level(1000), noise)
    finally:
        bridge_loop.stop()


@pytest_twisted.ensureDeferred
async def test_a_sentence_in_one_message_plays_whole(make_server: Any, app: App, logs: LogCapture) -> None:
    """
    Three seconds of TTS in one message is audio queued ahead, not late: every
    frame plays, in order, a frame a tick (a slot the machine ran late drops
    its frame, and only it).
    """
    server = await make_server(streams=StreamConfig(url=app.url("/s"), roles=(Role.VISITOR,), protocol="audiohangup"))
    pacer = server.service.pacer
    leg = await timed(server.port("visitor"), uuid.uuid4())
    await until(lambda: app.connections and app.connections[0].events("start"), what="the stream's start")
    missed = pacer.missed_slots
    app.connections[0].send_binary(b"".join(numbered(n) for n in range(1, 151)))
    await until(lambda: any(payload == numbered(150) for _, payload in leg.arrivals), timeout=10, what="the last frame")
    missed = pacer.missed_slots - missed
    played = [(at, payload) for at, payload in leg.arrivals if payload != numbered(0)]
    numbers = [int.from_bytes(payload[:2], "little") for _, payload in played]
    assert numbers == sorted(numbers) and len(numbers) + missed >= 150, (len(numbers), missed)
    times = [at for at, _ in played]
    assert abs((len(numbers) + missed - 1) / (times[-1] - times[0]) - 50) <= 1
    assert worst_100ms(times) <= 6


@pytest_twisted.ensureDeferred
async def test_delay_is_back_after_a_stall(spawn: Spawn, app: App) -> None:
    """
    A twistd child stopped for 300 ms (SIGSTOP, then SIGCONT): 1.5 s after it
    resumes, the app to leg delay is back within 30 ms of its level before.
    The app speaks in real time, each frame numbered; the delay of a frame is
    from its send to its arrival at the fake Asterisk.
    """
    child, ports = await start_server(
        spawn, "--stream-url", app.url("/s"), "--stream-roles", "visitor", "--stream-protocol", "audiohangup",
    )
    leg = await timed(ports["audiosocket-visitor"], uuid.uuid4())
    await until(lambda: app.connections and app.connections[0].events("start"), timeout=10, what="the stream's start")
    stream = app.connections[0]
    sent_at: dict[int, float] = {}

    def speak() -> None:
        n = len(sent_at) + 1
        sent_at[n] = reactor.seconds()
        stream.send_binary(numbered(n))

    def delays(start: float, end: float) -> list[float]:
        arrived = {int.from_bytes(payload[:2], "little"): at for at, payload in leg.arrivals if payload != numbered(0)}
        return sorted(arrived[n] - sent_at[n] for n in arrived if n in sent_at and start <= sent_at[n] < end)

    loop = repeat(0.020, speak)
    try:
        await wait(1.5)
        before_end = reactor.seconds()
        before = delays(before_end - 1.0, before_end)
        child.transport.signalProcess(signal.SIGSTOP)
        await wait(0.3)
        child.transport.signalProcess(signal.SIGCONT)
        resumed = reactor.seconds()
        await wait(2.8)  # frames sent up to 2 s after it have arrived, even 300 ms late
        after = delays(resumed + 1.5, resumed + 2.0)
    finally:
        loop.stop()
    assert len(before) >= 40 and len(after) >= 20, (len(before), len(after))
    level, now = before[len(before) // 2], after[len(after) // 2]
    assert now - level <= 0.030, (level, now)
    child.signal("TERM")
    await child.exit()

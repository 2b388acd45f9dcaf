"""
A bridge between legs of different formats, over real sockets: a μ-law 8 kHz
intercom and a slin16 softphone hear each other, each in its own format,
frame for frame, with the pitch kept.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater

from audiohangup.audio import FORMATS
from audiohangup.codecs import decode, encode
from audiohangup.wire import Kind
from audiohangup.wire import encode_frame as frame
from tests.conftest import LogCapture, Server, bridged, until

ULAW, SLIN16 = FORMATS["ulaw"], FORMATS["slin16"]


def tone(rate: int, seconds: float, hz: float = 1000.0, level: float = 8000.0) -> bytes:
    t = np.arange(int(rate * seconds)) / rate
    return (level * np.sin(2 * math.pi * hz * t)).astype("<i2").tobytes()


def peak_hz(pcm: bytes, rate: int) -> float:
    samples = np.frombuffer(pcm, dtype="<i2").astype(float)
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.fft.rfftfreq(len(samples), 1 / rate)[int(np.argmax(spectrum))])


async def send_paced(client: Any, frames: list[bytes]) -> None:
    for data in frames:
        client.send(data)
        await deferLater(reactor, 0.020)


async def mixed(make_server: Any) -> tuple[Server, Any, Any]:
    server = await make_server(visitor_audio="ulaw", resident_audio="slin16")
    _, visitor, resident = await bridged(server)
    return server, visitor, resident


def heard(client: Any, kind: int) -> list[bytes]:
    """The audio frames a client got, the pacer's silence left out."""
    silence = {bytes(640), b"\xff" * 160, bytes(320)}
    return [f.payload for f in client.frames if f.kind == kind and f.payload not in silence]


@pytest_twisted.ensureDeferred
async def test_mulaw_intercom_heard_on_a_slin16_softphone(make_server: Any, logs: LogCapture) -> None:
    server, visitor, resident = await mixed(make_server)
    ulaw = encode(tone(8000, 1.0), ULAW)
    await send_paced(visitor, [frame(Kind.SLIN, ulaw[i : i + 160]) for i in range(0, len(ulaw), 160)])
    await until(lambda: len(heard(resident, Kind.SLIN16)) >= 47, what="the tone at the softphone")
    frames = heard(resident, Kind.SLIN16)
    assert {len(payload) for payload in frames} == {640}  # 20 ms of slin16 each
    assert 47 <= len(frames) <= 50  # one per frame sent, less what the resampler still holds
    assert abs(peak_hz(b"".join(frames), 16000) - 1000) <= 10
    metric = server.service.api.metrics.get_sample_value(
        "audiohangup_bridge_conversions_total", {"source": "ulaw", "target": "slin16"}
    )
    assert metric == 50


@pytest_twisted.ensureDeferred
async def test_slin16_softphone_heard_on_a_mulaw_intercom(make_server: Any, logs: LogCapture) -> None:
    _, visitor, resident = await mixed(make_server)
    pcm = tone(16000, 1.0)
    await send_paced(resident, [frame(Kind.SLIN16, pcm[i : i + 640]) for i in range(0, len(pcm), 640)])
    await until(lambda: len(heard(visitor, Kind.SLIN)) >= 49, what="the tone at the intercom")
    frames = heard(visitor, Kind.SLIN)
    assert {len(payload) for payload in frames} == {160}  # 20 ms of μ-law each
    assert 49 <= len(frames) <= 50
    assert abs(peak_hz(decode(b"".join(frames), ULAW), 8000) - 1000) <= 10


@pytest_twisted.ensureDeferred
async def test_odd_length_slin16_frames_converted_in_step(make_server: Any, logs: LogCapture) -> None:
    """
    Asterisk accepts a slin payload of odd length and carries the byte, and
    so does the bridge: the softphone's audio cut into 641-byte frames reaches
    the intercom as whole 20 ms μ-law frames, at the pitch sent, with no
    error (the fuzzer found the one this used to raise).
    """
    _, visitor, resident = await mixed(make_server)
    pcm = tone(16000, 1.0)
    await send_paced(resident, [frame(Kind.SLIN16, pcm[i : i + 641]) for i in range(0, len(pcm), 641)])
    await until(lambda: len(heard(visitor, Kind.SLIN)) >= 48, what="the tone at the intercom")
    frames = heard(visitor, Kind.SLIN)
    assert {len(payload) for payload in frames} == {160}
    assert abs(peak_hz(decode(b"".join(frames), ULAW), 8000) - 1000) <= 10
    assert logs.problems() == []

"""
Call recording: the WAV's channels and timeline, formats, a crash and a full
disk, the API, retention. Real legs over loopback, the server in-process (or
as a twistd child where only a process shows it).
"""

from __future__ import annotations

import ast
import io
import json
import math
import os
import shutil
import stat
import struct
import tempfile
import threading
import uuid
import wave
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.task import Clock, deferLater
from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase

from audiohangup.audio import FORMATS
from audiohangup.codecs import Transcoder, encode
from audiohangup.reasons import Role
from audiohangup.recording import (
    HEADER_BYTES,
    MAX_AHEAD_TICKS,
    Recorder,
    RecorderStopped,
    RecordingConfig,
    repair,
    wav_header,
)
from audiohangup.recording import recorder as recorder_module
from audiohangup.recording import writer as writer_module
from audiohangup.recording.writer import Tick, WavFile
from audiohangup.wire import Kind
from audiohangup.wire import encode_frame as frame
from tests.bystander import Bystander
from tests.conftest import LogCapture, Server, until
from tests.fake_asterisk import FakeAsterisk, connect
from tests.twistd_child import start_server

ULAW, SLIN16 = FORMATS["ulaw"], FORMATS["slin16"]


def numbered(n: int, count: int = 160) -> bytes:
    """A slin frame whose every sample is C{n}: where it lands in the file says which it was."""
    return struct.pack("<h", n) * count


def read_wav(path: str | Path) -> tuple[int, np.ndarray, np.ndarray]:
    with wave.open(str(path), "rb") as wav:
        assert (wav.getnchannels(), wav.getsampwidth()) == (2, 2)
        data = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2")
        return wav.getframerate(), data[0::2], data[1::2]


def ticks(channel: np.ndarray, per_tick: int = 160) -> list[int]:
    """Each 20 ms of a channel as the one value it holds (frames are numbered), or -1 if mixed."""
    out = []
    for start in range(0, len(channel) - per_tick + 1, per_tick):
        block = channel[start : start + per_tick]
        out.append(int(block[0]) if (block == block[0]).all() else -1)
    return out


async def leg(server: Server, role: str, call_id: uuid.UUID) -> FakeAsterisk:
    client = await connect(server.port(role), on_hangup="close")
    client.send_uuid(call_id)
    await until(lambda: server.registry.get(str(call_id), role) is not None, what=f"the {role} leg")
    return client


async def paced(client: FakeAsterisk, payloads: list[bytes], kind: int = Kind.SLIN) -> list[float]:
    sent = []
    for payload in payloads:
        client.send(frame(kind, payload))
        sent.append(reactor.seconds())
        await deferLater(reactor, 0.020)
    return sent


async def ended(server: Server, call_id: uuid.UUID) -> None:
    await until(lambda: not server.registry.call(str(call_id)), what="the call to end")
    await until(lambda: str(call_id) not in server.service.recorder.active, what="the recording to stop")
    await server.service.recorder.run(lambda: None)  # the writer thread is past the header


@pytest_twisted.ensureDeferred
async def test_channels_hold_each_side_in_step(make_server: Any, tmp_path: Path, logs: LogCapture) -> None:
    """
    Visitor left, resident right, sample for sample; the resident joins a
    second late and its channel is silence until then; frames sent at the
    same moment land in the same tick on both sides (within one frame).
    """
    server = await make_server(record_every_call=True, record_dir=str(tmp_path / "rec"))
    call_id = uuid.uuid4()
    visitor = await leg(server, "visitor", call_id)
    began = reactor.seconds()
    await paced(visitor, [numbered(1000 + n) for n in range(50)])  # one second alone
    resident = await leg(server, "resident", call_id)
    joined = reactor.seconds()
    for n in range(50):  # then both at once
        visitor.send(frame(Kind.SLIN, numbered(2000 + n)))
        resident.send(frame(Kind.SLIN, numbered(-2000 - n)))
        await deferLater(reactor, 0.020)
    visitor.close()
    await ended(server, call_id)
    [path] = list((tmp_path / "rec").glob("*/*.wav"))
    assert path.name == f"{call_id}.wav"
    assert path.parent.name == datetime.now(timezone.utc).strftime("%Y-%m-%d")
    rate, left, right = read_wav(path)
    assert rate == 8000
    left_ticks, right_ticks = ticks(left), ticks(right)
    sent_left = [v for v in left_ticks if v >= 1000]
    assert sent_left == [1000 + n for n in range(50)] + [2000 + n for n in range(50)]  # every frame, in order
    assert [v for v in right_ticks if v != 0] == [-2000 - n for n in range(50)]
    # The resident's channel is silence until it joined (a second or more, however late the machine ran it).
    first_right = next(i for i, v in enumerate(right_ticks) if v != 0)
    assert first_right >= int((joined - began) / 0.020) - 1 >= 49
    assert set(right_ticks[:first_right]) == {0}
    # Frames sent together sit together.
    for n in range(50):
        assert abs(left_ticks.index(2000 + n) - right_ticks.index(-2000 - n)) <= 1, n


@pytest_twisted.ensureDeferred
async def test_mulaw_and_slin16_make_a_16k_file(make_server: Any, tmp_path: Path, logs: LogCapture) -> None:
    server = await make_server(
        record_every_call=True, record_dir=str(tmp_path), visitor_audio="ulaw", resident_audio="slin16",
    )
    call_id = uuid.uuid4()
    visitor = await leg(server, "visitor", call_id)
    t = np.arange(8000) / 8000
    pcm = (6000 * np.sin(2 * math.pi * 1000 * t)).astype("<i2").tobytes()
    ulaw = encode(pcm, ULAW)
    frames = [ulaw[i : i + 160] for i in range(0, len(ulaw), 160)]
    # At once: the frames fill consecutive ticks, so the channel is one unbroken conversion
    # (paced frames would leave a silent tick wherever the sender ran late).
    visitor.send(b"".join(frame(Kind.SLIN, f) for f in frames))
    await until(lambda: server.registry.get(str(call_id), "visitor").frames_in == 51, what="every frame")
    visitor.close()
    await ended(server, call_id)
    [path] = list(tmp_path.glob("*/*.wav"))
    rate, left, right = read_wav(path)
    assert rate == 16000
    assert not right.any()  # no resident: silence
    offline = Transcoder(ULAW, SLIN16)
    expected = np.frombuffer(b"".join(offline.convert(f) for f in frames), dtype="<i2")
    # Where the tone is, it is the decoded and resampled audio, up to the resampler's delay and rounding:
    # a middle stretch of the channel matches the offline conversion at its best lag.
    start = int(np.argmax(np.abs(left) > 1000)) + 2000
    got = left[start : start + 8000].astype(float)
    offset = int(np.argmax(np.abs(expected) > 1000)) + 2000

    def correlation(lag: int) -> float:
        reference = expected[offset + lag : offset + lag + len(got)].astype(float)
        return float(np.dot(got, reference) / math.sqrt(np.dot(got, got) * np.dot(reference, reference)))

    best = max(range(-40, 41), key=correlation)
    assert correlation(best) > 0.999
    reference = expected[offset + best : offset + best + len(got)].astype(float)
    assert abs(np.abs(got).max() - np.abs(reference).max()) < 300


@pytest_twisted.ensureDeferred
async def test_a_full_disk_drops_audio_and_the_call_goes_on(
    make_server: Any, tmp_path: Path, logs: LogCapture, monkeypatch: Any,
) -> None:
    """The recording's file is /dev/full: every write fails; the call does not notice."""
    monkeypatch.setattr(writer_module, "create", lambda path: os.open("/dev/full", os.O_WRONLY))
    server = await make_server(record_every_call=True, record_dir=str(tmp_path))
    call_id = uuid.uuid4()
    visitor = await leg(server, "visitor", call_id)
    await paced(visitor, [numbered(7)] * 25)
    heard = len(visitor.frames)
    await until(lambda: len(visitor.frames) > heard + 5, what="the call to go on")
    metrics = server.service.metrics
    await until(lambda: (metrics.get_sample_value("audiohangup_recording_dropped_frames_total") or 0) >= 20,
                what="drops counted")
    warned = [e for e in logs.events if "audio dropped, the call goes on" in e.get("log_format", "")]
    assert len(warned) == 1 and warned[0]["call_id"] == str(call_id)
    assert "No space left on device" in warned[0]["why"]
    assert server.registry.get(str(call_id), "visitor").live
    visitor.close()
    await until(lambda: not server.registry.call(str(call_id)), what="the call to end")


async def api(server: Server, method: str, path: str) -> tuple[int, Any, Any]:
    response = await treq.request(method, f"{server.url}{path}", persistent=False, timeout=10)
    content = await response.content()
    return response.code, content, response


@pytest_twisted.ensureDeferred
async def test_recording_through_the_api(make_server: Any, tmp_path: Path, logs: LogCapture) -> None:
    server = await make_server(record_dir=str(tmp_path / "on-demand"))
    call_id = uuid.uuid4()
    visitor = await leg(server, "visitor", call_id)
    path = f"/calls/{call_id}/recording"
    assert (await api(server, "GET", path))[0] == 404  # not recorded: nothing to fetch
    status, body, _ = await api(server, "POST", path)
    assert status == 201, body
    assert (await api(server, "POST", path))[0] == 409
    status, body, _ = await api(server, "GET", path)  # at once: the writer may not have opened the file yet
    with wave.open(io.BytesIO(body)) as first:
        assert status == 200 and first.getframerate() == 8000
    await paced(visitor, [numbered(300)] * 25)
    status, body, response = await api(server, "GET", path)
    assert status == 200 and response.headers.getRawHeaders("content-type") == ["audio/wav"]
    with wave.open(io.BytesIO(body)) as during:
        assert during.getnframes() > 0  # what is written so far, with a header that says so
    status, body, _ = await api(server, "DELETE", path)
    assert status == 200, body
    assert (await api(server, "DELETE", path))[0] == 404
    status, body, _ = await api(server, "GET", path)
    with wave.open(io.BytesIO(body)) as after:
        assert after.getnframes() >= 25 * 160 - 160
    for method in ("POST", "DELETE", "GET"):
        assert (await api(server, method, f"/calls/{uuid.uuid4()}/recording"))[0] == 404
    visitor.close()
    await until(lambda: not server.registry.call(str(call_id)), what="the call to end")
    [record] = (await server.service.records.query(call_id=str(call_id)))["records"]
    assert record["recording"].endswith(f"/{call_id}.wav")


@pytest_twisted.ensureDeferred
async def test_a_second_recording_of_a_call_keeps_the_first(make_server: Any, tmp_path: Path, logs: LogCapture) -> None:
    """POST, DELETE, POST again at once: a file of its own (-2), the first untouched; GET serves the latest."""
    folder = tmp_path / "on-demand"
    server = await make_server(record_dir=str(folder))
    call_id = uuid.uuid4()
    visitor = await leg(server, "visitor", call_id)
    path = f"/calls/{call_id}/recording"
    assert (await api(server, "POST", path))[0] == 201
    await paced(visitor, [numbered(300)] * 10)
    assert (await api(server, "DELETE", path))[0] == 200
    status, body, _ = await api(server, "POST", path)
    assert status == 201 and json.loads(body)["recording"]["file"].endswith(f"/{call_id}-2.wav"), body
    await paced(visitor, [numbered(500)] * 10)
    assert (await api(server, "DELETE", path))[0] == 200
    [day] = os.listdir(folder)
    assert sorted(os.listdir(folder / day)) == [f"{call_id}-2.wav", f"{call_id}.wav"]
    _, first, _ = read_wav(folder / day / f"{call_id}.wav")
    _, second, _ = read_wav(folder / day / f"{call_id}-2.wav")
    assert 300 in ticks(first) and 500 not in ticks(first)
    assert 500 in ticks(second) and 300 not in ticks(second)
    status, content, _ = await api(server, "GET", path)
    assert status == 200
    with wave.open(io.BytesIO(content)) as wav:
        served = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2")[0::2]
    assert 500 in ticks(served) and 300 not in ticks(served)
    visitor.close()
    await ended(server, call_id)


async def recording_child(spawn: Any, record: Path) -> tuple[Any, dict[str, int], FakeAsterisk, uuid.UUID]:
    """A twistd child recording every call into C{record}, its ports, and a visitor leg of a new call."""
    child, ports = await start_server(spawn, "--record-every-call", "--recordings-dir", str(record), "--call-records", "none")
    call_id = uuid.uuid4()
    client = await connect(ports["audiosocket-visitor"], on_hangup="close")
    client.send_uuid(call_id)
    return child, ports, client, call_id


@pytest_twisted.ensureDeferred
async def test_a_crashed_recording_is_repaired_at_start(spawn: Any, tmp_path: Path, logs: LogCapture) -> None:
    """SIGKILL mid-call: the next start rewrites the header; what was written is kept and plays."""
    record = tmp_path / "recordings"
    child, ports, client, call_id = await recording_child(spawn, record)
    began = reactor.seconds()
    for _ in range(75):
        client.send(frame(Kind.SLIN, numbered(1234)))
        await deferLater(reactor, 0.020)
    lasted = reactor.seconds() - began
    child.signal("KILL")
    await child.exit()
    [path] = list(record.glob("*/*.wav"))
    assert struct.unpack_from("<I", path.read_bytes(), 40)[0] == 0  # the header never completed
    again, ports = await start_server(spawn, "--record-every-call", "--recordings-dir", str(record), "--call-records", "none")
    await until(lambda: "header repaired" in again.log, what="the repair")
    with wave.open(str(path)) as wav:
        seconds = wav.getnframes() / wav.getframerate()
    assert lasted - 0.5 <= seconds <= lasted + 0.1, (seconds, lasted)
    response = await treq.get(f"http://127.0.0.1:{ports['http']}/calls/{call_id}/recording", persistent=False)
    assert response.code == 200
    with wave.open(io.BytesIO(await response.content())) as served:
        assert served.getnframes() / served.getframerate() == seconds
    again.signal("TERM")
    await again.exit()


class RepairTests(SynchronousTestCase):
    def test_repairFromTheSize(self) -> None:
        folder = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, folder)
        path = os.path.join(folder, "x.wav")
        with open(path, "wb") as file:
            file.write(wav_header(16000, 0) + b"\x01\x00" * 1001)  # an odd sample: cut off
        self.assertEqual(repair(path), 500 / 16000)
        with wave.open(path) as wav:
            self.assertEqual((wav.getnframes(), wav.getframerate()), (500, 16000))
        self.assertIsNone(repair(path))  # right now: left alone
        self.assertEqual(os.path.getsize(path), HEADER_BYTES + 2000)


class PureModulesTests(SynchronousTestCase):
    def test_theFormatAndTheLayoutKnowNoReactorNorLeg(self) -> None:
        """wav and layout import the standard library and each other only: no Twisted, no leg, no numpy."""
        folder = Path(recorder_module.__file__).parent
        for module in ("wav", "layout"):
            tree = ast.parse((folder / f"{module}.py").read_text())
            imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
            imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
            allowed = {"__future__", "os", "re", "struct", "audiohangup.recording.layout"}
            self.assertEqual(imported - allowed, set(), module)


class FailedWriteTests(SynchronousTestCase):
    """A write the disk takes only part of: the file is cut back, and the header never counts what is not there."""

    def test_partialWriteIsUndone(self) -> None:
        folder = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, folder)
        path = os.path.join(folder, "call.wav")
        wav = WavFile(path, 8000, {role: FORMATS["slin"] for role in Role})
        tick = Tick({Role.VISITOR: (numbered(3), FORMATS["slin"]), Role.RESIDENT: None})
        self.assertEqual(wav.write([tick] * 5), 5 * 640)
        real = wav.file
        assert real is not None
        failures = []

        class Full:
            """The disk takes 100 bytes of the next write, then is full."""

            def __getattr__(self, name: str) -> Any:
                return getattr(real, name)

            def write(self, data: bytes) -> int:
                if not failures:
                    failures.append(1)
                    return real.write(data[:100])
                raise OSError(28, "No space left on device")

        wav.file = Full()
        with self.assertRaises(OSError):
            wav.write([tick] * 5)
        self.assertEqual(os.path.getsize(path), HEADER_BYTES + 5 * 640)  # the 100 bytes are gone again
        wav.file = real
        self.assertEqual(wav.write([tick] * 5), 5 * 640)  # in step: whole ticks after whole ticks
        self.assertEqual(wav.close(), 10 * 640)
        rate, left, _ = read_wav(path)
        self.assertEqual((rate, len(left)), (8000, 10 * 160))


@pytest_twisted.ensureDeferred
async def test_heard_mix(make_server: Any, tmp_path: Path, logs: LogCapture) -> None:
    """--recordings-mix heard: each channel is what its leg heard, so the visitor's holds the resident's voice."""
    server = await make_server(record_every_call=True, record_dir=str(tmp_path), record_mix="heard")
    call_id = uuid.uuid4()
    visitor = await leg(server, "visitor", call_id)
    resident = await leg(server, "resident", call_id)
    for n in range(10):
        resident.send(frame(Kind.SLIN, numbered(500 + n)))
        await deferLater(reactor, 0.020)
    visitor.close()
    await ended(server, call_id)
    [path] = list(tmp_path.glob("*/*.wav"))
    _, left, right = read_wav(path)
    assert [v for v in ticks(left) if v > 0] == [500 + n for n in range(10)]  # the visitor heard the resident
    assert not [v for v in ticks(right) if v > 0]  # the resident heard silence only
    metrics = server.service.metrics
    assert metrics.get_sample_value("audiohangup_recordings_written_total") == 1
    assert metrics.get_sample_value("audiohangup_recording_bytes_total") == path.stat().st_size - 44
    assert metrics.get_sample_value("audiohangup_recordings_active") == 0


@pytest_twisted.ensureDeferred
async def test_old_recordings_are_deleted(tmp_path: Path, logs: LogCapture) -> None:
    """--recordings-days: day folders older than that go at start (and daily); newer ones stay."""
    from audiohangup.recording import Mix, Recorder, RecordingConfig

    old, recent = tmp_path / "2001-01-01", tmp_path / datetime.now(timezone.utc).strftime("%Y-%m-%d")
    for folder in (old, recent):
        folder.mkdir()
        (folder / f"{uuid.uuid4()}.wav").write_bytes(wav_header(8000, 0))
    recorder = Recorder(RecordingConfig(str(tmp_path), keep_days=7, mix=Mix.SENT), reactor, {})
    await recorder.start()
    try:
        assert not old.exists() and recent.exists()
        assert next(e for e in logs.events if "older than" in e.get("log_format", ""))["count"] == 1
    finally:
        await recorder.stop()


# Hostile peers and a careless disk (issue 19): bounds, links, short files, modes


async def record_a_call(make_server: Any, folder: Path, call_id: uuid.UUID, value: int = 8) -> Server:
    """A server recording every call into C{folder}, and one call of a visitor's ten frames of C{value}, ended."""
    server: Server = await make_server(record_every_call=True, record_dir=str(folder))
    visitor = await leg(server, "visitor", call_id)
    await paced(visitor, [numbered(value)] * 10)
    visitor.close()
    await ended(server, call_id)
    return server


def plant_day(folder: Path) -> Path:
    day = folder / datetime.now(timezone.utc).strftime("%Y-%m-%d")
    day.mkdir(parents=True)
    return day


#: A second of audio in 102 frames: fifty of 20 ms, one of 16,000 bytes (half a second), twice.
FLOOD = (b"".join(frame(Kind.SLIN, numbered(n)) for n in range(50)) + frame(Kind.SLIN, numbered(9, 8000))) * 2


def buffered(recording: Any) -> tuple[int, int]:
    """What a recording holds in memory: ticks filed and their bytes, on the reactor and on the writer's side."""
    entries = [entry for channel in recording.channels.values() for entry in channel.pending.values()]
    converters = recording.file.channels.values()
    held = sum(len(payload) for payload, _ in entries) + sum(len(c._pending) for c in converters)
    return len(entries) + recording.unwritten, held


@pytest_twisted.ensureDeferred
async def test_a_leg_faster_than_real_time_cannot_run_the_recording_ahead(
    make_server: Any, tmp_path: Path, logs: LogCapture,
) -> None:
    """
    One leg floods audio (20 ms frames and 16,000-byte ones) for two
    seconds: what it gets ahead of the clock is dropped and counted, the
    recorder's memory stays bounded, an unrelated call keeps its audio, and
    the flood's WAV ends with a true header once the leg goes.
    """
    server = await make_server(record_every_call=True, record_dir=str(tmp_path))
    bystander = await Bystander.start(server.port("visitor"), server.port("resident"), server.registry)
    call_id = uuid.uuid4()
    flood = await leg(server, "visitor", call_id)
    flooding = server.registry.get(str(call_id), "visitor")
    recording = server.service.recorder.active[str(call_id)]
    sent, most_ticks, most_bytes = 0, 0, 0
    began = reactor.seconds()
    while reactor.seconds() - began < 2.0:  # a second of audio every 10 ms, as fast as the server reads it
        flood.send(FLOOD)
        sent += 102
        await until(lambda sent=sent: flooding.frames_in >= sent, what="the flood to be read")
        ticks_held, bytes_held = buffered(recording)
        most_ticks, most_bytes = max(most_ticks, ticks_held), max(most_bytes, bytes_held)
    lasted = reactor.seconds() - began
    assert sent >= 1000  # well over 20 s of audio in 2 s
    # At most 0.5 s ahead, 2 ticks late and a flush's 5 ticks, for each channel; a tick's bytes at most.
    assert most_ticks <= 2 * (25 + 2 + 5 + 2), most_ticks
    assert most_bytes <= 2 * (25 + 2 + 5 + 2) * 640 + 2 * 25 * 320, most_bytes
    metrics = server.service.metrics
    assert metrics.get_sample_value("audiohangup_recording_dropped_frames_total") >= sent / 2
    assert recording.dropped >= sent / 2
    warned = [e for e in logs.events if "faster than real time" in e.get("log_format", "")]
    assert [(e["call_id"], e["role"]) for e in warned] == [(str(call_id), Role.VISITOR)]  # once for the leg
    kept = await bystander.stop()
    assert kept >= 0.95, kept
    bystander.close()
    flood.close()
    await ended(server, call_id)
    assert logs.ended(str(call_id))
    [path] = [p for p in tmp_path.glob("*/*.wav") if p.name == f"{call_id}.wav"]
    data = path.read_bytes()
    assert struct.unpack_from("<I", data, 40)[0] == len(data) - HEADER_BYTES  # the final header
    rate, left, _ = read_wav(path)
    assert len(left) / rate <= lasted + 2.0  # the clock's time and the bound, not the 20 s sent


@pytest_twisted.ensureDeferred
async def test_sigterm_during_a_flood_finishes_the_wav(spawn: Any, tmp_path: Path, logs: LogCapture) -> None:
    """The server told to stop while a recorded leg floods it: it exits, and the WAV has its final header."""
    record = tmp_path / "recordings"
    child, _, client, _ = await recording_child(spawn, record)
    began = reactor.seconds()
    while reactor.seconds() - began < 1.0:  # about 100 s of audio in a second
        client.send(FLOOD)
        await deferLater(reactor, 0.01)
    child.signal("TERM")
    await child.exit()
    [path] = list(record.glob("*/*.wav"))
    data = path.read_bytes()
    assert struct.unpack_from("<I", data, 40)[0] == len(data) - HEADER_BYTES
    assert "faster than real time" in child.log


class AheadTests(SynchronousTestCase):
    """The bound on a clock: what a leg files ahead of now, tick by tick; audio filed by its duration."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.recorder, self.events = self.recorder_on_the_clock()
        self.recording = self.recorder.begin(str(uuid.uuid4()), [])

    def recorder_on_the_clock(self) -> tuple[Recorder, list[dict[str, Any]]]:
        """A recorder on C{self.clock} whose writer's work is done at once, and what it logs."""
        folder = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, folder)
        recorder = Recorder(RecordingConfig(folder), self.clock, {role: FORMATS["slin"] for role in Role})
        recorder.run = lambda work, *args: succeed(work(*args))  # type: ignore[method-assign]
        events: list[dict[str, Any]] = []
        recorder.log = Logger(observer=events.append)
        return recorder, events

    def test_aLongFrameFillsTicksUpToTheBound(self) -> None:
        slin = FORMATS["slin"]
        self.recording.frame(Role.VISITOR, numbered(4, 8000), slin)  # 50 ticks of audio at once
        channel = self.recording.channels[Role.VISITOR]
        self.assertEqual(sorted(channel.pending), list(range(25)))  # half a second's ticks, 320 bytes each
        self.assertEqual({len(payload) for payload, _ in channel.pending.values()}, {320})
        self.assertEqual(self.recording.dropped, 25)
        self.recording.frame(Role.VISITOR, numbered(5), slin)
        self.assertEqual(self.recording.dropped, 26)  # still half a second ahead: dropped
        self.clock.advance(0.1)
        for n in range(10):
            self.recording.frame(Role.VISITOR, numbered(n), slin)
        self.assertEqual(max(channel.pending), 29)  # five more ticks of time, five more frames
        self.assertEqual(self.recording.dropped, 31)
        self.recording.frame(Role.RESIDENT, numbered(7, 170), slin)  # a tick and a bit: the bit begins the next
        resident = self.recording.channels[Role.RESIDENT].pending
        self.assertEqual((resident[5][0], resident[6][0]), (numbered(7, 160), numbered(7, 10)))

    def test_realTimeFramesOfAnyLengthAreRecordedWhole(self) -> None:
        """
        Two seconds of 10, 20 and 30 ms frames, each sent as its time comes:
        none dropped, no warning, and the WAV holds every sample, in order,
        without a gap (the ticks filled by duration, not one a frame).
        """
        for milliseconds in (10, 20, 30):
            recorder, events = self.recorder_on_the_clock()
            call_id = str(uuid.uuid4())
            recording = recorder.begin(call_id, [])
            samples = 8 * milliseconds
            ramp = np.arange(1, 16001, dtype="<i2")  # every sample its own value, none silence
            for start in range(0, len(ramp), samples):
                recording.frame(Role.VISITOR, ramp[start : start + samples].tobytes(), FORMATS["slin"])
                self.clock.advance(milliseconds / 1000)
                if round(self.clock.seconds() * 1000) % 100 < milliseconds:
                    recording.flush()  # as the recorder's loop does every 100 ms
            self.clock.advance(0.1)  # what the resampler's lead holds back is written too
            recorder.finish(call_id)
            self.assertEqual(recording.dropped, 0, milliseconds)
            self.assertEqual([e for e in events if "faster than real time" in e["log_format"]], [], milliseconds)
            _, left, _ = read_wav(recording.path)
            sound = np.flatnonzero(left)
            self.assertEqual(left[sound[0] : sound[-1] + 1].tolist(), ramp.tolist(), milliseconds)

    def test_aTickLeftPartFilledIsSilenceAfterItsAudio(self) -> None:
        """A 10 ms frame, then the next one a tick late: the first tick's other 10 ms are silence."""
        self.recording.frame(Role.VISITOR, numbered(5, 80), FORMATS["slin"])
        self.clock.advance(0.03)
        self.recording.frame(Role.VISITOR, numbered(6), FORMATS["slin"])
        self.clock.advance(0.1)
        self.recorder.finish(self.recording.call_id)
        _, left, _ = read_wav(self.recording.path)
        start = int(np.flatnonzero(left)[0])
        self.assertEqual(left[start : start + 400].tolist(), [5] * 80 + [0] * 80 + [6] * 160 + [0] * 80)

    def test_tenMillisecondFramesTwiceTooFastAreBounded(self) -> None:
        """Four seconds of audio in two: half a second of it is ahead of the clock at most, the rest dropped."""
        channel = self.recording.channels[Role.VISITOR]
        for _ in range(400):
            self.recording.frame(Role.VISITOR, numbered(3, 80), FORMATS["slin"])
            self.clock.advance(0.005)
            self.assertLess(max(channel.pending), self.recording._index() + MAX_AHEAD_TICKS)
        self.recording.frame(Role.VISITOR, numbered(3, 80), FORMATS["slin"])
        kept = sum(len(payload) for payload, _ in channel.pending.values()) // 160
        self.assertEqual((channel.next, channel.filled), (self.recording._index() + MAX_AHEAD_TICKS, 0))  # full
        self.assertEqual(self.recording.dropped, 401 - kept)  # each frame dropped counted once
        self.assertGreaterEqual(self.recording.dropped, 400 - 2 * (100 + MAX_AHEAD_TICKS))
        warned = [e for e in self.events if "faster than real time" in e["log_format"]]
        self.assertEqual([e["role"] for e in warned], [Role.VISITOR])


@pytest_twisted.ensureDeferred
async def test_frames_of_10_20_and_30_ms_in_real_time_are_recorded_whole(
    make_server: Any, tmp_path: Path, logs: LogCapture,
) -> None:
    """
    Three calls over loopback, each sending 1.5 s of audio in frames of its
    own length as their time comes: every sample in its WAV, in order, none
    dropped, no warning (a late frame may leave silence before it).
    """
    server = await make_server(record_every_call=True, record_dir=str(tmp_path))
    calls = {milliseconds: uuid.uuid4() for milliseconds in (10, 20, 30)}
    clients = {milliseconds: await leg(server, "visitor", call_id) for milliseconds, call_id in calls.items()}
    ramp = np.arange(1, 12001, dtype="<i2")  # every sample its own value, none silence

    async def send(milliseconds: int) -> None:
        samples = 8 * milliseconds
        for start in range(0, len(ramp), samples):
            clients[milliseconds].send(frame(Kind.SLIN, ramp[start : start + samples].tobytes()))
            await deferLater(reactor, milliseconds / 1000)

    await gatherResults([Deferred.fromCoroutine(send(milliseconds)) for milliseconds in calls])
    for milliseconds, call_id in calls.items():
        recording = server.service.recorder.active[str(call_id)]
        channel = recording.channels[Role.VISITOR]
        await until(lambda r=recording, c=channel: r._index() > c.next + 2, what="the resampler's lead to be pushed out")
        clients[milliseconds].close()
        await ended(server, call_id)
    assert not [text for text in logs.texts() if "faster than real time" in text]
    done = {e["call_id"]: e["dropped"] for e in logs.events if "done:" in e.get("log_format", "")}
    assert done == {str(call_id): 0 for call_id in calls.values()}
    for milliseconds, call_id in calls.items():
        [path] = list(tmp_path.glob(f"*/{call_id}.wav"))
        _, left, _ = read_wav(path)
        assert left[left != 0].tolist() == ramp.tolist(), milliseconds


@pytest_twisted.ensureDeferred
async def test_a_finished_recording_is_found_off_the_reactor(
    make_server: Any, tmp_path: Path, logs: LogCapture, monkeypatch: Any,
) -> None:
    """GET of a call the server no longer holds: found, without a directory listed on the reactor's thread."""
    folder = tmp_path / "rec"
    for day in ("2025-01-01", "2025-01-02"):  # other days, other calls
        (folder / day).mkdir(parents=True)
        for _ in range(3):
            (folder / day / f"{uuid.uuid4()}.wav").write_bytes(wav_header(8000, 0))
    call_id = uuid.uuid4()
    server = await record_a_call(make_server, folder, call_id, 77)
    assert not server.registry.call(str(call_id))
    listed: list[threading.Thread] = []

    def noting(real: Any) -> Any:
        def call(*args: Any) -> Any:
            listed.append(threading.current_thread())
            return real(*args)
        return call

    monkeypatch.setattr(os, "scandir", noting(os.scandir))
    monkeypatch.setattr(os, "listdir", noting(os.listdir))
    status, body, _ = await api(server, "GET", f"/calls/{call_id}/recording")
    assert status == 200
    with wave.open(io.BytesIO(body)) as wav:
        served = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2")[0::2]
    assert 77 in ticks(served)
    assert listed and threading.current_thread() not in listed


@pytest_twisted.ensureDeferred
async def test_get_never_serves_a_links_target(make_server: Any, tmp_path: Path, logs: LogCapture) -> None:
    folder, call_id = tmp_path / "rec", uuid.uuid4()
    secret = tmp_path / "secret.wav"
    secret.write_bytes(wav_header(8000, 4) + b"SECR")
    (plant_day(folder) / f"{call_id}.wav").symlink_to(secret)
    server = await make_server(record_dir=str(folder))
    status, body, _ = await api(server, "GET", f"/calls/{call_id}/recording")
    assert status == 404 and b"SECR" not in body, body
    assert json.loads(body)["error"]["code"] == "no_recording"
    assert any("symbolic link" in text and f"{call_id}.wav" in text for text in logs.texts())


@pytest_twisted.ensureDeferred
async def test_the_server_never_creates_a_file_through_a_link(make_server: Any, tmp_path: Path, logs: LogCapture) -> None:
    """A link where the call's file would go: the recording takes the next name, the link's target is not made."""
    folder, call_id = tmp_path / "rec", uuid.uuid4()
    target = tmp_path / "elsewhere.wav"
    day = plant_day(folder)
    (day / f"{call_id}.wav").symlink_to(target)
    await record_a_call(make_server, folder, call_id)
    assert not target.exists()
    assert (day / f"{call_id}-2.wav").is_file() and not (day / f"{call_id}-2.wav").is_symlink()
    assert 8 in ticks(read_wav(day / f"{call_id}-2.wav")[1])


@pytest_twisted.ensureDeferred
async def test_a_day_folder_that_is_a_link_is_not_written_through(
    make_server: Any, tmp_path: Path, logs: LogCapture,
) -> None:
    folder, elsewhere, call_id = tmp_path / "rec", tmp_path / "elsewhere", uuid.uuid4()
    elsewhere.mkdir()
    folder.mkdir()
    (folder / datetime.now(timezone.utc).strftime("%Y-%m-%d")).symlink_to(elsewhere)
    await record_a_call(make_server, folder, call_id)
    assert list(elsewhere.iterdir()) == []
    assert any("audio dropped" in text and str(call_id) in text for text in logs.texts())


@pytest_twisted.ensureDeferred
async def test_links_do_not_stop_the_start_up_repair(tmp_path: Path, logs: LogCapture) -> None:
    """A dangling link first, a link to a stale WAV elsewhere, then a crashed recording: skipped, untouched, repaired."""
    from audiohangup.recording import Mix, Recorder, RecordingConfig

    day = plant_day(tmp_path / "rec")
    (day / "00000000-0000-0000-0000-000000000000.wav").symlink_to(tmp_path / "nowhere.wav")
    outside = tmp_path / "outside.wav"
    stale = wav_header(8000, 0) + numbered(1)
    outside.write_bytes(stale)
    (day / "11111111-1111-1111-1111-111111111111.wav").symlink_to(outside)
    crashed = day / "ffffffff-ffff-ffff-ffff-ffffffffffff.wav"
    crashed.write_bytes(wav_header(8000, 0) + numbered(2, 320))
    recorder = Recorder(RecordingConfig(str(tmp_path / "rec"), mix=Mix.SENT), reactor, {})
    await recorder.start()
    try:
        with wave.open(str(crashed)) as wav:
            assert wav.getnframes() == 160
        assert outside.read_bytes() == stale
        assert not (tmp_path / "nowhere.wav").exists()
        skipped = [e["name"] for e in logs.events if "symbolic link" in e.get("log_format", "")]
        assert sorted(skipped) == [f"{day.name}/00000000-0000-0000-0000-000000000000.wav",
                                   f"{day.name}/11111111-1111-1111-1111-111111111111.wav"]
    finally:
        await recorder.stop()


@pytest_twisted.ensureDeferred
async def test_a_short_wav_is_served_as_what_it_holds(make_server: Any, tmp_path: Path, logs: LogCapture) -> None:
    """What a crash right after opening leaves (0 bytes, part of a header), or a header gone bad: never a 500."""
    folder = tmp_path / "rec"
    day = plant_day(folder)
    server = await make_server(record_dir=str(folder))
    for content, frames in ((b"", 0), (b"RIFF\x00\x00", 0), (b"\x00" * HEADER_BYTES + numbered(3, 320), 160)):
        call_id = uuid.uuid4()
        (day / f"{call_id}.wav").write_bytes(content)
        status, body, _ = await api(server, "GET", f"/calls/{call_id}/recording")
        assert status == 200, body
        assert len(body) == HEADER_BYTES + frames * 4
        with wave.open(io.BytesIO(body)) as wav:
            assert (wav.getnframes(), wav.getframerate(), wav.getnchannels()) == (frames, 8000, 2)


class SwappedForALinkTests(SynchronousTestCase):
    """A recording found, then a link put in its place before the answer: a 404 JSON, not the link's target."""

    def test_linkIsNotServed(self) -> None:
        from twisted.web.test.requesthelper import DummyRequest

        from audiohangup.http.wav import WavResource

        folder = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, folder)
        (folder / "secret").write_bytes(wav_header(8000, 4) + b"SECR")
        (folder / "day").mkdir()
        (folder / "day" / "call.wav").symlink_to(folder / "secret")
        request = DummyRequest([b""])
        body = WavResource(str(folder / "day" / "call.wav"), 8000).render_GET(request)
        self.assertEqual(request.responseCode, 404)
        self.assertEqual(json.loads(body)["error"]["code"], "no_recording")
        self.assertEqual(b"".join(request.written), b"")


@pytest_twisted.ensureDeferred
async def test_recordings_are_private_whatever_the_umask(make_server: Any, tmp_path: Path, logs: LogCapture) -> None:
    """Under umask 022: the folders the server makes are 0700, the WAV 0600."""
    folder = tmp_path / "new" / "rec"
    previous = os.umask(0o022)
    try:
        await record_a_call(make_server, folder, uuid.uuid4())
    finally:
        os.umask(previous)
    [path] = list(folder.glob("*/*.wav"))
    modes = {p: stat.S_IMODE(os.stat(p).st_mode) for p in (tmp_path / "new", folder, path.parent, path)}
    assert modes == {tmp_path / "new": 0o700, folder: 0o700, path.parent: 0o700, path: 0o600}


@pytest_twisted.ensureDeferred
async def test_a_lookup_once_the_recorder_stops_is_a_503_at_once(
    make_server: Any, tmp_path: Path, logs: LogCapture,
) -> None:
    """
    Shutting down, a kept-alive API connection asks for a finished
    recording after the recorder stopped: a JSON 503 C{shutting_down} (the
    file may well be there: not a 404), never a request left waiting on a
    lookup thread that is gone.
    """
    call_id = uuid.uuid4()
    server = await record_a_call(make_server, tmp_path / "rec", call_id)
    await server.service.recorder.stop()
    status, body, _ = await api(server, "GET", f"/calls/{call_id}/recording")
    assert status == 503 and json.loads(body)["error"]["code"] == "shutting_down", body


@pytest_twisted.ensureDeferred
async def test_stopping_waits_for_a_lookup_without_blocking_the_reactor(
    tmp_path: Path, logs: LogCapture, monkeypatch: Any,
) -> None:
    """A lookup scans the disk when the recorder stops: stop() awaits it while the reactor runs; new ones are refused."""
    scanning, release = threading.Event(), threading.Event()
    safety = threading.Timer(10.0, release.set)  # the scan ends even where stop() joins its thread on the reactor

    def scan(directory: str, call_id: str) -> tuple[None, list[str]]:
        scanning.set()
        release.wait()
        return None, []

    monkeypatch.setattr(recorder_module, "last_recording", scan)
    recorder = Recorder(RecordingConfig(str(tmp_path)), reactor, {})
    await recorder.start()
    looking = recorder.find(str(uuid.uuid4()))
    await until(scanning.is_set, what="the scan")
    safety.start()
    try:
        stopping = Deferred.fromCoroutine(recorder.stop())
        assert not stopping.called
        await deferLater(reactor, 0.01)  # the reactor turns meanwhile
        assert not stopping.called
        refused = recorder.find(str(uuid.uuid4()))
        assert refused.called  # at once, not queued behind the end
        with pytest.raises(RecorderStopped):
            await refused
        release.set()
        await stopping
        assert await looking is None
    finally:
        safety.cancel()
        release.set()

# -*- test-case-name: tests.test_recording -*-
"""
Call recording: one stereo WAV per call, visitor left, resident right.

Both channels share one 20 ms timeline from the recording's start: a frame
lands in the tick it arrived in (a second one in the same tick goes to the
next), and a tick in which a leg sent nothing (not joined yet, gone, silent)
is silence there, so the channels stay in step for the whole call.

The reactor only files frames under their tick. Every 100 ms the ticks that
are over go, as a batch, to one writer thread of the recorder's own, which
converts them (G.711 decoded, resampled to the file's rate, the higher of the
legs'), interleaves and appends them, and flushes: at most about 0.3 s of a
call's audio waits in memory. A disk that is slow or full drops audio,
counted and logged once per call, and never delays or ends a call.

A WAV's header says its size only once the recording stops; a file a crash
left is repaired at the next start (its header rewritten from its size).
"""

from __future__ import annotations

import contextlib
import enum
import os
import re
import shutil
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, BinaryIO

import numpy as np
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.protocols.basic import FileSender
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from zope.interface import implementer

from audiohangup.audio import FORMATS, SLIN_BY_KIND, AudioFormat
from audiohangup.codecs import Transcoder
from audiohangup.errors import ApiError
from audiohangup.interfaces import ILeg, ILegObserver, ILegTap, IReactor
from audiohangup.reasons import HangupCause, Role
from audiohangup.wire import Frame

TICK = 0.020
#: How often the ticks that are over go to the writer.
FLUSH_INTERVAL = 0.1
#: A tick is over (no frame can still land in it) this many ticks after it began.
LATE_TICKS = 2
#: Audio of one call waiting for the writer beyond which new audio is dropped.
MAX_UNWRITTEN_SECONDS = 0.5
HEADER_BYTES = 44
CHANNELS = (Role.VISITOR, Role.RESIDENT)
#: A call's recording, and a later one of the same call on the same day (-2, -3, ...).
_WAV_NAME = re.compile(r"^(?P<call>[0-9a-f-]{36})(?:-(?P<n>[1-9][0-9]*))?\.wav$")
_DAY = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def _wav_name(call_id: str, number: int) -> str:
    """The file name of a call's recording number C{number} of a day; what L{_WAV_NAME} reads back."""
    return f"{call_id}.wav" if number == 1 else f"{call_id}-{number}.wav"


class Mix(str, enum.Enum):
    """What each channel holds: what its leg C{sent} (the voices), or what it C{heard}."""

    SENT = "sent"
    HEARD = "heard"

    def __str__(self) -> str:
        return str(self.value)


# WAV files


def wav_header(rate: int, data_bytes: int, channels: int = 2) -> bytes:
    """A canonical 44-byte RIFF/WAVE header for 16-bit PCM."""
    block = channels * 2
    return struct.pack(
        "<4sI4s4sIHHIIHH4sI",
        b"RIFF", 36 + data_bytes, b"WAVE", b"fmt ", 16, 1, channels, rate, rate * block, block, 16,
        b"data", data_bytes,
    )


def wav_data_bytes(path: str, channels: int = 2) -> int:
    """The whole samples a WAV file on disk holds, in bytes, whatever its header says."""
    size = os.path.getsize(path) - HEADER_BYTES
    return max(0, size - size % (channels * 2))


def wav_rate(header: bytes) -> int:
    rate: int = struct.unpack_from("<I", header, 24)[0]
    return rate


def repair(path: str) -> float | None:
    """
    Rewrite a WAV header whose sizes disagree with the file (a recording a
    crash cut short): return the seconds of audio it holds, or None if the
    header was right. A partial last sample is cut off.
    """
    with open(path, "r+b") as file:
        header = file.read(HEADER_BYTES)
        if len(header) < HEADER_BYTES or header[:4] != b"RIFF" or header[8:12] != b"WAVE":
            return None
        data = wav_data_bytes(path)
        if struct.unpack_from("<I", header, 40)[0] == data and struct.unpack_from("<I", header, 4)[0] == 36 + data:
            return None
        rate = wav_rate(header)
        file.seek(0)
        file.write(wav_header(rate, data))
        file.truncate(HEADER_BYTES + data)
    return data / (rate * 4) if rate else 0.0


# The writer thread's side


class _ChannelConverter:
    """One channel's audio to the file's format: its own resampler state, and the samples still due."""

    def __init__(self, rate: int) -> None:
        self.target = _slin_at(rate)
        self.per_tick = round(rate * TICK) * 2
        self._transcoder: Transcoder | None = None
        self._source: AudioFormat | None = None
        self._pending = b""
        self._primed = False

    def tick(self, payload: bytes, fmt: AudioFormat) -> bytes:
        """
        One tick of the file's samples for this channel (16-bit, mono). A
        resampler gives a sample more or less from one call to the next and
        holds some back at the start: silence is written until half a tick
        more than a tick is waiting, and that lead absorbs the jitter.
        """
        if self._transcoder is None or fmt != self._source:
            self._transcoder, self._source = Transcoder(fmt, self.target), fmt
        self._pending += self._transcoder.convert(payload)
        if not self._primed:
            if len(self._pending) < self.per_tick * 3 // 2:
                return bytes(self.per_tick)
            self._primed = True
        if len(self._pending) < self.per_tick:  # never in steady state: start the lead again
            self._pending, self._primed = self._pending + bytes(self.per_tick - len(self._pending)), False
        out, self._pending = self._pending[: self.per_tick], self._pending[self.per_tick :]
        return out


def _slin_at(rate: int) -> AudioFormat:
    for fmt in FORMATS.values():
        if fmt.sample_bytes == 2 and fmt.rate == rate:
            return fmt
    raise ValueError(f"no slin format at {rate} Hz")


@dataclass
class _Tick:
    """What each channel got in one tick: a raw payload and its format, or None for silence."""

    payloads: dict[Role, tuple[bytes, AudioFormat] | None]


class _WavFile:
    """A recording's file, written only by the writer thread."""

    def __init__(self, path: str, rate: int, silence: dict[Role, AudioFormat]) -> None:
        self.path = path
        self.rate = rate
        self.silence = silence
        self.channels = {role: _ChannelConverter(rate) for role in CHANNELS}
        self.file: BinaryIO | None = None
        self.data_bytes = 0

    def open(self) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        # Unbuffered: what a write returns is on its way to the disk, so the
        # header's count is what the file holds, even after a failed write.
        file = open(self.path, "wb", buffering=0)
        try:
            self._append(file, wav_header(self.rate, 0))  # sizes unknown yet: repaired if we crash
        except OSError:
            file.close()
            raise
        self.file = file

    @staticmethod
    def _append(file: BinaryIO, data: bytes) -> None:
        """All of C{data}, or an OSError with the file cut back to where it was."""
        start = file.tell()
        written = 0
        try:
            while written < len(data):
                written += file.write(data[written:]) or 0
        except OSError:
            if written:  # half a batch would shift every sample after it
                with contextlib.suppress(OSError):
                    file.truncate(start)
                file.seek(start)
            raise

    def write(self, ticks: list[_Tick]) -> int:
        if self.file is None:
            self.open()
        assert self.file is not None
        columns = []
        for role in CHANNELS:
            converter = self.channels[role]
            quiet = self.silence[role]
            parts = []
            for tick in ticks:
                entry = tick.payloads[role]
                payload, fmt = entry if entry is not None else (quiet.silence_frame[3:], quiet)
                parts.append(converter.tick(payload, fmt))
            columns.append(np.frombuffer(b"".join(parts), dtype="<i2"))
        stereo = np.empty(len(columns[0]) * 2, dtype="<i2")
        stereo[0::2], stereo[1::2] = columns
        data = stereo.tobytes()
        self._append(self.file, data)
        self.data_bytes += len(data)
        return len(data)

    def close(self) -> int:
        """Complete the header and close; the bytes of audio written."""
        if self.file is None:
            self.open()
        assert self.file is not None
        try:
            self.file.seek(0)
            self.file.write(wav_header(self.rate, self.data_bytes))
        finally:
            self.file.close()
        return self.data_bytes


# The reactor's side


@dataclass
class _Channel:
    pending: dict[int, tuple[bytes, AudioFormat]] = field(default_factory=dict)
    next: int = 0


@implementer(ILegTap)
class _Tap:
    """Hears one leg for a recording: what it sends (ILegTap), or what it hears."""

    def __init__(self, recording: CallRecording, role: Role, fmt: AudioFormat) -> None:
        self.recording = recording
        self.role = role
        self.format = fmt

    def legAudio(self, frame: Frame) -> None:
        fmt = self.format if frame.kind == self.format.kind else SLIN_BY_KIND.get(frame.kind)
        if fmt is not None:
            self.recording.frame(self.role, frame.payload, fmt)

    def legDtmf(self, digit: str) -> None:
        pass

    def legHeard(self, data: bytes) -> None:
        """An encoded frame written to the leg (the C{heard} mix)."""
        if data[0] == self.format.kind:
            self.recording.frame(self.role, data[3:], self.format)


class CallRecording:
    """One call's recording as the reactor keeps it: the timeline and the ticks not yet written."""

    def __init__(self, recorder: Recorder, call_id: str, path: str, name: str, started: float) -> None:
        self.recorder = recorder
        self.call_id = call_id
        self.path = path
        self.name = name
        self.started = started
        self.rate = max(fmt.rate for fmt in recorder.formats.values())
        self.channels = {role: _Channel() for role in CHANNELS}
        self.file = _WavFile(path, self.rate, recorder.formats)
        self.flushed = 0  # ticks before this one went to the writer
        self.unwritten = 0  # ticks with the writer, not written yet
        self.dropped = 0
        self.bytes = 0
        self.taps: dict[ILeg, _Tap] = {}
        self.stopping: Deferred[None] | None = None
        self._failureLogged = False

    def _index(self) -> int:
        return int((self.recorder.reactor.seconds() - self.started) / TICK)

    def frame(self, role: Role, payload: bytes, fmt: AudioFormat) -> None:
        channel = self.channels[role]
        index = max(self._index(), channel.next, self.flushed)
        channel.pending[index] = (payload, fmt)
        channel.next = index + 1

    def attach(self, leg: ILeg) -> None:
        if leg in self.taps:
            return
        tap = self.taps[leg] = _Tap(self, leg.role, leg.format)
        if self.recorder.mix is Mix.HEARD:
            leg.heard.append(tap)
        else:
            leg.taps.append(tap)

    def detach(self, leg: ILeg) -> None:
        tap = self.taps.pop(leg, None)
        if tap is not None:
            for taps in (leg.taps, leg.heard):
                if tap in taps:
                    taps.remove(tap)

    def flush(self, everything: bool = False) -> None:
        """Hand the ticks that are over to the writer (all of them when stopping)."""
        if everything:  # to the last frame filed, even one a burst pushed past now
            upto = max(self._index() + 1, *(channel.next for channel in self.channels.values()))
        else:
            upto = self._index() - LATE_TICKS + 1
        if upto <= self.flushed:
            return
        ticks = [
            _Tick({role: self.channels[role].pending.pop(index, None) for role in CHANNELS})
            for index in range(self.flushed, upto)
        ]
        self.flushed = upto
        if self.unwritten * TICK >= MAX_UNWRITTEN_SECONDS:
            lost = sum(1 for tick in ticks for entry in tick.payloads.values() if entry is not None)
            self._drop(lost, f"the disk is too slow: over {MAX_UNWRITTEN_SECONDS:g} s of audio waits to be written")
            return
        self.unwritten += len(ticks)
        done = self.recorder.run(self.file.write, ticks)
        done.addBoth(self._written, ticks)

    def _written(self, result: int | Failure, ticks: list[_Tick]) -> None:
        self.unwritten -= len(ticks)
        if isinstance(result, Failure):
            lost = sum(1 for tick in ticks for entry in tick.payloads.values() if entry is not None)
            self._drop(lost, result.getErrorMessage() or type(result.value).__name__)
        else:
            self.bytes += result
            self.recorder.wrote(result)

    def _drop(self, frames: int, why: str) -> None:
        self.dropped += frames
        self.recorder.droppedFrames(frames)
        if not self._failureLogged:
            self._failureLogged = True
            self.recorder.log.warn(
                "{call_id} recording {name}: audio dropped, the call goes on: {why} (logged once per call)",
                call_id=self.call_id, name=self.name, why=why,
            )

    def summary(self) -> dict[str, Any]:
        return {"file": self.name, "started_at": _iso(self.started), "dropped_frames": self.dropped}


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class RecordingConfig:
    """The --record* options."""

    directory: str | None = None  # where recordings go; None: not on
    every_call: bool = False  # --record DIR: every call, from its first leg's UUID
    mix: Mix = Mix.SENT
    keep_days: float = 0.0  # 0: kept forever


@implementer(ILegObserver)
class Recorder:
    """Every recording of this instance, their timer and their writer thread."""

    log = Logger()

    def __init__(
        self,
        config: RecordingConfig,
        reactor: IReactor,
        formats: dict[Role, AudioFormat],
        *,
        metrics: Any = None,
        registry: Any = None,
    ) -> None:
        self.config = config
        self.directory = config.directory
        self.mix = config.mix
        self.reactor = reactor
        self.formats = formats
        self.metrics = metrics
        self.registry = registry
        #: Recordings under way, by call id.
        self.active: dict[str, CallRecording] = {}
        #: Files named but maybe not on disk yet (the writer opens them): never given twice.
        self._claimed: set[str] = set()
        self._pool = ThreadPool(1, 1, name="audiohangup-recordings")
        self._loop: LoopingCall | None = None
        self._pruning: IDelayedCall | None = None

    # Life

    def start(self) -> Deferred[Any]:
        """Start the writer thread; repair what a crash left, and prune; then flush every 100 ms."""
        self._pool.start()
        self._loop = LoopingCall(self._flushAll)
        self._loop.clock = self.reactor
        self._loop.start(FLUSH_INTERVAL, now=False)
        if self.directory is None or not os.path.isdir(self.directory):
            if self.config.keep_days:
                self._schedulePrune()
            return Deferred.fromCoroutine(_done())  # nothing there to repair or prune yet
        return self.run(self._tidy).addCallback(self._tidied).addErrback(self._tidyFailed)

    async def stop(self) -> None:
        """Finish every recording (headers completed), then stop the thread."""
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self._pruning is not None and self._pruning.active():
            self._pruning.cancel()
        for call_id in list(self.active):
            try:
                await self.finish(call_id)
            except Exception:
                self.log.failure("{call_id} recording could not be finished", call_id=call_id)
        if self._pool.started:
            self._pool.stop()

    def run(self, work: Callable[..., Any], *args: Any) -> Deferred[Any]:
        return deferToThreadPool(self.reactor, self._pool, work, *args)

    def _flushAll(self) -> None:
        for recording in list(self.active.values()):
            recording.flush()

    # Starting and stopping one call's recording

    def begin(self, call_id: str, legs: list[ILeg]) -> CallRecording:
        if self.directory is None:
            raise ApiError(404, "recording_off", "recording is off: start the server with --record-dir or --record")
        if call_id in self.active:
            raise ApiError(409, "already_recording", f"call {call_id} is being recorded already")
        now = self.reactor.seconds()
        day = datetime.fromtimestamp(time.time(), timezone.utc).strftime("%Y-%m-%d")
        name = self._freeName(day, call_id)
        recording = CallRecording(self, call_id, os.path.join(self.directory, name), name, now)
        self.active[call_id] = recording
        self._claimed.add(recording.path)
        for leg in legs:
            recording.attach(leg)
            leg.recording = name
        if self.metrics is not None:
            self.metrics.recording_started()
        self.log.info("{call_id} recording into {name}", call_id=call_id, name=name)
        return recording

    def _freeName(self, day: str, call_id: str) -> str:
        """
        C{DAY/<call id>.wav}; a second recording of the call that day (a
        DELETE then a POST, a leg that came back) gets C{-2}, then C{-3}:
        never the first one's file, which C{open} would truncate.
        """
        assert self.directory is not None
        number = 1
        while True:
            name = f"{day}/{_wav_name(call_id, number)}"
            path = os.path.join(self.directory, name)
            # A regular file is a recording already; anything else there (a
            # link to a device, say) is where the operator wants this one.
            if path not in self._claimed and not os.path.isfile(path):
                return name
            number += 1

    def finish(self, call_id: str) -> Deferred[None]:
        """Stop a recording: what is left is written, the header completed; fires once it is on disk."""
        recording = self.active.pop(call_id, None)
        if recording is None:
            raise ApiError(404, "not_recording", f"call {call_id} is not being recorded")
        for leg in list(recording.taps):
            recording.detach(leg)
        recording.flush(everything=True)
        closing = self.run(recording.file.close)

        def closed(result: object) -> None:
            self._claimed.discard(recording.path)  # on disk now, or never to be: exists() says
            if isinstance(result, Failure):
                recording._drop(0, result.getErrorMessage() or type(result.value).__name__)
            seconds = recording.flushed * TICK
            self.log.info(
                "{call_id} recording {name} done: {seconds:.2f} s, {dropped} frames dropped",
                call_id=call_id, name=recording.name, seconds=seconds, dropped=recording.dropped,
            )
            if self.metrics is not None:
                self.metrics.recording_finished()

        return closing.addBoth(closed)

    def resource(self, call_id: str) -> WavResource | None:
        """The file of a call's recording as a resource, live or done (the newest day first), or None."""
        recording = self.active.get(call_id)
        if recording is not None:
            return WavResource(recording.path, recording.rate)
        path = self._done(call_id)
        if path is None:
            return None
        with open(path, "rb") as file:
            return WavResource(path, wav_rate(file.read(HEADER_BYTES)))

    def _done(self, call_id: str) -> str | None:
        if self.directory is None or not os.path.isdir(self.directory):
            return None
        for day in sorted((d for d in os.listdir(self.directory) if _DAY.match(d)), reverse=True):
            folder = os.path.join(self.directory, day)
            numbers = [
                int(match["n"] or 1) for match in map(_WAV_NAME.match, os.listdir(folder))
                if match is not None and match["call"] == call_id
            ]
            if numbers:  # the call's last recording of its last day
                return os.path.join(folder, _wav_name(call_id, max(numbers)))
        return None

    # Counting

    def wrote(self, data_bytes: int) -> None:
        if self.metrics is not None:
            self.metrics.recording_bytes(data_bytes)

    def droppedFrames(self, frames: int) -> None:
        if self.metrics is not None:
            self.metrics.recording_dropped(frames)

    # ILegObserver: legs join and leave the recordings of their calls

    def legStarted(self, leg: ILeg) -> None:
        assert leg.call_id is not None
        recording = self.active.get(leg.call_id)
        if recording is None and self.config.every_call and self.directory is not None:
            recording = self.begin(leg.call_id, [])
        if recording is not None:
            recording.attach(leg)
            leg.recording = recording.name

    def hangupSent(self, leg: ILeg, cause: HangupCause) -> None:
        pass

    def legEnded(self, leg: ILeg) -> None:
        recording = self.active.get(leg.call_id or "")
        if recording is not None:
            recording.detach(leg)

    def callEnded(self, call_id: str) -> None:
        if call_id in self.active:
            self.finish(call_id)

    def connectionEnded(self, connection: ILeg) -> None:
        pass

    # Start-up repairs and retention (on the writer thread)

    def _tidy(self) -> tuple[list[tuple[str, float]], int]:
        """Repair every WAV a crash left; delete the days older than --record-days."""
        assert self.directory is not None
        repaired = []
        removed = self._prune()
        if os.path.isdir(self.directory):
            for day in sorted(d for d in os.listdir(self.directory) if _DAY.match(d)):
                folder = os.path.join(self.directory, day)
                for name in sorted(os.listdir(folder)):
                    if _WAV_NAME.match(name):
                        seconds = repair(os.path.join(folder, name))
                        if seconds is not None:
                            repaired.append((f"{day}/{name}", seconds))
        return repaired, removed

    def _prune(self) -> int:
        if not self.config.keep_days or self.directory is None or not os.path.isdir(self.directory):
            return 0
        cutoff = (datetime.now(timezone.utc) - timedelta(days=self.config.keep_days)).strftime("%Y-%m-%d")
        removed = 0
        for day in os.listdir(self.directory):
            if _DAY.match(day) and day < cutoff:
                folder = os.path.join(self.directory, day)
                removed += sum(1 for name in os.listdir(folder) if name.endswith(".wav"))
                shutil.rmtree(folder, ignore_errors=True)
        return removed

    def _tidied(self, result: tuple[list[tuple[str, float]], int]) -> None:
        repaired, removed = result
        for name, seconds in repaired:
            self.log.warn(
                "recording {name} was left open by an earlier run: header repaired, {seconds:.2f} s kept",
                name=name, seconds=seconds,
            )
        self._pruned(removed)
        if self.config.keep_days:
            self._schedulePrune()

    def _tidyFailed(self, failure: Failure) -> None:
        self.log.error("recordings in {directory} could not be checked: {why}", directory=self.directory,
                       why=failure.getErrorMessage())

    def _schedulePrune(self) -> None:
        """Once a day, as the call records are pruned."""

        def prune() -> None:
            self.run(self._prune).addCallback(self._pruned).addErrback(self._tidyFailed)
            self._schedulePrune()

        self._pruning = self.reactor.callLater(86400.0, prune)

    def _pruned(self, removed: int) -> None:
        if removed:
            self.log.info("{count} recordings older than {days:g} days deleted", count=removed, days=self.config.keep_days)

    @staticmethod
    def check_directory(path: str) -> None:
        """A directory recordings can go to: it is, or can be made; else a ValueError saying why (start-up fails)."""
        folder = os.path.abspath(path)
        existing = folder
        while not os.path.exists(existing):
            existing = os.path.dirname(existing)
        if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
            raise ValueError(f"{folder} cannot be made or written")


async def _done() -> None:
    return None


# Serving a recording


class _Limited:
    """A file read up to C{limit} bytes: a recording still written grows past what the answer announced."""

    def __init__(self, file: BinaryIO, limit: int) -> None:
        self.file = file
        self.left = limit

    def read(self, size: int = -1) -> bytes:
        if self.left <= 0:
            return b""
        data = self.file.read(self.left if size < 0 else min(size, self.left))
        self.left -= len(data)
        return data

    def close(self) -> None:
        self.file.close()


class WavResource(Resource):
    """
    A recording as C{audio/wav}: a header true to what the file holds now
    (a live recording's own says nothing yet), then its data, streamed.
    """

    isLeaf = True

    def __init__(self, path: str, rate: int) -> None:
        super().__init__()
        self.path = path
        self.rate = rate  # for a recording whose file the writer has not opened yet

    def render_GET(self, request: Any) -> Any:
        request.setHeader(b"content-type", b"audio/wav")
        try:
            file = open(self.path, "rb")  # closed when the transfer ends
        except FileNotFoundError:  # just started: nothing written yet
            return wav_header(self.rate, 0)
        header = file.read(HEADER_BYTES)
        data = wav_data_bytes(self.path)
        request.setHeader(b"content-length", str(HEADER_BYTES + data).encode())
        request.write(wav_header(wav_rate(header), data))
        limited = _Limited(file, data)
        done = FileSender().beginFileTransfer(limited, request)

        def finished(_: object) -> None:
            limited.close()
            if not request.finished and not getattr(request, "_disconnected", False):
                request.finish()

        done.addBoth(finished)
        return NOT_DONE_YET

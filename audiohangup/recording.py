# -*- test-case-name: tests.test_recording -*-
"""
Call recording: one stereo WAV per call, visitor left, resident right.

Both channels share one 20 ms timeline from the recording's start. A
channel's audio is filed by its duration, not by frames: a frame fills what
is left of the channel's current tick, then the ticks after it, never one
before the tick it arrived in; so frames of any length (Asterisk may send 10
or 30 ms) sent in real time keep pace with the clock. A tick in which a leg
sent nothing (not joined yet, gone, silent), or the rest of one it left
part-filled, is silence there, so the channels stay in step for the whole call.

The reactor only files audio under its ticks. Every 100 ms the ticks that
are over go, as a batch, to one writer thread of the recorder's own, which
converts them (G.711 decoded, resampled to the file's rate, the higher of
the legs'), interleaves and appends them, and flushes. A leg cannot run the recording
ahead of the clock: audio more than L{MAX_AHEAD_SECONDS} ahead is dropped and
counted, as a jitter buffer past its C{jbmaxsize} would, so a call holds at
most about a second of audio in memory whatever its legs send. A disk that
is slow or full drops audio, counted and logged once per call, and never
delays or ends a call.

A WAV's header says its size only once the recording stops; a file a crash
left is repaired at the next start (its header rewritten from its size).

The folders and files the recorder makes are the owner's only (0700, 0600:
a call's audio is private), and it never follows a symbolic link in the
record directory: a file is created with C{O_EXCL}/C{O_NOFOLLOW} in a day
folder opened with C{O_NOFOLLOW}, and a link found there is skipped with a
warning, never served nor repaired. Looking a finished recording up touches
the disk on a thread of its own, never on the reactor; once the recorder
stops, a lookup is refused at once (L{RecorderStopped}), as that thread is
going: a request is never left waiting on a thread that will not run it.
"""

from __future__ import annotations

import contextlib
import enum
import json
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
from prometheus_client import CollectorRegistry, Counter, Gauge
from twisted.internet.defer import Deferred, fail, succeed
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
from audiohangup.lifecycle import Daily
from audiohangup.metrics import series
from audiohangup.reasons import HangupCause, Role
from audiohangup.wire import Frame

TICK = 0.020
#: How often the ticks that are over go to the writer.
FLUSH_INTERVAL = 0.1
#: A tick is over (no frame can still land in it) this many ticks after it began.
LATE_TICKS = 2
#: Audio of one call waiting for the writer beyond which new audio is dropped.
MAX_UNWRITTEN_SECONDS = 0.5
#: How far ahead of the clock a leg's audio may be filed: a burst after a
#: half-second stall (a TCP retransmission, a busy Asterisk) still lands
#: whole; beyond it a leg is sending faster than real time and what runs
#: over is dropped (Asterisk's jitter buffer defaults to 200 ms, up to 1 s).
MAX_AHEAD_SECONDS = 0.5
MAX_AHEAD_TICKS = round(MAX_AHEAD_SECONDS / TICK)
#: The recorder's files and folders: the owner's only, whatever the umask.
FILE_MODE = 0o600
FOLDER_MODE = 0o700
HEADER_BYTES = 44
CHANNELS = (Role.VISITOR, Role.RESIDENT)
#: A call's recording, and a later one of the same call on the same day (-2, -3, ...).
_WAV_NAME = re.compile(r"^(?P<call>[0-9a-f-]{36})(?:-(?P<n>[1-9][0-9]*))?\.wav$")
_DAY = re.compile(r"^\d{4}-\d{2}-\d{2}$")


class RecorderStopped(RuntimeError):
    """The recorder is stopping (the server shuts down): a recording cannot be looked up now, only later."""


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


def wav_data_bytes(size: int, channels: int = 2) -> int:
    """The whole samples a WAV file of C{size} bytes holds, in bytes, whatever its header says."""
    data = size - HEADER_BYTES
    return max(0, data - data % (channels * 2))


def wav_rate(header: bytes) -> int | None:
    """The sample rate a WAV header says, or None if C{header} is not a whole one (a file a crash cut short)."""
    if len(header) < HEADER_BYTES or header[:4] != b"RIFF" or header[8:12] != b"WAVE":
        return None
    rate: int = struct.unpack_from("<I", header, 24)[0]
    return rate or None


def repair(path: str, rate: int = 0) -> float | None:
    """
    Rewrite a WAV header whose sizes disagree with the file (a recording a
    crash cut short): return the seconds of audio it holds, or None if the
    header was right. A partial last sample is cut off; a file cut within
    its header holds no audio and becomes an empty WAV at C{rate} (if given).
    A link is not followed (an OSError).
    """
    with os.fdopen(_open_in_folder(path, os.O_RDWR), "r+b") as file:
        header = file.read(HEADER_BYTES)
        if len(header) < HEADER_BYTES and rate:
            file.seek(0)
            file.write(wav_header(rate, 0))
            file.truncate(HEADER_BYTES)
            return 0.0
        header_rate = wav_rate(header)
        if header_rate is None:
            return None
        data = wav_data_bytes(os.fstat(file.fileno()).st_size)
        if struct.unpack_from("<I", header, 40)[0] == data and struct.unpack_from("<I", header, 4)[0] == 36 + data:
            return None
        file.seek(0)
        file.write(wav_header(header_rate, data))
        file.truncate(HEADER_BYTES + data)
    return data / (header_rate * 4)


# Files: no link followed, the owner's only


def _open_in_folder(path: str, flags: int) -> int:
    """
    A descriptor for C{path} that follows a link in neither of its last two
    parts (the day folder, the file): where one is, an OSError (C{ELOOP}).
    """
    folder = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        return os.open(os.path.basename(path), flags | os.O_NOFOLLOW, FILE_MODE, dir_fd=folder)
    finally:
        os.close(folder)


def _create(path: str) -> int:
    """A new recording's file, 0600: never one already there (C{O_EXCL}), nor a link's target."""
    fd = _open_in_folder(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    os.fchmod(fd, FILE_MODE)  # an odd umask may have taken the owner's bits too
    return fd


def _make_folders(path: str) -> None:
    """C{path} and its missing parents, each made 0700; one already there is left as it is."""
    parent = os.path.dirname(path)
    if parent and parent != path and not os.path.isdir(parent):
        _make_folders(parent)
    try:
        os.mkdir(path, FOLDER_MODE)
    except FileExistsError:
        return
    os.chmod(path, FOLDER_MODE)


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
        One tick of the file's samples for this channel (16-bit, mono), from
        one tick of C{payload} (the reactor files no more in a tick; a part
        filled one is padded with silence). A resampler gives a sample more
        or less from one call to the next and holds some back at the start:
        silence is written until half a tick more than a tick is waiting, and
        that lead absorbs the jitter.
        """
        if len(payload) < fmt.frame_bytes:  # the rest of a tick its leg left part-filled: silence
            payload += fmt.silence_frame[3 + len(payload) :]
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
        self.headed = False
        self.data_bytes = 0

    def open(self) -> None:
        """Create the file (once) and write its header (until that is done)."""
        if self.file is None:
            _make_folders(os.path.dirname(self.path))
            # Unbuffered: what a write returns is on its way to the disk, so the
            # header's count is what the file holds, even after a failed write.
            self.file = os.fdopen(_create(self.path), "wb", buffering=0)
        if not self.headed:
            self._append(self.file, wav_header(self.rate, 0))  # sizes unknown yet: repaired if we crash
            self.headed = True

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
        """Append C{ticks}: the bytes written."""
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
        try:
            self.open()
            assert self.file is not None
            self.file.seek(0)
            self.file.write(wav_header(self.rate, self.data_bytes))
        finally:
            if self.file is not None:
                self.file.close()
        return self.data_bytes


# The reactor's side


@dataclass
class _Channel:
    #: Each tick's audio: a tick's bytes at most, fewer in one left part-filled.
    pending: dict[int, tuple[bytes, AudioFormat]] = field(default_factory=dict)
    #: The tick its audio goes on in, and the bytes already there (fewer than a tick's).
    next: int = 0
    filled: int = 0
    #: Whether its leg was told (in the log) that it runs ahead of the clock.
    warned: bool = False


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
        self.rate = recorder.rate
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
        """
        File a frame's audio by its duration: it fills what is left of its
        channel's current tick, then the ticks after, a tick's bytes each,
        never a tick before now (a channel that fell behind, a tick already
        written, is left as it is). What would land L{MAX_AHEAD_TICKS} or
        more ahead of now is dropped, counted in ticks' worth (one at least).
        """
        channel = self.channels[role]
        now = self._index()
        size = fmt.frame_bytes
        index, filled = channel.next, channel.filled
        if index < max(now, self.flushed):
            index, filled = max(now, self.flushed), 0
        elif filled and channel.pending[index][1] != fmt:  # another format: a tick of its own
            index, filled = index + 1, 0
        room = (now + MAX_AHEAD_TICKS - index) * size - filled
        if room < len(payload):
            self._ahead(role, channel, -(-(len(payload) - max(room, 0)) // size))
            if room <= 0:
                return
            payload = payload[:room]
        offset = 0
        while offset < len(payload):
            piece = payload[offset : offset + size - filled]
            channel.pending[index] = (channel.pending[index][0] + piece, fmt) if filled else (piece, fmt)
            offset += len(piece)
            filled += len(piece)
            if filled == size:
                index, filled = index + 1, 0
        channel.next, channel.filled = index, filled

    def _ahead(self, role: Role, channel: _Channel, frames: int) -> None:
        """A leg sends faster than real time: its audio past the bound is dropped, counted, logged once per leg."""
        self.dropped += frames
        self.recorder.droppedFrames(frames)
        if not channel.warned:
            channel.warned = True
            self.recorder.log.warn(
                "{call_id} recording {name}: the {role} leg sends audio faster than real time;"
                " what runs over {seconds:g} s ahead is dropped (logged once per leg)",
                call_id=self.call_id, name=self.name, role=role, seconds=MAX_AHEAD_SECONDS,
            )

    def attach(self, leg: ILeg) -> None:
        if leg in self.taps:
            return
        self.channels[leg.role].warned = False
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
            upto = max(self._index() + 1, *(channel.next + (channel.filled > 0) for channel in self.channels.values()))
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
            return
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
        metrics: CollectorRegistry | None = None,
        registry: Any = None,
    ) -> None:
        self.config = config
        self.directory = config.directory
        self.mix = config.mix
        self.reactor = reactor
        self.formats = formats
        #: A recording's sample rate: the highest of the legs'.
        self.rate = max((fmt.rate for fmt in formats.values()), default=8000)
        metrics = metrics if metrics is not None else CollectorRegistry()  # none given: counted for nobody
        self.recordings_active = series(metrics, Gauge, "audiohangup_recordings_active", "Calls being recorded.")
        self.recordings_written = series(
            metrics, Counter, "audiohangup_recordings_written", "Recordings finished, their WAV header completed."
        )
        self.bytes_written = series(metrics, Counter, "audiohangup_recording_bytes", "Audio bytes written to recordings.")
        self.dropped_frames = series(
            metrics, Counter, "audiohangup_recording_dropped_frames", "Frames of audio not recorded: a disk too slow or full."
        )
        self.registry = registry
        #: Recordings under way, by call id.
        self.active: dict[str, CallRecording] = {}
        #: Files named but maybe not on disk yet (the writer opens them): never given twice.
        self._claimed: set[str] = set()
        self._pool = ThreadPool(1, 1, name="audiohangup-recordings")
        #: Finding a finished recording on disk: off the reactor, and never in the way of the writer's work.
        self._lookups = ThreadPool(1, 1, name="audiohangup-recording-lookups")
        self._loop: LoopingCall | None = None
        self._pruning: Daily | None = None
        self._stopping = False
        #: Work handed to each pool (by name) and not yet done, and who waits for it to be none.
        self._busy: dict[str, int] = {}
        self._idle: dict[str, list[Deferred[None]]] = {}

    # Life

    def start(self) -> Deferred[Any]:
        """Start the writer thread; repair what a crash left, and prune; then flush every 100 ms."""
        self._pool.start()
        self._lookups.start()
        self._loop = LoopingCall(self._flushAll)
        self._loop.clock = self.reactor
        self._loop.start(FLUSH_INTERVAL, now=False)
        if self.directory is None or not os.path.isdir(self.directory):
            if self.config.keep_days:
                self._schedulePrune()
            return Deferred.fromCoroutine(_done())  # nothing there to repair or prune yet
        return self.run(self._tidy).addCallback(self._tidied).addErrback(self._tidyFailed)

    async def stop(self) -> None:
        """
        Finish every recording (headers completed), then stop the threads,
        each once it is idle: the reactor never waits on a join (a lookup
        scanning a year of folders, a prune deleting one) but on a Deferred.
        """
        self._stopping = True  # lookups from now on are refused, not queued behind the end
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self._pruning is not None and self._pruning.running:
            self._pruning.stopService()
        for call_id in list(self.active):
            try:
                await self.finish(call_id)
            except Exception:
                self.log.failure("{call_id} recording could not be finished", call_id=call_id)
        for pool in (self._pool, self._lookups):
            if pool.started:
                if self._busy.get(pool.name or ""):
                    idle: Deferred[None] = Deferred()
                    self._idle.setdefault(pool.name or "", []).append(idle)
                    await idle  # what was queued is done
                pool.stop()  # idle now: the join is at once

    def run(self, work: Callable[..., Any], *args: Any) -> Deferred[Any]:
        return self._dispatch(self._pool, work, *args)

    def _dispatch(self, pool: ThreadPool, work: Callable[..., Any], *args: Any) -> Deferred[Any]:
        """C{work} on C{pool}, counted, so that L{stop} waits for it without joining a busy thread."""
        name = pool.name or ""
        self._busy[name] = self._busy.get(name, 0) + 1

        def done(result: Any) -> Any:
            self._busy[name] -= 1
            if not self._busy[name]:
                for idle in self._idle.pop(name, []):
                    # Next turn: the caller's own callbacks on this work run first.
                    self.reactor.callLater(0, idle.callback, None)
            return result

        return deferToThreadPool(self.reactor, pool, work, *args).addBoth(done)

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
        self.recordings_active.inc()
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
            # Anything there (a recording, a link: never followed) is not ours to write.
            if path not in self._claimed and not os.path.lexists(path):
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
            self.recordings_active.dec()
            self.recordings_written.inc()

        return closing.addBoth(closed)

    def find(self, call_id: str) -> Deferred[WavResource | None]:
        """
        The file of a call's recording as a resource, live or done (the
        newest day first), or None; the disk is searched on a thread of its
        own, as a year of day folders is no work for the reactor. Once the
        recorder stops, a L{RecorderStopped} at once: that thread is going.
        """
        recording = self.active.get(call_id)
        if recording is not None:
            return succeed(WavResource(recording.path, recording.rate))
        if self.directory is None:
            return succeed(None)
        if self._stopping:
            return fail(RecorderStopped("the server is shutting down: ask again once it is back"))

        def found(result: tuple[str | None, list[str]]) -> WavResource | None:
            path, links = result
            self._skipped(links)
            return None if path is None else WavResource(path, self.rate)

        return self._dispatch(self._lookups, _last_recording, self.directory, call_id).addCallback(found)

    def _skipped(self, links: list[str]) -> None:
        for name in links:
            self.log.warn("{name} in the record directory is a symbolic link: skipped, never followed", name=name)

    # Counting

    def wrote(self, data_bytes: int) -> None:
        self.bytes_written.inc(data_bytes)

    def droppedFrames(self, frames: int) -> None:
        self.dropped_frames.inc(frames)

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

    def _tidy(self) -> tuple[list[tuple[str, float]], list[tuple[str, str]], list[str], int]:
        """
        Repair every WAV a crash left; delete the days older than
        --record-days. A link is skipped, a file that cannot be repaired
        noted: neither stops the others.
        """
        assert self.directory is not None
        repaired: list[tuple[str, float]] = []
        failed: list[tuple[str, str]] = []
        links: list[str] = []
        removed = self._prune()
        for day in _days(self.directory, links):
            for entry in sorted(os.scandir(os.path.join(self.directory, day)), key=lambda entry: entry.name):
                name = f"{day}/{entry.name}"
                if not _WAV_NAME.match(entry.name):
                    continue
                if entry.is_symlink():
                    links.append(name)
                    continue
                try:
                    seconds = repair(entry.path, self.rate)
                except OSError as error:
                    failed.append((name, error.strerror or str(error)))
                    continue
                if seconds is not None:
                    repaired.append((name, seconds))
        return repaired, failed, links, removed

    def _prune(self) -> int:
        if not self.config.keep_days or self.directory is None:
            return 0
        cutoff = (datetime.now(timezone.utc) - timedelta(days=self.config.keep_days)).strftime("%Y-%m-%d")
        removed = 0
        for day in _days(self.directory, []):
            if day < cutoff:
                folder = os.path.join(self.directory, day)
                removed += sum(1 for name in os.listdir(folder) if name.endswith(".wav"))
                shutil.rmtree(folder, ignore_errors=True)
        return removed

    def _tidied(self, result: tuple[list[tuple[str, float]], list[tuple[str, str]], list[str], int]) -> None:
        repaired, failed, links, removed = result
        for name, seconds in repaired:
            self.log.warn(
                "recording {name} was left open by an earlier run: header repaired, {seconds:.2f} s kept",
                name=name, seconds=seconds,
            )
        for name, why in failed:
            self.log.warn("recording {name} could not be checked: {why}", name=name, why=why)
        self._skipped(links)
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

        self._pruning = Daily(prune, self.reactor)
        self._pruning.startService()

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


def _days(directory: str, links: list[str]) -> list[str]:
    """The day folders of the record directory, oldest first; links among them are added to C{links}, not followed."""
    if not os.path.isdir(directory):
        return []
    days = []
    for entry in os.scandir(directory):
        if _DAY.match(entry.name):
            if entry.is_symlink():
                links.append(entry.name)
            elif entry.is_dir(follow_symlinks=False):
                days.append(entry.name)
    return sorted(days)


def _last_recording(directory: str, call_id: str) -> tuple[str | None, list[str]]:
    """
    The path of a call's last recording (its highest number on its last
    day), and the links found on the way (skipped). Off the reactor: a day
    without the call's first file costs one C{lstat}, a year of days one
    listing of the directory and a few hundred of those.
    """
    links: list[str] = []
    for day in reversed(_days(directory, links)):
        folder = os.path.join(directory, day)
        if not os.path.lexists(os.path.join(folder, _wav_name(call_id, 1))):
            continue
        numbers = []
        for entry in os.scandir(folder):
            match = _WAV_NAME.match(entry.name)
            if match is not None and match["call"] == call_id:
                if entry.is_symlink():
                    links.append(f"{day}/{entry.name}")
                elif entry.is_file(follow_symlinks=False):
                    numbers.append(int(match["n"] or 1))
        if numbers:
            return os.path.join(folder, _wav_name(call_id, max(numbers))), links
    return None, links


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
    (a live recording's own says nothing yet, a crash may have cut it short),
    then its data, streamed.
    """

    isLeaf = True

    def __init__(self, path: str, rate: int) -> None:
        super().__init__()
        self.path = path
        self.rate = rate  # for a file whose header is not there (yet): what the recorder writes

    def render_GET(self, request: Any) -> Any:
        try:
            file = os.fdopen(_open_in_folder(self.path, os.O_RDONLY), "rb")  # closed when the transfer ends
        except FileNotFoundError:  # just started: nothing written yet
            request.setHeader(b"content-type", b"audio/wav")
            return wav_header(self.rate, 0)
        except OSError as error:  # a link put where the recording was since it was found: not followed
            request.setResponseCode(404)
            request.setHeader(b"content-type", b"application/json")
            message = f"{os.path.basename(self.path)} cannot be read: {error.strerror or error}"
            return json.dumps({"error": {"code": "no_recording", "message": message}}).encode()
        header = file.read(HEADER_BYTES)
        data = wav_data_bytes(os.fstat(file.fileno()).st_size)
        request.setHeader(b"content-type", b"audio/wav")
        request.setHeader(b"content-length", str(HEADER_BYTES + data).encode())
        request.write(wav_header(wav_rate(header) or self.rate, data))
        file.seek(HEADER_BYTES)
        limited = _Limited(file, data)
        done = FileSender().beginFileTransfer(limited, request)

        def finished(_: object) -> None:
            limited.close()
            if not request.finished and not getattr(request, "_disconnected", False):
                request.finish()

        done.addBoth(finished)
        return NOT_DONE_YET

# -*- test-case-name: tests.test_recording -*-
"""
The recorder: one stereo WAV per call, visitor left, resident right, from
taps on the legs to the writer thread, and the prune of old days.

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
the legs'), interleaves and appends them, and flushes (L{writer}). A leg
cannot run the recording ahead of the clock: audio more than
L{MAX_AHEAD_SECONDS} ahead is dropped and counted, as a jitter buffer past
its C{jbmaxsize} would, so a call holds at most about a second of audio in
memory whatever its legs send. A disk that is slow or full drops audio,
counted and logged once per call, and never delays or ends a call.

A WAV's header says its size only once the recording stops; a file a crash
left is repaired at the next start (its header rewritten from its size:
L{wav.repair}).

The folders and files the recorder makes are the owner's only, and it never
follows a symbolic link in the record directory (L{layout}); a link found
there is skipped with a warning, never served nor repaired. Looking a
finished recording up touches the disk on a thread of its own, never on the
reactor; once the recorder stops, a lookup is refused at once
(L{RecorderStopped}), as that thread is going: a request is never left
waiting on a thread that will not run it.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from audiohangup.audio import SLIN_BY_KIND, AudioFormat
from audiohangup.events import LegObserver
from audiohangup.interfaces import ILegObserver, ILegTap, IReactor, IServerLeg
from audiohangup.lifecycle import Daily, Part
from audiohangup.logs import iso_time
from audiohangup.metrics import series
from audiohangup.reasons import Role, StrEnum
from audiohangup.recording.layout import WAV_NAME, day_folders, last_recording, wav_name
from audiohangup.recording.wav import recording_sizes, repair
from audiohangup.recording.writer import CHANNELS, TICK, Tick, WavFile
from audiohangup.wire import Frame

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


class RecorderStopped(RuntimeError):
    """The recorder is stopping (the server shuts down): a recording cannot be looked up now, only later."""


class RecordingOff(Exception):
    """No recording directory is configured: no call can be recorded."""


class AlreadyRecording(Exception):
    """The call is being recorded already (with --record-every-call, every call is)."""

    def __init__(self, call_id: str) -> None:
        super().__init__(f"call {call_id} is being recorded already")


class NotRecording(LookupError):
    """The call is not being recorded."""

    def __init__(self, call_id: str) -> None:
        super().__init__(f"call {call_id} is not being recorded")


@dataclass(frozen=True)
class FoundRecording:
    """A call's recording on disk: its path, and the sample rate its header may not say yet (a live file)."""

    path: str
    rate: int


class Mix(StrEnum):
    """What each channel holds: what its leg C{sent} (the voices), or what it C{heard}."""

    SENT = "sent"
    HEARD = "heard"


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
        self.file = WavFile(path, self.rate, recorder.formats)
        self.flushed = 0  # ticks before this one went to the writer
        self.unwritten = 0  # ticks with the writer, not written yet
        self.dropped = 0
        self.bytes = 0
        self.taps: dict[IServerLeg, _Tap] = {}
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

    def attach(self, leg: IServerLeg) -> None:
        if leg in self.taps:
            return
        self.channels[leg.role].warned = False
        tap = self.taps[leg] = _Tap(self, leg.role, leg.format)
        leg.addTap(tap, heard=self.recorder.mix is Mix.HEARD)

    def detach(self, leg: IServerLeg) -> None:
        tap = self.taps.pop(leg, None)
        if tap is not None:
            leg.removeTap(tap)

    def flush(self, everything: bool = False) -> None:
        """Hand the ticks that are over to the writer (all of them when stopping)."""
        if everything:  # to the last frame filed, even one a burst pushed past now
            upto = max(self._index() + 1, *(channel.next + (channel.filled > 0) for channel in self.channels.values()))
        else:
            upto = self._index() - LATE_TICKS + 1
        if upto <= self.flushed:
            return
        ticks = [
            Tick({role: self.channels[role].pending.pop(index, None) for role in CHANNELS})
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

    def _written(self, result: int | Failure, ticks: list[Tick]) -> None:
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
        return {"file": self.name, "started_at": iso_time(self.started), "dropped_frames": self.dropped}


@dataclass(frozen=True)
class RecordingConfig:
    """The --recordings-* options and --record-every-call."""

    directory: str | None = None  # where recordings go; None: not on
    every_call: bool = False  # --record-every-call: every call, from its first leg's UUID
    mix: Mix = Mix.SENT
    keep_days: float = 0.0  # 0: kept forever


@implementer(ILegObserver)
class Recorder(Part, LegObserver):
    """Every recording of this instance, their timer and their writer thread."""

    name = "recorder"

    log = Logger()

    def __init__(
        self,
        config: RecordingConfig,
        reactor: IReactor,
        formats: dict[Role, AudioFormat],
        *,
        metrics: CollectorRegistry | None = None,
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

    def begin(self, call_id: str, legs: list[IServerLeg]) -> CallRecording:
        if self.directory is None:
            raise RecordingOff("recording is off: start the server with --recordings-dir")
        if call_id in self.active:
            raise AlreadyRecording(call_id)
        now = self.reactor.seconds()
        day = datetime.fromtimestamp(time.time(), timezone.utc).strftime("%Y-%m-%d")
        name = self._freeName(day, call_id)
        recording = CallRecording(self, call_id, os.path.join(self.directory, name), name, now)
        self.active[call_id] = recording
        self._claimed.add(recording.path)
        for leg in legs:
            recording.attach(leg)
            leg.setRecording(name)
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
            name = f"{day}/{wav_name(call_id, number)}"
            path = os.path.join(self.directory, name)
            # Anything there (a recording, a link: never followed) is not ours to write.
            if path not in self._claimed and not os.path.lexists(path):
                return name
            number += 1

    def finish(self, call_id: str) -> Deferred[None]:
        """Stop a recording: what is left is written, the header completed; fires once it is on disk."""
        recording = self.active.pop(call_id, None)
        if recording is None:
            raise NotRecording(call_id)
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

    def find(self, call_id: str) -> Deferred[FoundRecording | None]:
        """
        The file of a call's recording, live or done (the newest day
        first), or None; the disk is searched on a thread of its
        own, as a year of day folders is no work for the reactor. Once the
        recorder stops, a L{RecorderStopped} at once: that thread is going.
        """
        recording = self.active.get(call_id)
        if recording is not None:
            return succeed(FoundRecording(recording.path, recording.rate))
        if self.directory is None:
            return succeed(None)
        if self._stopping:
            return fail(RecorderStopped("the server is shutting down: ask again once it is back"))

        def found(result: tuple[str | None, list[str]]) -> FoundRecording | None:
            path, links = result
            self._skipped(links)
            return None if path is None else FoundRecording(path, self.rate)

        return self._dispatch(self._lookups, last_recording, self.directory, call_id).addCallback(found)

    def sizes(self, names: list[str]) -> Deferred[dict[str, tuple[int, float]]]:
        """
        The bytes and seconds of these recordings (names relative to the
        directory, as the call records keep them), looked up on the lookup
        thread; a file missing (pruned), a link, or a name outside the
        directory is left out. Once the recorder stops, a L{RecorderStopped}.
        """
        if self.directory is None or not names:
            return succeed({})
        if self._stopping:
            return fail(RecorderStopped("the server is shutting down: ask again once it is back"))
        return self._dispatch(self._lookups, recording_sizes, self.directory, names)

    def _skipped(self, links: list[str]) -> None:
        for name in links:
            self.log.warn("{name} in the record directory is a symbolic link: skipped, never followed", name=name)

    # Counting

    def wrote(self, data_bytes: int) -> None:
        self.bytes_written.inc(data_bytes)

    def droppedFrames(self, frames: int) -> None:
        self.dropped_frames.inc(frames)

    # ILegObserver: legs join and leave the recordings of their calls

    def legStarted(self, leg: IServerLeg) -> None:
        assert leg.call_id is not None
        recording = self.active.get(leg.call_id)
        if recording is None and self.config.every_call and self.directory is not None:
            recording = self.begin(leg.call_id, [])
        if recording is not None:
            recording.attach(leg)
            leg.setRecording(recording.name)

    def legEnded(self, leg: IServerLeg) -> None:
        recording = self.active.get(leg.call_id or "")
        if recording is not None:
            recording.detach(leg)

    def callEnded(self, call_id: str) -> None:
        if call_id in self.active:
            self.finish(call_id)

    # Start-up repairs and retention (on the writer thread)

    def _tidy(self) -> tuple[list[tuple[str, float]], list[tuple[str, str]], list[str], int]:
        """
        Repair every WAV a crash left; delete the days older than
        --recordings-days. A link is skipped, a file that cannot be repaired
        noted: neither stops the others.
        """
        assert self.directory is not None
        repaired: list[tuple[str, float]] = []
        failed: list[tuple[str, str]] = []
        links: list[str] = []
        removed = self._prune()
        for day in day_folders(self.directory, links):
            for entry in sorted(os.scandir(os.path.join(self.directory, day)), key=lambda entry: entry.name):
                name = f"{day}/{entry.name}"
                if not WAV_NAME.match(entry.name):
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
        for day in day_folders(self.directory, []):
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

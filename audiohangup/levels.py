# -*- test-case-name: tests.test_levels -*-
"""
The audio level of each live leg, in and out, and when it last had voice:
what the live page's meters and C{GET /calls} show.

Cheap by sampling, never per frame: a leg keeps a reference to the last frame
it received and the last it was sent (two attribute stores on paths that
exist anyway, no copy, no arithmetic), and one timer for every leg, five
times a second, measures those frames (C{audioop.rms}, C (the stdlib's up to
Python 3.12, C{audioop-lts} after), a fraction of a microsecond a frame). A
leg's level is the loudest of its last five samples (about a second); a
frame already measured (no new audio came) counts as silence. Voice is a
sample above L{VOICE_DBFS}, a plain energy threshold: enough to tell dead air
from a conversation, not a voice activity detector.

L{Levels} is the sans-IO core (tests feed it legs and a Clock);
L{LevelSampler} is its timer, running only while some leg lives.
"""

from __future__ import annotations

import math
import warnings
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from zope.interface import implementer

from audiohangup.audio import SLIN_BY_KIND, AudioFormat
from audiohangup.events import LegObserver
from audiohangup.interfaces import ILegObserver, IServerLeg
from audiohangup.logs import iso_time
from audiohangup.wire import HEADER_SIZE, Frame

with warnings.catch_warnings():
    # As in audiohangup.codecs: 3.11 and 3.12 warn that audioop goes in 3.13,
    # where the audioop-lts package (a dependency there) is the same module.
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

__all__ = ["MIN_DBFS", "SAMPLE_INTERVAL", "VOICE_DBFS", "LevelSampler", "Levels", "frame_dbfs"]

#: What digital silence reads (a level of 0 has no logarithm); u-law's quietest step is about -78 dBFS.
MIN_DBFS = -90.0
#: A sample at or above this is voice (speech is -30 to -15 dBFS RMS, a quiet line's noise -60 or less).
VOICE_DBFS = -45.0
#: Seconds between two samples of every leg.
SAMPLE_INTERVAL = 0.2
#: Samples a level is the loudest of: about a second.
WINDOW = 5

_FULL_SCALE = 32768.0


def frame_dbfs(payload: bytes | memoryview, fmt: AudioFormat) -> float:
    """
    The RMS level of one frame's samples in dBFS (a full-scale square wave is
    0, a full-scale sine -3), at least L{MIN_DBFS}. G.711 is decoded first.
    """
    if fmt.sample_bytes == 2:
        if len(payload) % 2:
            payload = payload[:-1]
        rms = audioop.rms(payload, 2)  # sums squares, whatever the byte order
    else:
        decoder = audioop.alaw2lin if fmt.name == "alaw" else audioop.ulaw2lin
        rms = audioop.rms(decoder(payload, 2), 2)
    if rms <= 0:
        return MIN_DBFS
    return max(MIN_DBFS, 20 * math.log10(rms / _FULL_SCALE))


def _measure(seen: bytes | Frame | None, fmt: AudioFormat) -> float | None:
    """The level of a frame as a leg keeps it: a Frame, or encoded bytes (header first); None if not audio."""
    if seen is None:
        return None
    if isinstance(seen, Frame):
        kind, payload = seen.kind, memoryview(seen.payload)
    else:
        if len(seen) <= HEADER_SIZE:
            return None
        kind, payload = seen[0], memoryview(seen)[HEADER_SIZE:]
    chosen = fmt if kind == fmt.kind else SLIN_BY_KIND.get(kind)
    if chosen is None or not payload:
        return None
    return frame_dbfs(payload, chosen)


@dataclass
class _Direction:
    """One way of one leg: its last samples (newest last) and the frame last measured."""

    samples: deque[float] = field(default_factory=lambda: deque(maxlen=WINDOW))
    last: object = None

    def sample(self, seen: bytes | Frame | None, fmt: AudioFormat, cache: dict[int, float | None]) -> float | None:
        if seen is None:
            return None
        if seen is self.last:
            level: float | None = MIN_DBFS  # nothing new since the last sample: no audio
        else:
            key = id(seen)  # a bridged frame is one leg's in and the other's out: measured once
            level = cache[key] if key in cache else cache.setdefault(key, _measure(seen, fmt))
            self.last = seen
        if level is not None:
            self.samples.append(level)
        return level

    def level(self) -> float | None:
        return round(max(self.samples), 1) if self.samples else None


@dataclass
class _Meter:
    incoming: _Direction = field(default_factory=_Direction)
    outgoing: _Direction = field(default_factory=_Direction)
    voice_at: float | None = None


class Levels:
    """Every live leg's levels, updated by L{sample}; pure, the clock only tells the time of voice."""

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self._meters: dict[IServerLeg, _Meter] = {}

    def __len__(self) -> int:
        return len(self._meters)

    def sample(self, legs: Iterable[IServerLeg]) -> None:
        """Measure the last frame each way of each leg; a leg not among C{legs} is forgotten."""
        now = self.clock.seconds()
        cache: dict[int, float | None] = {}
        meters: dict[IServerLeg, _Meter] = {}
        for leg in legs:
            meter = self._meters.get(leg) or _Meter()
            meters[leg] = meter
            fmt = leg.format
            heard = meter.incoming.sample(leg.last_in, fmt, cache)
            if heard is not None and heard >= VOICE_DBFS:
                meter.voice_at = now
            meter.outgoing.sample(leg.last_out, fmt, cache)
        self._meters = meters

    def forget(self, leg: IServerLeg) -> None:
        self._meters.pop(leg, None)

    @staticmethod
    def unknown() -> dict[str, Any]:
        """The view of a leg not measured (yet, or at all)."""
        return {"level_in_dbfs": None, "level_out_dbfs": None, "voice_at": None}

    def view(self, leg: IServerLeg) -> dict[str, Any]:
        """What the API shows: the levels in and out (dBFS, None before any audio) and the last voice in."""
        meter = self._meters.get(leg)
        if meter is None:
            return self.unknown()
        return {
            "level_in_dbfs": meter.incoming.level(),
            "level_out_dbfs": meter.outgoing.level(),
            "voice_at": None if meter.voice_at is None else iso_time(meter.voice_at),
        }


@implementer(ILegObserver)
class LevelSampler(LegObserver):
    """
    The timer of L{Levels}: one C{LoopingCall} for every leg, started by the
    first leg and stopped when none is left, so an idle server has no timer.
    A leg observer (not a counting one): it only learns when legs come and go.
    """

    def __init__(
        self, levels: Levels, legs: Callable[[], Iterable[IServerLeg]], clock: IReactorTime,
        interval: float = SAMPLE_INTERVAL,
    ) -> None:
        self.levels = levels
        self.legs = legs
        self.clock = clock
        self.interval = interval
        self._loop: LoopingCall | None = None

    @property
    def running(self) -> bool:
        return self._loop is not None and self._loop.running

    def _tick(self) -> None:
        legs = list(self.legs())
        self.levels.sample(legs)
        if not legs:
            self.stop()

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    def legStarted(self, leg: IServerLeg) -> None:
        if not self.running:
            self._loop = LoopingCall(self._tick)
            self._loop.clock = self.clock
            self._loop.start(self.interval, now=False)

    def legEnded(self, leg: IServerLeg) -> None:
        self.levels.forget(leg)

    def callEnded(self, call_id: str) -> None:
        if next(iter(self.legs()), None) is None:
            self.stop()  # the last call is gone: no timer left behind (the tick would stop it too)

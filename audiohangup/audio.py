# -*- test-case-name: tests.test_flows,tests.test_stream_rules,tests.test_codecs -*-
"""
Audio formats a leg can carry, the settings every leg shares (its format,
queue bound and timeouts), and the bounded queues of frames waiting to be
paced out to a leg. Pure code, no I/O.

The dialplan decides the format, not the server: C{AudioSocket()} always sends
slin 8 kHz; C{Dial(AudioSocket/...)} sends C{c(slin16)} and friends under their
own kinds (Asterisk 20.17, 21.12, 22.7, 23.1 and later), and without C{c(...)}
the negotiated codec, u-law or A-law, under kind 0x10 in 160-byte frames.
C{--audio} declares which one to expect and to send.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Final

from audiohangup.wire import Kind, encode_frame

#: The AudioSocket cadence: one frame every 20 ms.
FRAME_MS: Final = 20
FRAME_SECONDS: Final = FRAME_MS / 1000


@dataclass(frozen=True)
class AudioFormat:
    """One frame of 20 ms in a given encoding, and what silence is in it."""

    name: str
    kind: Kind
    rate: int
    sample_bytes: int
    silence_byte: int
    content_type: str

    @property
    def frame_bytes(self) -> int:
        return round(self.rate * FRAME_SECONDS) * self.sample_bytes

    @cached_property
    def silence_frame(self) -> bytes:
        """One encoded 20 ms frame of silence: zero samples, 0xFF for u-law, 0xD5 for A-law."""
        return encode_frame(self.kind, bytes([self.silence_byte]) * self.frame_bytes)

    def frames(self, audio: bytes) -> list[bytes]:
        """Cut raw audio into encoded 20 ms frames; the last one is padded with silence."""
        size = self.frame_bytes
        padding = bytes([self.silence_byte]) * ((-len(audio)) % size)
        audio += padding
        return [encode_frame(self.kind, audio[i : i + size]) for i in range(0, len(audio), size)]


def _slin(name: str, kind: Kind, rate: int) -> AudioFormat:
    return AudioFormat(name, kind, rate, 2, 0x00, f"audio/L16;rate={rate}")


FORMATS: Final[dict[str, AudioFormat]] = {
    fmt.name: fmt
    for fmt in (
        _slin("slin", Kind.SLIN, 8000),
        _slin("slin12", Kind.SLIN12, 12000),
        _slin("slin16", Kind.SLIN16, 16000),
        _slin("slin24", Kind.SLIN24, 24000),
        _slin("slin32", Kind.SLIN32, 32000),
        _slin("slin44", Kind.SLIN44, 44100),
        _slin("slin48", Kind.SLIN48, 48000),
        _slin("slin96", Kind.SLIN96, 96000),
        _slin("slin192", Kind.SLIN192, 192000),
        AudioFormat("ulaw", Kind.SLIN, 8000, 1, 0xFF, "audio/PCMU"),
        AudioFormat("alaw", Kind.SLIN, 8000, 1, 0xD5, "audio/PCMA"),
    )
}

SLIN: Final = FORMATS["slin"]

#: The slin format each audio kind names (kind 0x10 is slin 8 kHz unless a leg declares G.711).
SLIN_BY_KIND: Final[dict[int, AudioFormat]] = {fmt.kind: fmt for fmt in FORMATS.values() if fmt.sample_bytes == 2}


@dataclass(frozen=True)
class LegSettings:
    """What every leg shares: its audio format, queue bound and timeouts (0 is off)."""

    close_timeout: float = 2.0
    uuid_timeout: float = 5.0
    audio: AudioFormat = SLIN
    max_queue_ms: int = 1000
    idle_timeout: float = 0.0
    max_duration: float = 0.0
    playout_timeout: float = 10.0
    max_legs: int = 2000
    max_unsent_ms: int = 2000
    #: Connections without their UUID yet from one source (0: no cap); see L{audiohangup.sources.source_of}.
    max_pending_per_source: int = 32

    @property
    def max_queue_frames(self) -> int:
        return max(1, int(self.max_queue_ms / (FRAME_SECONDS * 1000)))

    @property
    def max_unsent_bytes(self) -> int:
        """Outbound bytes a leg may leave unsent before it counts as a slow consumer."""
        frames = max(1, int(self.max_unsent_ms / (FRAME_SECONDS * 1000)))
        return frames * len(self.audio.silence_frame)


class FrameQueue(deque[bytes]):
    """
    Encoded frames waiting for the pacer, oldest first, bounded: when full, the
    oldest frame goes, so a late prompt never turns into a growing delay.

    A C{deque} with a C{maxlen} rather than a wrapper around one: the bridge and
    the pacer ask every leg "anything queued?" 50 times a second, and a deque
    answers that in C without a Python call.
    """

    def __init__(self, max_frames: int) -> None:
        super().__init__(maxlen=max_frames)
        self.dropped = 0

    @property
    def max_frames(self) -> int:
        assert self.maxlen is not None
        return self.maxlen

    def push(self, frames: list[bytes]) -> int:
        """Queue frames; return how many old ones were dropped to make room."""
        overflow = max(0, len(self) + len(frames) - self.max_frames)
        self.dropped += overflow
        self.extend(frames)  # the deque drops from the old end itself
        return overflow

    def skip(self, count: int) -> int:
        """Drop up to C{count} frames from the head (they were due and missed); return how many."""
        skipped = min(count, len(self))
        for _ in range(skipped):
            self.popleft()
        self.dropped += skipped
        return skipped


#: An entry of a L{Playout}: an encoded frame, or a mark (called once the
#: frames queued before it have been written to the leg, or dropped).
PlayoutItem = bytes | Callable[[], None]


#: Ticks over which a leg judges whether an app's audio keeps a standing queue.
TRIM_WINDOW: Final = 25
#: An app whose frames came within this many of the window's ticks streams in real time.
TRIM_SLACK: Final = 2
#: An app that runs out within this many windows after a trim keeps a frame queued from then on.
TRIM_TOO_FAR: Final = 4


class Playout(deque[PlayoutItem]):
    """
    Audio an application sends a leg (a WebSocket media stream), as encoded
    frames for the pacer, with the application's marks between them. Bounded
    in frames: when full, the oldest audio goes (marks are never dropped, they
    are answered). A C{deque} for the same reason as L{FrameQueue}: the
    pacer asks every leg "anything here?" 50 times a second.

    Invariant: a mark is never at the head once the frame before it has
    been written (L{settle}), so the pacer finds a frame or nothing.

    No standing queue (L{paced}): an app that streams in real time and whose
    audio never ran out for a whole window of L{TRIM_WINDOW} ticks keeps a
    queue it will never drain (one late frame, or its echo of what a stall
    made us send late, left it there), so each of its frames waits that much
    longer for good: the excess is dropped, oldest first. Audio ahead of
    real time is not a standing queue: a sentence in one message or a
    faster-than-real-time stream brings more frames than the window plays,
    and is played whole. One frame stays queued (a cushion) for an app
    whose frames, trimmed to none, then came just after the tick (its
    phase is the pacer's, give or take its jitter).
    """

    def __init__(self, max_frames: int, mix: bool = False) -> None:
        super().__init__()
        self.max_frames = max_frames
        #: C{--stream-audio mix}: its frames are summed with the bridge's, not played instead of them.
        self.mix = mix
        self.frames = 0
        self.dropped = 0
        #: Frames a standing queue lost (in L{dropped} too).
        self.trimmed = 0
        self.cushion = 0
        self._windowFrom = -1  # the first slot of the current window; -1: none yet
        self._lastSlot = -1
        self._arrived = 0  # frames pushed in the window
        self._low = 0  # the fewest frames left queued after a tick of the window
        self._ranOut = False  # a tick of the window found nothing, or was not asked
        self._sinceTrim = TRIM_TOO_FAR + 1  # windows since the last trim

    def push(self, frames: list[bytes]) -> int:
        """Queue frames; return how many old frames were dropped to make room."""
        self.extend(frames)
        self.frames += len(frames)
        self._arrived += len(frames)
        dropped = 0
        while self.frames > self.max_frames:
            item = self.popleft()
            if isinstance(item, bytes):
                self.frames -= 1
                dropped += 1
            else:
                item()  # its audio is gone: answered
        self.settle()
        self.dropped += dropped
        return dropped

    def mark(self, played: Callable[[], None]) -> None:
        """A mark after what is queued now; with nothing queued, it is played at once."""
        if self:
            self.append(played)
        else:
            played()

    def nextFrame(self) -> bytes | None:
        """The next frame for the leg, answering the marks at the head first."""
        self.settle()
        if not self:
            return None
        frame = self.popleft()
        assert isinstance(frame, bytes)
        self.frames -= 1
        return frame

    def skip(self, count: int) -> int:
        """Drop up to C{count} frames from the head (due and missed), answering the marks among them."""
        skipped = 0
        while skipped < count and self.nextFrame() is not None:
            skipped += 1
        self.settle()
        self.dropped += skipped
        return skipped

    def paced(self, slot: int, played: bool) -> int:
        """
        After the pacer's tick of C{slot} (C{played}: a frame of ours went
        out): at the end of a window, trim a standing queue. Return the
        frames trimmed.
        """
        if self._windowFrom < 0 or slot < self._lastSlot:
            self._newWindow(slot)
        elif slot != self._lastSlot + 1 or not played:
            self._ranOut = True  # a tick without us (nothing here, or missed slots), or one that found nothing
        self._lastSlot = slot
        if self.frames < self._low:
            self._low = self.frames
        if slot - self._windowFrom < TRIM_WINDOW:
            return 0
        trimmed = 0
        if abs(self._arrived - TRIM_WINDOW) <= TRIM_SLACK:  # in real time: not audio ahead of it
            if self._ranOut:
                if self._sinceTrim <= TRIM_TOO_FAR:
                    self.cushion = 1  # trimmed to the bone, it then ran out: its frames need one waiting
            elif self._low > self.cushion:
                trimmed = self.skip(self._low - self.cushion)
                self.trimmed += trimmed
        self._sinceTrim = 0 if trimmed else self._sinceTrim + 1
        self._newWindow(slot)
        return trimmed

    def _newWindow(self, slot: int) -> None:
        self._windowFrom = self._lastSlot = slot
        self._arrived = 0
        self._low = self.frames
        self._ranOut = False

    def settle(self) -> None:
        """Answer the marks at the head: the audio before them is out."""
        while self and not isinstance(self[0], bytes):
            played = self.popleft()
            assert not isinstance(played, bytes)
            played()

    def drain(self) -> int:
        """Drop every frame (barge-in, or its leg closing) and answer every mark; return the frames dropped."""
        dropped = self.frames
        marks = [item for item in self if not isinstance(item, bytes)]
        self.clear()
        self.frames = 0
        self.dropped += dropped
        for played in marks:
            played()
        return dropped

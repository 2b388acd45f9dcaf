# -*- test-case-name: tests.test_timeline,tests.test_stream_rules,tests.test_flows -*-
"""
A leg's timeline: which frame it gets in each 20 ms slot of the shared pacer.
Pure code, no I/O: the leg hands in its queues and the slot, and writes what
comes back.

At most one frame a slot, whoever speaks: queued audio (a prompt, an echo)
first, then the app's (a converse media stream; under C{--stream-audio mix}
summed with a held bridged frame), then a bridged frame held back because its
slot had a frame already, else silence unless the bridge spoke lately. The
timeline follows the clock, not the frames it has: the audio due in slots a
late tick missed is dropped, not played late (see L{Timeline.catchUp}).
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

from audiohangup.audio import AudioFormat, FrameQueue, Playout
from audiohangup.codecs import mix
from audiohangup.pacer import CATCH_UP_TICKS
from audiohangup.reasons import LIVE

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime

    from audiohangup.pacer import Pacer
    from audiohangup.reasons import HangupCause, LegState

#: Bridged frames a leg holds for its next ticks while its slots are the
#: pacer's (its app or a prompt spoke lately); beyond it the oldest goes, so
#: the bridge is never more than this many frames behind.
BRIDGE_HOLD = 2

#: Ticks after the last frame of a prompt or an app during which bridged
#: frames keep to the ticks: an app that stutters (a frame every other tick)
#: must not let the bridge slip extra frames in between its own.
SPOKEN_TICKS = 10


class Timeline:
    """
    What a leg plays in each slot, and what it drops after a stall. Its
    queues stay the leg's (the pacer and the bridge look at them for every
    frame); the timeline keeps when something last spoke and what is late.
    """

    __slots__ = ("fed", "format", "late", "late_until", "spoken_in")

    def __init__(self, fmt: AudioFormat) -> None:
        self.format = fmt
        #: The slot of the last queued or fed frame (a prompt's, an app's).
        self.spoken_in = -SPOKEN_TICKS - 1
        #: Frames due in slots a late tick missed and not yet dropped, until slot C{late_until}.
        self.late = 0
        self.late_until = 0
        #: Whether the last slot's frame was the app's (see L{audiohangup.audio.Playout.paced}).
        self.fed = False

    def spokeLately(self, slot: int) -> bool:
        """Whether a prompt or an app spoke within L{SPOKEN_TICKS} of C{slot}: its slots are the pacer's."""
        return slot - self.spoken_in <= SPOKEN_TICKS

    def frameFor(
        self, slot: int, missed: int, queue: FrameQueue, feed: Playout | None, held: deque[bytes], silence: bool
    ) -> bytes | None:
        """
        The frame for C{slot}, taken from the queues: queued audio first,
        then the app's, then a held bridged frame, else silence if
        C{silence} (nothing was bridged lately), else none. After C{missed}
        slots without a tick, the audio due in them is dropped first.
        """
        if missed or self.late:
            self.catchUp(slot, missed, queue, feed, held)
        frame: bytes | None = None
        self.fed = False
        if queue:
            frame = queue.popleft()
            held.clear()  # a prompt has the floor
            self.spoken_in = slot
        elif feed and (frame := feed.nextFrame()) is not None:
            self.spoken_in = slot
            self.fed = True
            if not feed.mix:
                held.clear()  # the app has the floor
            elif held:
                frame = self._mixed(frame, held.popleft())
        else:
            if self.late:
                self.late += 1  # while catching up, this slot's audio is late too: it comes after the tick
            if held:
                frame = held.popleft()
            elif silence:
                frame = self.format.silence_frame
        return frame

    def catchUp(self, slot: int, missed: int, queue: FrameQueue, feed: Playout | None, held: deque[bytes]) -> None:
        """
        Drop the audio that was due in the C{missed} slots, oldest first:
        queued, the app's, then held bridged frames. Asterisk plays each frame
        as it comes, so played late it would be a standing delay (or, sent
        in a burst, fast audio); the stall was heard as a gap either way.
        What was sent during the stall may be read only after this tick, so
        the count not yet dropped stays due for L{CATCH_UP_TICKS} ticks,
        with one more for each tick in them that finds nothing queued or fed.
        Audio sent ahead of time (a sentence in one message) loses only the
        frames of the missed slots: the rest still plays a frame a tick.
        """
        if missed:
            self.late += missed
            self.late_until = slot + CATCH_UP_TICKS
        elif slot > self.late_until:
            self.late = 0
            return
        late = self.late - queue.skip(self.late)
        if late and feed:
            late -= feed.skip(late)
        while late and held:
            held.popleft()
            late -= 1
        self.late = late

    def _mixed(self, app: bytes, bridged: bytes) -> bytes:
        """The app's frame and a bridged one, summed; the app's alone if they differ in size or kind."""
        if len(app) != len(bridged) or app[:3] != bridged[:3]:
            return app
        return app[:3] + mix(app[3:], bridged[3:], self.format)


class SlotPlayer:
    """
    What a paced leg does with a bridged frame and in the slot its tick is
    for, the same for a local leg (L{audiohangup.protocol}) and the home's
    remote one (L{audiohangup.cluster.remoteleg}): a bridged frame goes at
    once unless the slot is taken; the frame its timeline picks is written,
    the app's marks after it are answered, and a hangup asked for after the
    playout goes once nothing is queued or fed.
    """

    if TYPE_CHECKING:
        state: LegState
        reactor: IReactorTime
        forwarded_at: float
        pacer: Pacer
        feed: Playout | None
        queue: FrameQueue
        held: deque[bytes]
        timeline: Timeline
        written_in: int
        _after_playout: HangupCause | None

        def _write(self, data: bytes) -> None: ...

        def hangup(self, cause: HangupCause) -> object: ...

    def forwardBytes(self, data: bytes) -> None:
        """
        A bridged frame, still encoded as it arrived on the other leg: written
        at once unless a prompt or an app speaks to the leg (then held for the
        next slots, or dropped). A bridge alone is paced by the other leg's
        Asterisk: what it sends goes through as it comes, a burst included.
        """
        if self.state is LIVE:
            slot = self.pacer.slot
            if not self.queue and not self.feed and (self.written_in != slot or not self.timeline.spokeLately(slot)):
                self._write(data)
                self.written_in = slot
            elif not self.queue and (not self.feed or self.feed.mix):
                self.held.append(data)
            self.forwarded_at = self.reactor.seconds()

    def _playSlot(self, missed: int, silence: bool) -> None:
        """This tick's frame (silence too, if C{silence}), after C{missed} slots without a tick."""
        slot, feed = self.pacer.slot, self.feed
        frame = self.timeline.frameFor(slot, missed, self.queue, feed, self.held, silence)
        if frame is not None:
            self._write(frame)
            self.written_in = slot
            if feed:
                feed.settle()  # the marks after it: that audio is out
        if feed is not None:
            feed.paced(slot, self.timeline.fed)
        if self._after_playout is not None and not self.queue and not self.feed:
            self.hangup(self._after_playout)

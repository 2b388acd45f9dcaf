# -*- test-case-name: tests.test_link -*-
"""
A leg whose connection another instance holds, as the session's home sees
it: an L{IRemoteLeg} in this instance's registry and session, so the flows,
the API, the observers and the recorder use it as any other leg. What is
written to it crosses the media link (L{audiohangup.cluster.link}); what
its connection receives arrives over it; its close reason is the one its
own instance gives, or C{link_lost} if the link breaks first.

What the session plays to it is played here, by this instance's pacer,
exactly as to a leg of its own: the queued audio after C{/play} or a flow's
C{play}, the app's audio of a media stream, bridged frames held while those
speak (L{audiohangup.timeline}). Each frame goes over the link as plain
audio when its slot comes, so the recorder's C{legHeard} taps hear it,
C{queued_ms} is true and a hangup after playout knows when the queue is
empty. The instance that holds the connection only forwards what arrives,
its own pacer filling the gaps with silence.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from audiohangup.attachments import LegAttachments
from audiohangup.audio import FRAME_SECONDS, AudioFormat, FrameQueue, LegSettings, Playout
from audiohangup.cluster.linkmessages import control
from audiohangup.interfaces import ILeg, ILegTap, IMediaStream, IPacedLeg, IRemoteLeg
from audiohangup.reasons import CLOSED, CLOSING, LIVE, CloseReason, HangupCause, LegState, Role
from audiohangup.timeline import BRIDGE_HOLD, SlotPlayer, Timeline
from audiohangup.wire import HEADER, HEADER_SIZE, SAMPLE_RATES, Frame, Kind

if TYPE_CHECKING:
    from audiohangup.pacer import Pacer
    from audiohangup.registry import Registry
    from audiohangup.session import Session

#: Digits kept, as a local leg keeps them.
MAX_DTMF_DIGITS = 64


class LinkEnd(Protocol):
    """What a remote leg uses of its link."""

    def write(self, data: bytes) -> None: ...

    def abort(self) -> None: ...


@implementer(IRemoteLeg, IPacedLeg)
class RemoteLeg(LegAttachments, SlotPlayer):
    """One leg of a session here whose connection is on instance C{instance_id}, reached by C{link}."""

    log = Logger()

    def __init__(
        self,
        link: LinkEnd,
        call_id: str,
        role: Role,
        audio: AudioFormat,
        registry: Registry,
        reactor: IReactorTime,
        pacer: Pacer,
        *,
        instance_id: str,
        peer: str,
        settings: LegSettings | None = None,
    ) -> None:
        self.link = link
        self.call_id: str | None = call_id
        self.role = role
        self.format = audio
        self.registry = registry
        self.reactor = reactor
        self.pacer = pacer
        self.instance_id = instance_id
        self.peer = peer
        settings = settings or LegSettings()
        self.close_timeout = settings.close_timeout
        self.playout_timeout = settings.playout_timeout
        self.state: LegState = LIVE
        self.session: Session | None = None
        self.route: ILeg | None = None
        self.connected_at = reactor.seconds()
        self.ended_at: float | None = None
        self.last_frame_at = self.connected_at
        self.forwarded_at = -math.inf
        self.frames_in = self.frames_out = self.bytes_in = self.bytes_out = self.dtmf_count = 0
        self.dtmf = ""
        #: A whole frame of its own audio starts with this header and is this long (see L{receivedWhole}).
        self.audio_header = HEADER.pack(audio.kind, audio.frame_bytes)
        self.audio_frame_size = HEADER_SIZE + audio.frame_bytes
        self.queue = FrameQueue(settings.max_queue_frames)
        #: What a converse media stream sends the leg: paced here after queued prompts.
        self.feed: Playout | None = None
        #: The pacer's slot this leg last had a frame written in, and the bridged frames held for the next.
        self.written_in = -1
        self.held: deque[bytes] = deque(maxlen=BRIDGE_HOLD)
        self.timeline = Timeline(audio)
        #: Never idle here: the instance holding the connection sees its frames and applies --idle-timeout.
        self.idle_after = math.inf
        self._after_playout: HangupCause | None = None
        self.taps: list[ILegTap] = []
        self.heard: list[ILegTap] = []
        self.recording: str | None = None
        self.streams: list[IMediaStream] = []
        #: The last audio frame received and written: what the level meters sample.
        self.last_in: bytes | Frame | None = None
        self.last_out: bytes | None = None
        self.hangup_cause: HangupCause | None = None
        self.hangup_at: float | None = None
        self.close_reason: CloseReason | None = None
        self._waiting: list[Deferred[CloseReason]] = []
        self._timer: IDelayedCall | None = None

    def _fields(self) -> dict[str, Any]:
        return {"call_id": self.call_id, "role": self.role, "peer": self.peer, "instance": self.instance_id}

    @property
    def live(self) -> bool:
        return self.state is LIVE

    @property
    def queued_ms(self) -> int:
        return round(len(self.queue) * FRAME_SECONDS * 1000)

    @property
    def hangup_to_close_ms(self) -> float | None:
        if self.hangup_at is None or self.ended_at is None:
            return None
        return round((self.ended_at - self.hangup_at) * 1000, 1)

    def start(self) -> None:
        """Join the registry and the session, as a local leg does when its UUID arrives."""
        registry = self.registry
        registry.connected(self)
        registry.pending.discard(self)
        self.log.info("{call_id} {role} leg joined over the link from instance {instance} ({peer})", **self._fields())
        self.pacer.add(self)
        self.session, replaced = registry.register(self)
        if replaced is not None:
            replaced.hangup(HangupCause.REPLACED)

    # Frames in: what the real leg received, as its instance sent it on.

    def received(self, frame: Frame) -> None:
        self.frames_in += 1
        self.bytes_in += len(frame.payload) + 3
        self.last_frame_at = self.reactor.seconds()
        if self.state is not LIVE:
            return
        session = self.session
        assert session is not None
        if frame.kind in SAMPLE_RATES:
            self.last_in = frame
            route = self.route
            if route is not None and frame.kind == self.format.kind and not self.taps:
                route.forwardBytes(frame.encode())
                return
            session.audioReceived(self, frame)
            for tap in list(self.taps):
                self._tell(tap, "legAudio", lambda tap: tap.legAudio(frame))
        elif frame.kind == Kind.DTMF and len(frame.payload) == 1:
            digit = frame.payload.decode("latin-1")
            self.dtmf = (self.dtmf + digit)[-MAX_DTMF_DIGITS:]
            self.dtmf_count += 1
            session.dtmfReceived(self, digit)
            for tap in list(self.taps):
                self._tell(tap, "legDtmf", lambda tap: tap.legDtmf(digit))

    def receivedWhole(self, frames: list[bytes]) -> None:
        """
        L{received} for whole frames of the leg's own audio, still encoded as
        they crossed the link (the link's fast path,
        L{audiohangup.cluster.link.HomeSide.dataReceived}): while the
        built-in bridge routes them and no tap listens, the same bytes go
        on, with no parse and no frame object, as a local leg's do.
        """
        for data in frames:
            route = self.route
            if route is None or self.taps or self.state is not LIVE:
                self.received(Frame(data[0], data[HEADER_SIZE:]))
                continue
            self.frames_in += 1
            self.bytes_in += len(data)
            self.last_frame_at = self.reactor.seconds()
            self.last_in = data  # a reference for the level meters (audiohangup.levels), no copy
            route.forwardBytes(data)

    def _tell(self, tap: ILegTap, event: str, call: Callable[[ILegTap], object]) -> None:
        try:
            call(tap)
        except Exception:
            self.log.failure("{call_id} {role} {tap} failed in {event}", tap=type(tap).__name__, event=event,
                             **self._fields())

    # Frames out: over the link, to be written to the real leg as they come.

    def _write(self, data: bytes) -> None:
        self.frames_out += 1
        self.bytes_out += len(data)
        self.last_out = data
        for tap in self.heard:
            tap.legHeard(data)
        self.link.write(data)

    def forward(self, frame: Frame) -> None:
        self.forwardBytes(frame.encode())

    def bridgeTo(self, other: ILeg | None) -> None:
        self.route = other

    def queueFrames(self, frames: list[bytes]) -> int:
        """Queue encoded frames for this instance's pacer; return how many old ones were dropped."""
        if self.state is not LIVE:
            return 0
        return self.queue.push(frames)

    def play(self, audio: bytes) -> int:
        return self.queueFrames(self.format.frames(audio))

    def paceTick(self, now: float, bridged_since: float, missed: int = 0) -> None:
        """
        The pacer's tick: at most one frame of the queue, the app's or a held
        bridged one, as a local leg's L{Timeline} picks it; never silence
        (its own instance's pacer fills the gaps), and no idle check (its
        own instance's).
        """
        if self.state is not LIVE:
            return
        self._playSlot(missed, silence=False)

    # Ending

    def hangup(self, cause: HangupCause) -> Deferred[CloseReason]:
        """
        Over the link, after the frames written before it: its instance
        hangs the real leg up (its own close timeout bounds it; this side
        gives up a second later).
        """
        if self.state is LIVE:
            self.state = CLOSING
            self._stopPacing()
            self.hangup_cause = cause
            self.hangup_at = self.reactor.seconds()
            # Played out here already when it is after the playout: the newcomer hangs up at once.
            self.link.write(control({"type": "hangup", "cause": cause.value, "after_playout": False}))
            self.log.info(
                "{call_id} {role} hangup sent (cause {cause}) over the link to instance {instance}",
                cause=cause, **self._fields(),
            )
            self.registry.events.hangupSent(self, cause)
            self._timer = self.reactor.callLater(self.close_timeout + 1.0, self._noAnswer)
        return self.whenGone()

    def hangupAfterPlayout(self, cause: HangupCause = HangupCause.API) -> Deferred[CloseReason]:
        """
        Let what is queued or fed play out here, then send a plain hangup
        (the frames go ahead of it, in order); bounded by the playout timeout.
        """
        if self.state is LIVE and (self.queue or self.feed):
            if self._after_playout is None:  # a second request does not push the bound back
                self._after_playout = cause
                self._timer = self.reactor.callLater(self.playout_timeout, self._playoutTimedOut)
            return self.whenGone()
        return self.hangup(cause)

    def _playoutTimedOut(self) -> None:
        self._timer = None
        assert self._after_playout is not None
        self.log.info(
            "{call_id} {role} playout not done after {timeout:g} s ({queued_ms} ms left): hanging up",
            timeout=self.playout_timeout, queued_ms=self.queued_ms, **self._fields(),
        )
        self.hangup(self._after_playout)

    def _stopPacing(self) -> None:
        """Out of the pacer, nothing more to play: the queue goes, the feed's marks are answered."""
        self.pacer.remove(self)
        self.queue.clear()
        self.held.clear()
        if self.feed is not None:
            self.feed.drain()  # its marks are answered: that audio will never play
        self._after_playout = None
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _noAnswer(self) -> None:
        self._timer = None
        self.link.abort()
        self.end(CloseReason.HANGUP_TIMEOUT, "its instance did not say the leg ended in time")

    def whenGone(self) -> Deferred[CloseReason]:
        if self.close_reason is not None:
            return succeed(self.close_reason)
        waiter: Deferred[CloseReason] = Deferred()
        self._waiting.append(waiter)
        return waiter

    def end(self, reason: CloseReason, detail: str, cause: HangupCause | None = None) -> None:
        """
        The real leg is gone (its instance said how, and why it hung the leg
        up: C{cause}, kept unless this side hung it up), or the link is: once.
        """
        if self.state is CLOSED:
            return
        if self.hangup_cause is None:
            self.hangup_cause = cause
        self._stopPacing()
        self.state = CLOSED
        self.ended_at = self.reactor.seconds()
        self.close_reason = reason
        self.log.emit(
            reason.level,
            "{call_id} {role} leg ended: {reason} ({explanation}; {detail}); over the link from instance {instance}, "
            "{duration:.3f} s",
            reason=reason, explanation=reason.explanation, detail=detail,
            duration=self.ended_at - self.connected_at, **self._fields(),
        )
        try:
            self.registry.disconnected(self)
        finally:
            waiting, self._waiting = self._waiting, []
            for waiter in waiting:
                waiter.callback(reason)

    def crowdOut(self, detail: str) -> None:
        pass  # a remote leg is never a connection without its UUID

    def bytesWaiting(self) -> bool:
        return False

# -*- test-case-name: tests.test_link -*-
"""
A leg whose connection another instance holds, as the session's home sees
it: an L{IRemoteLeg} in this instance's registry and session, so the flows,
the API, the observers and the recorder use it as any other leg. What is
written to it crosses the media link (L{audiohangup.cluster.link}); what
its connection receives arrives over it; its close reason is the one its
own instance gives, or C{link_lost} if the link breaks first.

It is not paced here: the instance that holds its connection paces it (the
silence between frames, the queued audio after C{/play}).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from audiohangup.attachments import LegAttachments
from audiohangup.audio import AudioFormat, FrameQueue, Playout
from audiohangup.cluster.linkmessages import QUEUED, control
from audiohangup.interfaces import ILeg, ILegTap, IMediaStream, IRemoteLeg
from audiohangup.reasons import CLOSED, CLOSING, LIVE, CloseReason, HangupCause, LegState, Role
from audiohangup.wire import HEADER, HEADER_SIZE, SAMPLE_RATES, Frame, Kind, encode_frame

if TYPE_CHECKING:
    from audiohangup.registry import Registry
    from audiohangup.session import Session

#: Digits kept, as a local leg keeps them.
MAX_DTMF_DIGITS = 64


class LinkEnd(Protocol):
    """What a remote leg uses of its link."""

    def write(self, data: bytes) -> None: ...

    def abort(self) -> None: ...


@implementer(IRemoteLeg)
class RemoteLeg(LegAttachments):
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
        *,
        instance_id: str,
        peer: str,
        close_timeout: float = 2.0,
    ) -> None:
        self.link = link
        self.call_id: str | None = call_id
        self.role = role
        self.format = audio
        self.registry = registry
        self.reactor = reactor
        self.instance_id = instance_id
        self.peer = peer
        self.close_timeout = close_timeout
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
        self.queue = FrameQueue(1)  # its queue is on its own instance
        self.feed: Playout | None = None  # attached, not played: its instance paces the leg (module docstring)
        self.taps: list[ILegTap] = []
        self.heard: list[ILegTap] = []
        self.recording: str | None = None
        self.streams: list[IMediaStream] = []
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
        return 0

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
            route.forwardBytes(data)

    def _tell(self, tap: ILegTap, event: str, call: Callable[[ILegTap], object]) -> None:
        try:
            call(tap)
        except Exception:
            self.log.failure("{call_id} {role} {tap} failed in {event}", tap=type(tap).__name__, event=event,
                             **self._fields())

    # Frames out: over the link, to be written to the real leg.

    def _write(self, data: bytes) -> None:
        self.frames_out += 1
        self.bytes_out += len(data)
        for tap in self.heard:
            tap.legHeard(data)
        self.link.write(data)

    def forward(self, frame: Frame) -> None:
        self.forwardBytes(frame.encode())

    def forwardBytes(self, data: bytes) -> None:
        if self.state is LIVE:
            self._write(data)
            self.forwarded_at = self.reactor.seconds()

    def bridgeTo(self, other: ILeg | None) -> None:
        self.route = other

    def queueFrames(self, frames: list[bytes]) -> int:
        """Sent on to be queued on the real leg, which its own pacer plays: what it drops is not known here."""
        if self.state is LIVE:
            for frame in frames:
                self.link.write(encode_frame(QUEUED, frame))
        return 0

    def play(self, audio: bytes) -> int:
        return self.queueFrames(self.format.frames(audio))

    # Ending

    def hangup(self, cause: HangupCause) -> Deferred[CloseReason]:
        return self._hangup(cause, after_playout=False)

    def hangupAfterPlayout(self, cause: HangupCause = HangupCause.API) -> Deferred[CloseReason]:
        return self._hangup(cause, after_playout=True)

    def _hangup(self, cause: HangupCause, *, after_playout: bool) -> Deferred[CloseReason]:
        if self.state is LIVE:
            self.state = CLOSING
            self.hangup_cause = cause
            self.hangup_at = self.reactor.seconds()
            self.link.write(control({"type": "hangup", "cause": cause.value, "after_playout": after_playout}))
            self.log.info(
                "{call_id} {role} hangup sent (cause {cause}) over the link to instance {instance}",
                cause=cause, **self._fields(),
            )
            self.registry.events.hangupSent(self, cause)
            # Its instance closes the leg within its own bounds (a playout, a close timeout); past those, give up.
            bound = self.close_timeout + 1.0 + (60.0 if after_playout else 0.0)
            self._timer = self.reactor.callLater(bound, self._noAnswer)
        return self.whenGone()

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
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
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

# -*- test-case-name: tests.test_streams -*-
"""
One media stream: a leg's audio to an application over WebSocket, and, in
C{converse} mode, the application's audio to the leg. The stream is a tap
on the leg (it hears every frame after the flow) and, in converse mode,
the owner of the leg's feed (the pacer plays it after queued prompts).

No sockets here: the WebSocket is an L{IStreamWebSocket} the client adapter
hands over once the handshake is done, so every rule of a stream (what is
sent when, what is dropped, how it ends) is tested without one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from twisted.logger import Logger
from zope.interface import Interface, implementer

from audiohangup.audio import FRAME_MS, Playout
from audiohangup.interfaces import ILegTap, IMediaStream, IServerLeg
from audiohangup.reasons import HangupCause, StrEnum
from audiohangup.streams.messages import (
    AppAudio,
    AppClear,
    AppHangup,
    AppMark,
    BadMessage,
    IStreamProtocol,
    Message,
)
from audiohangup.wire import Frame, encode_frame

#: Close codes: RFC 6455's "normal closure" and "going away".
NORMAL_CLOSURE = 1000
GOING_AWAY = 1001


class Mode(StrEnum):
    """C{converse}: the app hears the leg and speaks to it; C{listen}: it only hears."""

    CONVERSE = "converse"
    LISTEN = "listen"


class State(StrEnum):
    CONNECTING = "connecting"
    STREAMING = "streaming"
    STOPPING = "stopping"
    ENDED = "ended"
    FAILED = "failed"


class Outcome(StrEnum):
    """How a stream ended, as metrics, records and webhooks name it."""

    ENDED = "ended"  # we ended it: its leg ended, or a DELETE
    APP_CLOSED = "app_closed"  # the application closed it
    FAILED = "failed"  # no application, or it went away without closing


class IStreamWebSocket(Interface):
    """The open WebSocket under a stream, as the client adapter provides it."""

    def send(message: Message, media: bool) -> None:
        """Send a message; media may be dropped (oldest first) while the app reads too slowly."""

    def close(code: int, reason: str) -> None:
        """Start the closing handshake; the adapter reports the end with L{MediaStream.closed}."""


class IStreamObserver(Interface):
    """Told of a stream's start and end (metrics, webhooks, the manager's bookkeeping)."""

    def streamStarted(stream: MediaStream) -> None:
        """The WebSocket is open and the opening messages are sent."""

    def streamEnded(stream: MediaStream) -> None:
        """The stream is over; C{stream.outcome} and C{stream.reason} say how."""


@dataclass(frozen=True)
class StreamSettings:
    """Bounds of one stream."""

    max_queue_ms: int = 60000
    failure: str = "continue"  # or "hangup": a failed stream hangs its leg up
    audio: str = "floor"  # or "mix": a bridged leg hears the app and the bridge summed

    @property
    def max_queue_frames(self) -> int:
        return max(1, self.max_queue_ms // FRAME_MS)

    @property
    def max_marks_waiting(self) -> int:
        """Marks waiting for their audio: one a frame of a full queue (at least 64), each name bounded."""
        return max(64, self.max_queue_frames)


@dataclass
class Counts:
    """Frames and bytes each way, and what was dropped or ignored: summed by the metrics at scrape time."""

    frames_to_app: int = 0
    bytes_to_app: int = 0
    frames_from_app: int = 0
    bytes_from_app: int = 0
    dropped_to_app: int = 0  # the app read too slowly
    dropped_from_app: int = 0  # its queue was full, a clear, or its leg ended first
    ignored_from_app: int = 0  # listen mode

    def add(self, other: Counts) -> None:
        for name, value in vars(other).items():
            setattr(self, name, getattr(self, name) + value)


@implementer(ILegTap, IMediaStream)
class MediaStream:
    log = Logger()

    def __init__(
        self,
        leg: IServerLeg,
        stream_id: str,
        url: str,
        public_url: str,
        protocol: IStreamProtocol,
        mode: Mode,
        settings: StreamSettings,
        observer: IStreamObserver,
    ) -> None:
        self.leg = leg
        self.stream_id = stream_id
        self.url = url
        self.public_url = public_url
        self.protocol = protocol
        self.mode = mode
        self.settings = settings
        self.observer = observer
        self.state = State.CONNECTING
        self.outcome: Outcome | None = None
        self.reason = ""
        self.counts = Counts()
        self.websocket: IStreamWebSocket | None = None
        self._pending = b""  # the app's audio short of a whole frame
        self._feed: Playout | None = None
        self._badMessageLogged = False
        self._marksWaiting = 0  # marks in the feed, waiting for the audio before them

    def _fields(self) -> dict[str, Any]:
        return {
            "call_id": self.leg.call_id, "role": self.leg.role, "stream_id": self.stream_id,
            "url": self.public_url, "protocol": self.protocol.name, "mode": self.mode,
        }

    # IMediaStream

    def snapshot(self) -> dict[str, Any]:
        return {
            "stream_id": self.stream_id, "url": self.public_url, "protocol": self.protocol.name,
            "mode": str(self.mode), "state": str(self.state),
        }

    def record(self) -> dict[str, Any]:
        return {
            "stream_id": self.stream_id, "url": self.public_url, "protocol": self.protocol.name,
            "mode": str(self.mode), "outcome": None if self.outcome is None else str(self.outcome),
        }

    def totals(self) -> Counts:
        """What the stream counted so far, with what its feed has dropped."""
        totals = Counts(**vars(self.counts))
        if self._feed is not None:
            totals.dropped_from_app += self._feed.dropped
        return totals

    @property
    def live(self) -> bool:
        return self.state is State.CONNECTING or self.state is State.STREAMING

    # From the client adapter

    def opened(self, websocket: IStreamWebSocket) -> None:
        """The WebSocket is open: say who we are, then stream."""
        if self.state is not State.CONNECTING:
            websocket.close(NORMAL_CLOSURE, "the stream was ended")  # stopped while it connected
            return
        self.websocket = websocket
        self.state = State.STREAMING
        for message in self.protocol.opening():
            websocket.send(message, False)
        self.log.info("{call_id} {role} stream {stream_id} to {url} open ({protocol}, {mode})", **self._fields())
        self.observer.streamStarted(self)

    def connectFailed(self, reason: str) -> None:
        """No WebSocket: the app could not be reached, refused, or the handshake failed."""
        if self.state is State.CONNECTING:
            self._end(Outcome.FAILED, reason)

    def messageReceived(self, payload: bytes, binary: bool) -> None:
        if self.state is not State.STREAMING:
            return
        try:
            command = self.protocol.parse(payload, binary)
        except BadMessage as error:
            self._ignore(str(error))
            return
        if command is None:
            return
        if isinstance(command, AppAudio):
            self._audio(command.audio)
        elif isinstance(command, AppMark):
            self._mark(command.name)
        elif isinstance(command, AppClear):
            self._clear()
        elif isinstance(command, AppHangup):
            self._hangup(command.after_playout)

    def closed(self, clean: bool, code: int | None, reason: str) -> None:
        """The WebSocket is gone: after our close (ended), the app's close, or without one (failed)."""
        if self.state is State.STOPPING:
            self._end(self.outcome or Outcome.ENDED, self.reason)
        elif self.state is State.STREAMING:
            if clean:
                self._end(Outcome.APP_CLOSED, f"the app closed the stream (code {code})")
            else:
                self._end(Outcome.FAILED, reason or "the app went away without closing the stream")

    # ILegTap

    def legAudio(self, frame: Frame) -> None:
        websocket = self.websocket
        if websocket is None or self.state is not State.STREAMING:
            return
        message = self.protocol.media(frame.payload)
        websocket.send(message, True)
        self.counts.frames_to_app += 1
        self.counts.bytes_to_app += len(message[0])

    def legHeard(self, data: bytes) -> None:
        pass  # a stream hears what its leg sends

    def legDtmf(self, digit: str) -> None:
        if self.websocket is not None and self.state is State.STREAMING:
            self.websocket.send(self.protocol.dtmf(digit), False)

    # The application's commands

    def _ignore(self, why: str) -> None:
        if not self._badMessageLogged:
            self._badMessageLogged = True
            self.log.warn(
                "{call_id} {role} stream {stream_id}: ignored {why} (logged once per stream)", why=why, **self._fields()
            )

    def _audio(self, audio: bytes) -> None:
        size = self.leg.format.frame_bytes
        if self.mode is Mode.LISTEN:
            self.counts.ignored_from_app += max(1, len(audio) // size)
            return
        self.counts.bytes_from_app += len(audio)
        pending = self._pending + audio
        whole = len(pending) - len(pending) % size
        self._pending = pending[whole:]
        if whole:
            self._push([pending[i : i + size] for i in range(0, whole, size)])

    def _push(self, payloads: list[bytes]) -> None:
        feed = self._ownFeed()
        if feed is None:
            self.counts.dropped_from_app += len(payloads)
            return
        kind = self.leg.format.kind
        self.counts.frames_from_app += len(payloads)
        feed.push([encode_frame(kind, payload) for payload in payloads])  # what it drops, it counts

    def _ownFeed(self) -> Playout | None:
        """The leg's feed, made ours on first use; None if the leg is not live or another stream feeds it."""
        if not self.leg.live:
            return None
        if self._feed is None and self.leg.feed is None:
            self._feed = Playout(self.settings.max_queue_frames, mix=self.settings.audio == "mix")
            self.leg.attachFeed(self._feed)
        return self._feed if self.leg.feed is self._feed else None

    def _flushPending(self) -> None:
        """The app's audio short of a frame, padded with silence: before a mark or a hangup it must play too."""
        if self._pending:
            fmt = self.leg.format
            padding = bytes([fmt.silence_byte]) * (fmt.frame_bytes - len(self._pending))
            self._pending, pending = b"", self._pending + padding
            self._push([pending])

    def _mark(self, name: str) -> None:
        if self.mode is Mode.CONVERSE:
            self._flushPending()
            feed = self._ownFeed()
            if feed is not None:
                if self._marksWaiting >= self.settings.max_marks_waiting:
                    self._ignore(f"a mark beyond {self.settings.max_marks_waiting} waiting for their audio")
                    return
                self._marksWaiting += 1
                feed.mark(lambda: self._markPlayed(name))
                return
        self._sendMark(name)  # nothing of the app's is queued: played at once

    def _markPlayed(self, name: str) -> None:
        self._marksWaiting -= 1
        self._sendMark(name)

    def _sendMark(self, name: str) -> None:
        if self.websocket is not None and self.state is State.STREAMING:
            self.websocket.send(self.protocol.mark(name), False)

    def _clear(self) -> None:
        self._pending = b""
        if self.mode is Mode.LISTEN:
            return  # nothing of a listener's plays (and the leg's feed is not its to take)
        feed = self._ownFeed()
        if feed is not None:
            feed.drain()

    def _hangup(self, after_playout: bool) -> None:
        if self.mode is Mode.LISTEN:
            # A fork (a transcriber, a supervisor) only hears: it cannot end the call.
            self.counts.ignored_from_app += 1
            self._ignore("a hangup from a listen-mode stream")
            return
        self.log.info(
            "{call_id} {role} stream {stream_id} asks to hang up{after}",
            after=" after the queued audio" if after_playout else "", **self._fields(),
        )
        if after_playout:
            self._flushPending()
            self.leg.hangupAfterPlayout(HangupCause.STREAM)
        else:
            self.leg.hangup(HangupCause.STREAM)

    # Ending

    def fail(self, reason: str) -> None:
        """The WebSocket gave up on the app (it stopped reading) and dropped the connection: failed."""
        if self.state is State.STREAMING:
            self._end(Outcome.FAILED, reason)

    def stop(self, reason: str) -> None:
        """End the stream from our side: C{stop}, then a close with code 1000. The leg stays."""
        if self.state is State.CONNECTING:
            self._end(Outcome.ENDED, reason)  # the adapter closes a connection that opens after this
        elif self.state is State.STREAMING:
            assert self.websocket is not None
            self._detach()  # the marks still queued are answered: that audio will never play
            self.state = State.STOPPING
            self.outcome, self.reason = Outcome.ENDED, reason
            self.websocket.send(self.protocol.stop(reason), False)
            self.websocket.close(NORMAL_CLOSURE, reason)

    def _detach(self) -> None:
        """Off the leg: no more audio either way; the app's queued audio is dropped (marks answered)."""
        self.leg.removeTap(self)
        if self._feed is not None:
            self.leg.detachFeed(self._feed)
            self._feed.drain()
            # Everything the feed dropped (beyond its bound, cleared, or left when
            # the leg closed before this stream heard of it) is now this stream's.
            self.counts.dropped_from_app += self._feed.dropped
            self._feed = None

    def _end(self, outcome: Outcome, reason: str) -> None:
        self._detach()
        self.state = State.FAILED if outcome is Outcome.FAILED else State.ENDED
        self.outcome, self.reason = outcome, reason
        if outcome is Outcome.FAILED:
            self.log.warn("{call_id} {role} stream {stream_id} to {url} failed: {reason}", reason=reason, **self._fields())
        else:
            self.log.info(
                "{call_id} {role} stream {stream_id} ended ({outcome}): {reason}",
                outcome=outcome, reason=reason, **self._fields(),
            )
        self.observer.streamEnded(self)
        if outcome is Outcome.FAILED and self.settings.failure == "hangup" and self.leg.live:
            self.leg.hangup(HangupCause.STREAM)

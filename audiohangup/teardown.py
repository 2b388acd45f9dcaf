# -*- test-case-name: tests.test_teardown,tests.test_protocol -*-
"""
How a leg ends: its hangup, and a bounded, quiet teardown.

Hanging up is what Asterisk needs: write C{00 00 00} once, write nothing after
it, keep reading and discarding, wait for the peer to close, and abort only if
it has not closed within the close timeout. A peer that stops reading is
aborted as a slow consumer once its unsent audio passes a bound. Whatever the
path, C{connectionLost} then names how the leg ended (see
L{audiohangup.reasons}), logs it once, and tells whoever waits for it.

L{LegTeardown} is the part of L{audiohangup.protocol.AudioSocketProtocol}
that ends it, mixed into the protocol as Twisted mixes its transports' parts
(C{_SocketCloser}, C{_AbortingMixin}): a leg reads and writes audio for its
whole life and ends once, and the two need the same state, which a leg keeps
in slots for its hot paths.
"""

from __future__ import annotations

import socket
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, cast, runtime_checkable
from typing import Protocol as TypingProtocol

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import (
    IConsumer,
    IDelayedCall,
    IPushProducer,
    IReactorTime,
    ISystemHandle,
    ITCPTransport,
    ITransport,
)
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Attribute

from audiohangup.audio import FrameQueue, LegSettings, Playout
from audiohangup.interfaces import IPacedLeg
from audiohangup.reasons import AWAITING_UUID, CLOSED, CLOSING, LIVE, CloseReason, HangupCause, LegState, Loss, Role, classify, loss_of
from audiohangup.wire import HANGUP_FRAME

if TYPE_CHECKING:
    from audiohangup.pacer import Pacer
    from audiohangup.registry import Registry
    from audiohangup.relay import Readable, Relay


@runtime_checkable
class SocketOptions(TypingProtocol):
    """What a leg asks of the socket under its transport."""

    def getsockopt(self, level: int, option: int, /) -> int: ...

    def setsockopt(self, level: int, option: int, value: int, /) -> None: ...


def socket_of(transport: object) -> SocketOptions | None:
    """The socket under a transport (TCP, or TLS over TCP); None for a test transport."""
    if ISystemHandle.providedBy(transport):
        handle = transport.getHandle()
        if isinstance(handle, SocketOptions):
            return handle
    return None


class ILegTransport(ITCPTransport, IConsumer):
    """
    What a leg uses of its transport: a TCP connection (plain or TLS) that
    buffers what the socket does not take, up to C{bufferSize} before it
    pauses its producer.
    """

    bufferSize: int = Attribute("Bytes buffered before the transport pauses its producer.")


class LegTeardown:
    """
    The hangup and the teardown of a leg: mixed into the leg's protocol,
    which sets its state up and writes its frames.
    """

    # Its own state, first in the leg's layout: every frame checks C{state}.
    __slots__ = (  # noqa: RUF023 (in order of heat, not of name)
        "state", "_peerReset", "hangup_cause", "hangup_at", "close_reason", "ended_at",
        "_decided", "_detail", "_timers", "_waiting", "_after_playout", "_peerEnd",
    )

    state: LegState
    hangup_cause: HangupCause | None
    hangup_at: float | None
    close_reason: CloseReason | None
    ended_at: float | None
    _decided: CloseReason | None
    _detail: str
    _timers: dict[str, IDelayedCall]
    _waiting: list[Deferred[CloseReason]]
    _after_playout: HangupCause | None
    _peerReset: bool
    _peerEnd: Loss | None

    # What it uses of the leg, which its protocol keeps.
    log: ClassVar[Logger]
    transport: ITransport | None
    role: Role
    call_id: str | None
    peer: str
    registry: Registry
    settings: LegSettings
    reactor: IReactorTime
    pacer: Pacer
    relay: Relay | None
    queue: FrameQueue
    held: deque[bytes]
    feed: Playout | None
    connected_at: float

    def _write(self, data: bytes) -> None:
        raise NotImplementedError

    def _fields(self) -> dict[str, Any]:
        raise NotImplementedError

    @property
    def queued_ms(self) -> int:
        raise NotImplementedError

    @property
    def _leg(self) -> IPacedLeg:
        """This leg, as the registry and the pacer take it: the protocol it is mixed into provides it."""
        return cast(IPacedLeg, self)

    @property
    def connection(self) -> ILegTransport:
        """
        The leg's transport. Twisted sets it before the first event reaches
        the protocol, so it is there whenever a leg acts; its declared type
        is only C{ITransport}, the leg needs a TCP transport and a consumer.
        """
        transport = self.transport
        assert transport is not None, "the leg has no transport yet"
        return cast(ILegTransport, transport)

    @property
    def hangup_sent(self) -> bool:
        return self.hangup_cause is not None

    @property
    def hangup_to_close_ms(self) -> float | None:
        """Milliseconds from our hangup to the leg being gone (to 0.1 ms), once both happened."""
        if self.hangup_at is None or self.ended_at is None:
            return None
        return round((self.ended_at - self.hangup_at) * 1000, 1)

    # Ending: every way a leg ends goes through _beginClosing, bounded by the close timer.

    def hangup(self, cause: HangupCause) -> Deferred[CloseReason]:
        """
        Stop audio, send C{00 00 00} once, and wait, bounded, for the peer to close.

        Idempotent: on a leg already closing this only waits.

        @return: fires with the leg's close reason once the leg is gone.
        """
        if self.state is AWAITING_UUID or self.state is LIVE:
            self._sendHangup(cause)
            self.log.info("{call_id} {role} hangup sent (cause {cause})", cause=cause, **self._fields())
            if self.call_id is not None:  # a leg (a refused duplicate never gets here)
                self.registry.events.hangupSent(self._leg, cause)
        return self.whenGone()

    def _sendHangup(self, cause: HangupCause) -> None:
        """C{00 00 00}, the last bytes ever written, then a bounded close."""
        self.hangup_cause = cause
        self.hangup_at = self.reactor.seconds()
        self._write(HANGUP_FRAME)
        self._beginClosing()

    def hangupAfterPlayout(self, cause: HangupCause = HangupCause.API) -> Deferred[CloseReason]:
        """
        Let the queued audio play out, then hang up; bounded by the playout
        timeout, after which the leg is hung up whatever is left.
        """
        if self.state is LIVE and (self.queue or self.feed):
            if self._after_playout is None:  # a second request does not push the bound back
                self._after_playout = cause
                self._setTimer("playout", self.settings.playout_timeout, self._playoutTimedOut)
            return self.whenGone()
        return self.hangup(cause)

    def _playoutTimedOut(self) -> None:
        assert self._after_playout is not None
        self.log.info(
            "{call_id} {role} playout not done after {timeout:g} s ({queued_ms} ms left): hanging up",
            timeout=self.settings.playout_timeout, queued_ms=self.queued_ms, **self._fields(),
        )
        self.hangup(self._after_playout)

    def whenGone(self) -> Deferred[CloseReason]:
        """A Deferred that fires with the close reason once the leg is gone."""
        if self.close_reason is not None:
            return succeed(self.close_reason)
        waiter: Deferred[CloseReason] = Deferred()
        self._waiting.append(waiter)
        return waiter

    def crowdOut(self, detail: str) -> None:
        """Close this connection, still without its UUID: a newer one needs its place."""
        if self.state is AWAITING_UUID:
            self._closeFor(CloseReason.TOO_MANY_PENDING, detail)

    def _closeFor(self, reason: CloseReason, detail: str) -> None:
        """The peer ended or broke the leg: send nothing more and close our side."""
        self._decided = reason
        self._detail = detail
        self._beginClosing()
        self._loseConnection()

    def _beginClosing(self) -> None:
        self.state = CLOSING
        self.registry.pending.discard(self._leg)
        self.pacer.remove(self._leg)
        self.queue.clear()
        self.held.clear()
        if self.feed is not None:
            self.feed.drain()  # its marks are answered: that audio will never play
        for name in ("uuid", "max_duration", "playout"):
            self._cancelTimer(name)
        self._setTimer("close", self.settings.close_timeout, self._abort)

    def _uuidTimedOut(self) -> None:
        self._closeFor(CloseReason.UUID_TIMEOUT, f"none within {self.settings.uuid_timeout:g} s")

    # Closing our side. Twisted reads nothing more of a transport that is
    # closing or aborted; nor may the relay, so the leg leaves it first.

    def _leaveRelay(self) -> None:
        if self.relay is not None:
            self.relay.release(cast("Readable", self), resume=False)

    def _loseConnection(self) -> None:
        """Close once what is buffered is written."""
        self._leaveRelay()
        self.connection.loseConnection()

    def _abort(self) -> None:
        """Drop the connection now."""
        self._leaveRelay()
        self.connection.abortConnection()

    # Timers: every one of them is cancelled in connectionLost.

    def _setTimer(self, name: str, seconds: float, action: Callable[..., object], *args: Any) -> None:
        self._cancelTimer(name)

        def fire() -> None:
            del self._timers[name]
            action(*args)

        self._timers[name] = self.reactor.callLater(seconds, fire)

    def _cancelTimer(self, name: str) -> None:
        timer = self._timers.pop(name, None)
        if timer is not None and timer.active():
            timer.cancel()

    # IPushProducer: the transport tells us when the peer is not keeping up.

    def _watchBackPressure(self) -> None:
        """
        A peer that stops reading must not grow our memory: the transport
        pauses its producer (this leg) once more than C{max_unsent_bytes} wait
        in its buffer, and the leg is then aborted as C{slow_consumer}. A small
        kernel send buffer keeps that bound close to what is really unsent.
        """
        bound = self.settings.max_unsent_bytes
        connection = self.connection
        connection.bufferSize = bound
        handle = socket_of(connection)
        if handle is not None:  # else a test transport: the Twisted bound still holds
            try:
                handle.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, bound)
            except OSError:
                pass
        connection.registerProducer(cast(IPushProducer, self), True)

    def pauseProducing(self) -> None:
        if self.state is CLOSED or self._decided is CloseReason.SLOW_CONSUMER:
            return
        unsent = self.settings.max_unsent_ms
        self._decided = CloseReason.SLOW_CONSUMER
        self._detail = f"more than {unsent} ms of audio unsent"
        if self.state is not CLOSING:
            self._beginClosing()
        self._abort()

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass

    # IHalfCloseableProtocol: only so that an end of stream reaches us while
    # the socket is still open.

    def readConnectionLost(self) -> None:
        """
        The peer's side of the stream ended, cleanly as far as Twisted knows.
        Its poll reactors also say so, without reading, when epoll reports a
        reset as HUP|ERR without IN (twisted#4604; about one reset in 10,000
        under load here), so ask the socket for its pending error. How the
        peer ended is settled here; closing our side (bounded like every close)
        cannot change it.
        """
        pending = 0
        connection = self.connection
        handle = socket_of(connection)
        if handle is not None:  # a test transport has none
            try:
                pending = handle.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            except OSError:
                pass
        self._peerEnd = Loss.RESET if pending or self._peerReset else Loss.CLEAN
        if self.state is AWAITING_UUID or self.state is LIVE:
            self._beginClosing()
        self._loseConnection()

    def writeConnectionLost(self) -> None:
        """Not used: audiohangup never half-closes its side."""

    # The end

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._leaveRelay()
        for name in list(self._timers):
            self._cancelTimer(name)
        self.pacer.remove(self._leg)
        self.queue.clear()
        self.state = CLOSED
        self.ended_at = self.reactor.seconds()
        loss = loss_of(reason)
        if self._peerEnd is not None and loss is not Loss.OTHER:
            # After the peer's end of stream: our flush may meet its RST, or
            # the close timer may abort; what the peer did is the reason.
            loss = self._peerEnd
        elif loss is Loss.CLEAN and self._peerReset:
            loss = Loss.RESET  # a direct send met the reset first (see _write)
        self.close_reason = classify(
            hangup_sent=self.hangup_sent, decided=self._decided, loss=loss
        )
        try:
            self._logEnd(loss, reason)
        finally:
            try:
                self.registry.disconnected(self._leg)
            finally:
                waiting, self._waiting = self._waiting, []
                for waiter in waiting:
                    waiter.callback(self.close_reason)

    def _logEnd(self, loss: Loss, failure: Failure) -> None:
        reason = self.close_reason
        assert reason is not None
        duration = (self.ended_at or self.connected_at) - self.connected_at
        fields = dict(
            self._fields(),
            reason=reason,
            cause=self.hangup_cause,
            duration=duration,
            explanation=reason.explanation,
            detail=self._detail,
            detail_text=f": {self._detail}" if self._detail else "",
            hangup_to_close_ms=self.hangup_to_close_ms,
            cause_text="",
        )
        if self.hangup_to_close_ms is not None:
            fields["cause_text"] = (
                f"; hangup cause {self.hangup_cause}, gone {self.hangup_to_close_ms:g} ms after it"
            )
        text = (
            "{call_id} {role} leg ended: {reason} ({explanation}{detail_text}); "
            "peer {peer}, {duration:.3f} s{cause_text}"
        )
        if loss is Loss.OTHER:
            self.log.failure(text, failure=failure, **fields)
        else:
            self.log.emit(reason.level, text, **fields)


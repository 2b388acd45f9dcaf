# -*- test-case-name: tests.test_protocol -*-
"""
The Twisted side of one AudioSocket leg: framing in, hangup out, and a bounded,
quiet teardown.

Hanging up is what Asterisk needs: write C{00 00 00} once, write nothing after
it, keep reading and discarding, wait for the peer to close, and abort only if
it has not closed within the close timeout. C{connectionLost} then names how
the leg ended (see L{audiohangup.reasons}) and logs it once.
"""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTime, ITCPTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from audiohangup.reasons import CloseReason, HangupCause, Loss, Role, classify, loss_of
from audiohangup.registry import LegKey, Registry
from audiohangup.wire import HANGUP_FRAME, SAMPLE_RATES, FrameDecoder, Kind, describe_error_code

#: Digits kept per leg: enough for any PIN or menu path, bounded for a hostile peer.
MAX_DTMF_DIGITS = 64


@dataclass(frozen=True)
class LegSettings:
    """Timeouts every leg shares (C{--close-timeout}, C{--uuid-timeout})."""

    close_timeout: float = 2.0
    uuid_timeout: float = 5.0


class LegState(str, enum.Enum):
    AWAITING_UUID = "awaiting_uuid"
    LIVE = "live"
    CLOSING = "closing"
    CLOSED = "closed"

    def __str__(self) -> str:
        return str(self.value)


def describe_address(address: IAddress) -> str:
    """C{host:port}, C{[v6]:port} or C{unix:path}: short enough for every log line."""
    if isinstance(address, IPv4Address):
        return f"{address.host}:{address.port}"
    if isinstance(address, IPv6Address):
        return f"[{address.host}]:{address.port}"
    if isinstance(address, UNIXAddress):
        name = address.name
        return f"unix:{name.decode() if isinstance(name, bytes) else name}" if name else "unix"
    return str(address)


def iso_time(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="milliseconds")


class AudioSocketProtocol(Protocol):
    """
    One AudioSocket connection. It becomes a leg, keyed by (call id, role),
    once its UUID frame arrives; before that it is only a connection.
    """

    log = Logger()

    def __init__(
        self, role: Role, registry: Registry, settings: LegSettings, reactor: IReactorTime
    ) -> None:
        self.role = role
        self.registry = registry
        self.settings = settings
        self.reactor = reactor
        self.state = LegState.AWAITING_UUID
        self.call_id: str | None = None
        self.peer = "-"
        self.connected_at = 0.0
        self.ended_at: float | None = None
        self.frames_in = 0
        self.frames_out = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.dtmf = ""
        self.hangup_cause: HangupCause | None = None
        self.hangup_at: float | None = None
        self.close_reason: CloseReason | None = None
        self._decided: CloseReason | None = None
        self._detail = ""
        self._decoder = FrameDecoder()
        self._uuid_timer: IDelayedCall | None = None
        self._close_timer: IDelayedCall | None = None
        self._waiting: list[Deferred[CloseReason]] = []

    def logPrefix(self) -> str:
        return f"audiosocket-{self.role}"

    @property
    def key(self) -> LegKey | None:
        return None if self.call_id is None else (self.call_id, self.role)

    @property
    def hangup_sent(self) -> bool:
        return self.hangup_cause is not None

    def _fields(self) -> dict[str, Any]:
        return {"call_id": self.call_id or "-", "role": self.role, "peer": self.peer}

    # Connection events

    def connectionMade(self) -> None:
        self.connected_at = self.reactor.seconds()
        self.peer = describe_address(self.transport.getPeer())
        if ITCPTransport.providedBy(self.transport):
            # Asterisk fails a frame whose pieces arrive over 5 ms apart.
            self.transport.setTcpNoDelay(True)
        self.registry.connected(self)
        self._uuid_timer = self.reactor.callLater(
            self.settings.uuid_timeout, self._uuidTimedOut
        )

    def dataReceived(self, data: bytes) -> None:
        self.bytes_in += len(data)
        if self.state is LegState.CLOSING or self.state is LegState.CLOSED:
            return  # after a hangup or a close decision: read and discard
        for frame in self._decoder.feed(data):
            self.frames_in += 1
            if self.state is LegState.AWAITING_UUID:
                self._uuidFrameReceived(frame.kind, frame.payload)
            else:
                self._frameReceived(frame.kind, frame.payload)
            if self.state is not LegState.LIVE and self.state is not LegState.AWAITING_UUID:
                return

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:
        for timer in (self._uuid_timer, self._close_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self._uuid_timer = self._close_timer = None
        self.state = LegState.CLOSED
        self.ended_at = self.reactor.seconds()
        loss = loss_of(reason)
        self.close_reason = classify(
            hangup_sent=self.hangup_sent, decided=self._decided, loss=loss
        )
        try:
            self._logEnd(loss, reason)
        finally:
            self.registry.disconnected(self)
            waiting, self._waiting = self._waiting, []
            for waiter in waiting:
                waiter.callback(self.close_reason)

    # Frames

    def _uuidFrameReceived(self, kind: int, payload: bytes) -> None:
        if kind != Kind.UUID:
            self._closeFor(CloseReason.PROTOCOL_ERROR, f"first frame is kind 0x{kind:02x}, not a UUID")
        elif len(payload) != 16:
            self._closeFor(CloseReason.PROTOCOL_ERROR, f"UUID payload of {len(payload)} bytes, not 16")
        else:
            self._start(str(uuid.UUID(bytes=payload)))

    def _frameReceived(self, kind: int, payload: bytes) -> None:
        if kind in SAMPLE_RATES:
            if not payload:
                self._closeFor(CloseReason.PROTOCOL_ERROR, "audio frame of length 0")
        elif kind == Kind.DTMF:
            if len(payload) != 1:
                self._closeFor(CloseReason.PROTOCOL_ERROR, f"DTMF payload of {len(payload)} bytes, not 1")
            else:
                self._dtmfReceived(payload.decode("latin-1"))
        elif kind == Kind.HANGUP:
            self._closeFor(CloseReason.PEER_HANGUP, "")
        elif kind == Kind.ERROR:
            self._closeFor(CloseReason.PEER_ERROR, f"error code {describe_error_code(payload)}")
        elif kind == Kind.UUID:
            self._closeFor(CloseReason.PROTOCOL_ERROR, "second UUID frame")
        else:
            self.log.debug(
                "{call_id} {role} skipped a frame of unknown kind 0x{kind:02x} ({length} bytes)",
                kind=kind, length=len(payload), **self._fields(),
            )

    def _dtmfReceived(self, digit: str) -> None:
        self.dtmf = (self.dtmf + digit)[-MAX_DTMF_DIGITS:]
        self.log.info("{call_id} {role} DTMF {digit!r}", digit=digit, **self._fields())

    def _start(self, call_id: str) -> None:
        self._cancelUuidTimer()
        self.call_id = call_id
        self.state = LegState.LIVE
        replaced = self.registry.register(self)
        self.log.info("{call_id} {role} leg started from {peer}", **self._fields())
        if replaced is not None:
            self.log.info(
                "{call_id} {role} leg from {old_peer} is replaced by the one from {peer}",
                old_peer=replaced.peer, **self._fields(),
            )
            replaced.hangup(HangupCause.REPLACED)

    # Ending a leg

    def send(self, data: bytes) -> bool:
        """Write one whole frame, unless the leg is closing: nothing follows C{00 00 00}."""
        if self.state is not LegState.LIVE:
            return False
        self._write(data)
        return True

    def _write(self, data: bytes) -> None:
        self.frames_out += 1
        self.bytes_out += len(data)
        self.transport.write(data)

    def hangup(self, cause: HangupCause) -> Deferred[CloseReason]:
        """
        Send C{00 00 00} once and wait, bounded, for the peer to close.

        Idempotent: on a leg already closing this only waits.

        @return: fires with the leg's close reason once the leg is gone.
        """
        if self.state is LegState.AWAITING_UUID or self.state is LegState.LIVE:
            self.hangup_cause = cause
            self.hangup_at = self.reactor.seconds()
            self._write(HANGUP_FRAME)
            self.log.info("{call_id} {role} hangup sent (cause {cause})", cause=cause, **self._fields())
            self._beginClosing()
        return self.whenGone()

    def whenGone(self) -> Deferred[CloseReason]:
        """A Deferred that fires with the close reason once the leg is gone."""
        if self.close_reason is not None:
            return succeed(self.close_reason)
        waiter: Deferred[CloseReason] = Deferred()
        self._waiting.append(waiter)
        return waiter

    def _closeFor(self, reason: CloseReason, detail: str) -> None:
        """The peer ended or broke the leg: send nothing more and close our side."""
        self._decided = reason
        self._detail = detail
        self._beginClosing()
        self.transport.loseConnection()

    def _beginClosing(self) -> None:
        self.state = LegState.CLOSING
        self._cancelUuidTimer()
        self._close_timer = self.reactor.callLater(
            self.settings.close_timeout, self._closeTimedOut
        )

    def _cancelUuidTimer(self) -> None:
        if self._uuid_timer is not None and self._uuid_timer.active():
            self._uuid_timer.cancel()
        self._uuid_timer = None

    def _uuidTimedOut(self) -> None:
        self._uuid_timer = None
        self._closeFor(CloseReason.UUID_TIMEOUT, f"none within {self.settings.uuid_timeout:g} s")

    def _closeTimedOut(self) -> None:
        self._close_timer = None
        self.transport.abortConnection()

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
            hangup_to_close_ms=None,
            cause_text="",
        )
        if self.hangup_at is not None and self.ended_at is not None:
            fields["hangup_to_close_ms"] = round((self.ended_at - self.hangup_at) * 1000, 1)
            fields["cause_text"] = (
                f"; hangup cause {self.hangup_cause}, gone {fields['hangup_to_close_ms']:g} ms after it"
            )
        text = (
            "{call_id} {role} leg ended: {reason} ({explanation}{detail_text}); "
            "peer {peer}, {duration:.3f} s{cause_text}"
        )
        if loss is Loss.OTHER:
            self.log.failure(text, failure=failure, **fields)
        else:
            self.log.emit(reason.level, text, **fields)

    def snapshot(self) -> dict[str, Any]:
        """What the HTTP API shows of a live leg."""
        return {
            "role": self.role,
            "state": self.state,
            "peer": self.peer,
            "connected_at": iso_time(self.connected_at),
            "frames_in": self.frames_in,
            "frames_out": self.frames_out,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "dtmf": self.dtmf,
        }


class AudioSocketFactory(Factory):
    """Builds the legs of one role; one factory per listening endpoint."""

    noisy = False

    def __init__(
        self,
        role: Role,
        registry: Registry,
        settings: LegSettings | None = None,
        reactor: IReactorTime | None = None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor  # type: ignore[assignment]
        self.role = role
        self.registry = registry
        self.settings = settings or LegSettings()
        self.reactor: IReactorTime = reactor  # type: ignore[assignment]

    def buildProtocol(self, addr: IAddress) -> AudioSocketProtocol:
        protocol = AudioSocketProtocol(self.role, self.registry, self.settings, self.reactor)
        protocol.factory = self
        return protocol

    def logPrefix(self) -> str:
        return f"audiosocket-{self.role}"

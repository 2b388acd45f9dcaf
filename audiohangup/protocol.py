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
import errno
import math
import socket
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, cast, runtime_checkable
from typing import Protocol as TypingProtocol

from twisted.internet import tcp
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import (
    IAddress,
    IConsumer,
    IDelayedCall,
    IHalfCloseableProtocol,
    IPushProducer,
    IReactorTime,
    ISystemHandle,
    ITCPTransport,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Attribute, implementer

from audiohangup.audio import FRAME_SECONDS, SLIN, AudioFormat, FrameQueue, Playout
from audiohangup.codecs import mix
from audiohangup.interfaces import ILeg, ILegTap, IMediaStream, IPacedLeg
from audiohangup.pacer import CATCH_UP_TICKS, Pacer
from audiohangup.reasons import CloseReason, HangupCause, Loss, Role, classify, loss_of
from audiohangup.registry import LegKey, Registry
from audiohangup.relay import Relay
from audiohangup.session import Session
from audiohangup.sources import source_of
from audiohangup.wire import (
    HANGUP_FRAME,
    HEADER,
    HEADER_SIZE,
    SAMPLE_RATES,
    Frame,
    FrameDecoder,
    Kind,
    describe_error_code,
)

#: Digits kept per leg: enough for any PIN or menu path, bounded for a hostile peer.
MAX_DTMF_DIGITS = 64

#: DTMF digits logged at info per leg and second. A person keys a few a
#: second, and Q.24 tones (40 ms at least, 40 ms apart) come at most 12.5 a
#: second; a flood beyond this is counted (audiohangup_dtmf_total), not
#: logged, so it cannot write more log than it sends.
DTMF_LOG_PER_SECOND = 10

#: Bridged frames a leg holds for its next ticks while its slots are the
#: pacer's (its app or a prompt spoke lately); beyond it the oldest goes, so
#: the bridge is never more than this many frames behind.
BRIDGE_HOLD = 2

#: Ticks after the last frame of a prompt or an app during which bridged
#: frames keep to the ticks: an app that stutters (a frame every other tick)
#: must not let the bridge slip extra frames in between its own.
SPOKEN_TICKS = 10


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
    def max_play_bytes(self) -> int:
        """The longest raw audio a leg's queue holds whole: what /play accepts."""
        return self.max_queue_frames * self.audio.frame_bytes

    @property
    def max_unsent_bytes(self) -> int:
        """Outbound bytes a leg may leave unsent before it counts as a slow consumer."""
        frames = max(1, int(self.max_unsent_ms / (FRAME_SECONDS * 1000)))
        return frames * len(self.audio.silence_frame)


class LegState(str, enum.Enum):
    AWAITING_UUID = "awaiting_uuid"
    LIVE = "live"
    CLOSING = "closing"
    CLOSED = "closed"

    def __str__(self) -> str:
        return str(self.value)


# The states as module names for the checks every frame makes: on CPython
# 3.11 a member looked up through its Enum class costs about 90 ns, more
# than the rest of such a check.
AWAITING_UUID = LegState.AWAITING_UUID
LIVE = LegState.LIVE
CLOSING = LegState.CLOSING
CLOSED = LegState.CLOSED


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


@runtime_checkable
class SocketOptions(TypingProtocol):
    """What a leg asks of the socket under its transport."""

    def getsockopt(self, level: int, option: int, /) -> int: ...

    def setsockopt(self, level: int, option: int, value: int, /) -> None: ...


def _socket_of(transport: object) -> SocketOptions | None:
    """The socket under a transport (TCP, or TLS over TCP); None for a test transport."""
    if ISystemHandle.providedBy(transport):
        handle = transport.getHandle()
        if isinstance(handle, SocketOptions):
            return handle
    return None


def iso_time(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="milliseconds")


class ILegTransport(ITCPTransport, IConsumer):
    """
    What a leg uses of its transport: a TCP connection (plain or TLS) that
    buffers what the socket does not take, up to C{bufferSize} before it
    pauses its producer.
    """

    bufferSize: int = Attribute("Bytes buffered before the transport pauses its producer.")


@implementer(IPacedLeg, IPushProducer, IHalfCloseableProtocol)
class AudioSocketProtocol(Protocol):
    """
    One AudioSocket connection. It becomes a leg, keyed by (call id, role),
    once its UUID frame arrives; before that it is only a connection.

    From the UUID on, the shared L{Pacer} asks it for one frame per 20 ms:
    queued audio (a prompt, an echo) first, else nothing if audio was just
    forwarded to it (a bridge), else silence.
    """

    log = Logger()

    # Slots: the relay and the pacer read a dozen of a leg's attributes for
    # every frame and every tick, across hundreds of legs. In slots they sit
    # in a few cache lines of the object, not in a dict of over 40 keys.
    # The hot ones come first; what Twisted sets (transport, factory,
    # connected) stays in the instance dict, as do a test's patches.
    __slots__ = (  # noqa: RUF023 (in order of heat, not of name)
        "state", "route", "bytes_in", "frames_in", "last_frame_at", "taps", "_decoder",
        "_audioFrameSize", "_audioHeader", "reactor", "queue", "feed", "forwarded_at", "written_in", "held", "idle_after",
        "frames_out", "bytes_out", "heard", "_socket", "_buffered", "_tcp",
        "role", "registry", "settings", "format", "pacer", "relay", "call_id", "session", "peer",
        "connected_at", "ended_at", "dtmf", "dtmf_count", "_dtmfSecond", "_dtmfLogged", "recording", "streams",
        "hangup_cause", "hangup_at", "close_reason", "_decided", "_detail", "_timers", "_waiting", "_after_playout",
        "_wrong_kind_logged", "_peerReset", "_peerEnd", "_late", "_lateUntil", "_spokenIn",
    )

    def __init__(
        self,
        role: Role,
        registry: Registry,
        settings: LegSettings,
        reactor: IReactorTime,
        pacer: Pacer,
        relay: Relay | None = None,
    ) -> None:
        self.role = role
        self.registry = registry
        self.settings = settings
        self.format = settings.audio
        self.reactor = reactor
        self.pacer = pacer
        #: Reads this leg's socket in its pass over every leg, when the leg is plain TCP.
        self.relay = relay
        self.state = AWAITING_UUID
        self.call_id: str | None = None
        self.session: Session | None = None
        self.peer = "-"
        self.connected_at = 0.0
        self.ended_at: float | None = None
        self.last_frame_at = 0.0
        self.frames_in = 0
        self.frames_out = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.dtmf = ""
        self.dtmf_count = 0
        #: When the second of DTMF logging began, and the digits logged in it.
        self._dtmfSecond = -math.inf
        self._dtmfLogged = 0
        self.queue = FrameQueue(settings.max_queue_frames)
        #: What a converse media stream sends the leg: paced after queued prompts.
        self.feed: Playout | None = None
        self.taps: list[ILegTap] = []
        self.heard: list[ILegTap] = []
        self.recording: str | None = None
        self.streams: list[IMediaStream] = []
        #: The leg the built-in bridge forwards this one's audio to, byte for byte (see dataReceived).
        self.route: ILeg | None = None
        fmt = self.format
        self._audioHeader = HEADER.pack(fmt.kind, fmt.frame_bytes)
        self._audioFrameSize = HEADER_SIZE + fmt.frame_bytes
        self.hangup_cause: HangupCause | None = None
        self.hangup_at: float | None = None
        self.close_reason: CloseReason | None = None
        self._decided: CloseReason | None = None
        self._detail = ""
        self._decoder = FrameDecoder()
        self._timers: dict[str, IDelayedCall] = {}
        self._waiting: list[Deferred[CloseReason]] = []
        #: When audio was last bridged to this leg; the pacer sends no silence soon after.
        self.forwarded_at = -math.inf
        #: The pacer's slot this leg last had a frame written in: one frame a slot, whatever feeds it.
        self.written_in = -1
        #: Bridged frames whose slot had a frame already, for the next ticks.
        self.held: deque[bytes] = deque(maxlen=BRIDGE_HOLD)
        #: The slot of the last queued or fed frame (a prompt's, an app's).
        self._spokenIn = -SPOKEN_TICKS - 1
        #: Frames due in slots a late tick missed and not yet dropped, until slot C{_lateUntil}.
        self._late = 0
        self._lateUntil = 0
        #: Seconds without a frame from the peer before the idle hangup (inf: never).
        self.idle_after = settings.idle_timeout or math.inf
        self._after_playout: HangupCause | None = None
        self._wrong_kind_logged = False
        #: The plain TCP connection under this leg, if it is one, and its
        #: socket, which _write sends to while the transport buffers nothing.
        self._tcp: tcp.Connection | None = None
        self._socket: socket.socket | None = None
        #: Bytes of ours went to the transport's buffer and may still be there.
        self._buffered = False
        self._peerReset = False  # a reset the transport's reason may not show
        self._peerEnd: Loss | None = None  # how the peer ended its side, seen at its end of stream

    def logPrefix(self) -> str:
        return f"audiosocket-{self.role}"

    @property
    def key(self) -> LegKey | None:
        return None if self.call_id is None else (self.call_id, self.role)

    @property
    def live(self) -> bool:
        return self.state is LIVE

    @property
    def hangup_sent(self) -> bool:
        return self.hangup_cause is not None

    @property
    def hangup_to_close_ms(self) -> float | None:
        """Milliseconds from our hangup to the leg being gone (to 0.1 ms), once both happened."""
        if self.hangup_at is None or self.ended_at is None:
            return None
        return round((self.ended_at - self.hangup_at) * 1000, 1)

    @property
    def wire(self) -> ILegTransport:
        """
        The leg's transport. Twisted sets it before the first event reaches
        the protocol, so it is there whenever a leg acts; its declared type
        is only C{ITransport}, the leg needs a TCP transport and a consumer.
        """
        transport = self.transport
        assert transport is not None, "the leg has no transport yet"
        return cast(ILegTransport, transport)

    def _fields(self) -> dict[str, Any]:
        return {"call_id": self.call_id or "-", "role": self.role, "peer": self.peer}

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

    # Connection events

    def connectionMade(self) -> None:
        self.connected_at = self.last_frame_at = self.reactor.seconds()
        wire = self.wire
        address = wire.getPeer()
        self.peer = describe_address(address)
        if not self._admitted(source_of(address)):
            return
        if ITCPTransport.providedBy(wire):
            # Asterisk fails a frame whose pieces arrive over 5 ms apart.
            wire.setTcpNoDelay(True)
        # A plain TCP transport (not TLS, not a test double) can take a frame
        # straight away when its buffer is empty; see _write.
        if isinstance(wire, tcp.Connection) and hasattr(wire, "_tempDataBuffer"):
            self._tcp = wire
            self._socket = wire.socket
            if self.relay is not None:
                self.relay.adopt(self, wire)
        self._watchBackPressure()
        self._setTimer("uuid", self.settings.uuid_timeout, self._uuidTimedOut)

    def _admitted(self, source: str | None) -> bool:
        """
        Count the connection in, or refuse it as C{over_capacity}. Asterisk
        sends its UUID at once, so a connection still waiting for it is the
        likeliest to be junk: the oldest one makes way for a newcomer (past
        C{--max-pending-per-source}, the source's own; at C{--max-legs}, that
        of the source with the most: see L{audiohangup.registry.PendingConnections})
        rather than let connections without a UUID keep real legs out. Only
        legs and connections already closing refuse a newcomer.
        """
        registry, settings = self.registry, self.settings
        if registry.connection_count >= settings.max_legs:
            oldest = registry.pending.oldest_of_most()
            if oldest is None:
                self._closeFor(
                    CloseReason.OVER_CAPACITY,
                    f"{registry.connection_count} connections open, --max-legs {settings.max_legs}",
                )
                return False
            self._crowd(oldest, "--max-legs", f"--max-legs {settings.max_legs} connections are open")
        registry.connected(self, source)
        cap = settings.max_pending_per_source
        if source is not None and cap and registry.pending.count(source) > cap:
            # None: every one has its bytes waiting, to be read in this pass; they are no flood.
            oldest = registry.pending.oldest(source)
            if oldest is not None:
                self._crowd(oldest, source, f"over --max-pending-per-source {cap} connections without a UUID from {source}")
        return True

    def _crowd(self, oldest: ILeg, key: str, detail: str) -> None:
        """Close C{oldest} (pending) for this newcomer; logged once a minute per source or for --max-legs."""
        waited = self.connected_at - oldest.connected_at
        oldest.crowdOut(f"{detail}; it waited {waited:.3f} s")
        if self.registry.pending.logNow(key, self.connected_at):
            self.log.warn(
                "{role}: {detail}: the oldest connection without a UUID is closed for each new one "
                "(reason too_many_pending, counted in audiohangup_connections_without_leg_total; logged "
                "once a minute per source)",
                detail=detail, role=self.role,
            )

    def bytesWaiting(self) -> bool:
        handle = _socket_of(self.wire)
        if not isinstance(handle, socket.socket):
            return False  # TLS (its bytes say nothing yet) or a test transport
        try:
            return bool(handle.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
        except OSError:  # nothing waits (EAGAIN), or an error the next read will find
            return False

    def crowdOut(self, detail: str) -> None:
        """Close this connection, still without its UUID: a newer one needs its place."""
        if self.state is AWAITING_UUID:
            self._closeFor(CloseReason.TOO_MANY_PENDING, detail)

    def _watchBackPressure(self) -> None:
        """
        A peer that stops reading must not grow our memory: the transport
        pauses its producer (this leg) once more than C{max_unsent_bytes} wait
        in its buffer, and the leg is then aborted as C{slow_consumer}. A small
        kernel send buffer keeps that bound close to what is really unsent.
        """
        bound = self.settings.max_unsent_bytes
        wire = self.wire
        wire.bufferSize = bound
        handle = _socket_of(wire)
        if handle is not None:  # else a test transport: the Twisted bound still holds
            try:
                handle.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, bound)
            except OSError:
                pass
        wire.registerProducer(self, True)

    # IPushProducer: the transport tells us when the peer is not keeping up.

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

    def dataReceived(self, data: bytes) -> None:
        self.bytes_in += len(data)
        route = self.route
        if (
            route is not None and self.state is LIVE and len(data) == self._audioFrameSize
            and data.startswith(self._audioHeader) and not self.taps and not self._decoder.pending
        ):
            # The common case of a bridged call: one whole frame of this leg's
            # own audio, bridged to the route by the built-in flow: the same
            # bytes go out, with no parse, no frame object and no flow call.
            self.frames_in += 1
            self.last_frame_at = self.reactor.seconds()
            route.forwardBytes(data)
            return
        if self.state is CLOSING or self.state is CLOSED:
            return  # after a hangup or a close decision: read and discard
        frames = self._decoder.feed(data)
        if not frames:
            return
        self.last_frame_at = self.reactor.seconds()
        for frame in frames:
            if self.state is LIVE:
                self.frames_in += 1
                self._frameReceived(frame)
            elif self.state is AWAITING_UUID:
                self.frames_in += 1
                self._uuidFrameReceived(frame.kind, frame.payload)
            else:
                return  # the rest of the chunk follows a close decision

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
        wire = self.wire
        handle = _socket_of(wire)
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

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._leaveRelay()
        for name in list(self._timers):
            self._cancelTimer(name)
        self.pacer.remove(self)
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
                self.registry.disconnected(self)
            finally:
                waiting, self._waiting = self._waiting, []
                for waiter in waiting:
                    waiter.callback(self.close_reason)

    # Frames in

    def _uuidFrameReceived(self, kind: int, payload: bytes) -> None:
        if kind != Kind.UUID:
            self._closeFor(CloseReason.PROTOCOL_ERROR, f"first frame is kind 0x{kind:02x}, not a UUID")
        elif len(payload) != 16:
            self._closeFor(CloseReason.PROTOCOL_ERROR, f"UUID payload of {len(payload)} bytes, not 16")
        else:
            self._start(str(uuid.UUID(bytes=payload)))

    def _frameReceived(self, frame: Frame) -> None:
        kind = frame.kind
        if kind in SAMPLE_RATES:
            if not frame.payload:
                self._closeFor(CloseReason.PROTOCOL_ERROR, "audio frame of length 0")
                return
            if kind != self.format.kind and not self._wrong_kind_logged:
                self._wrong_kind_logged = True
                self.log.warn(
                    "{call_id} {role} sends audio of kind 0x{kind:02x}, not the 0x{expected:02x} "
                    "of --audio {audio}; check the dialplan's codec",
                    kind=kind, expected=self.format.kind, audio=self.format.name, **self._fields(),
                )
            assert self.session is not None
            self.session.audioReceived(self, frame)
            if self.taps:
                self._tell("legAudio", lambda tap: tap.legAudio(frame))
        elif kind == Kind.DTMF:
            if len(frame.payload) != 1:
                self._closeFor(
                    CloseReason.PROTOCOL_ERROR, f"DTMF payload of {len(frame.payload)} bytes, not 1"
                )
            else:
                self._dtmfReceived(frame.payload.decode("latin-1"))
        elif kind == Kind.HANGUP:
            self._closeFor(CloseReason.PEER_HANGUP, "")
        elif kind == Kind.ERROR:
            self._closeFor(CloseReason.PEER_ERROR, f"error code {describe_error_code(frame.payload)}")
        elif kind == Kind.UUID:
            self._closeFor(CloseReason.PROTOCOL_ERROR, "second UUID frame")
        else:
            self.log.debug(
                "{call_id} {role} skipped a frame of unknown kind 0x{kind:02x} ({length} bytes)",
                kind=kind, length=len(frame.payload), **self._fields(),
            )

    def _dtmfReceived(self, digit: str) -> None:
        self.dtmf = (self.dtmf + digit)[-MAX_DTMF_DIGITS:]
        self.dtmf_count += 1
        self._logDtmf(digit)
        assert self.session is not None
        self.session.dtmfReceived(self, digit)
        if self.taps:
            self._tell("legDtmf", lambda tap: tap.legDtmf(digit))

    def _logDtmf(self, digit: str) -> None:
        """Each digit at info, up to L{DTMF_LOG_PER_SECOND} a second; then one warning for the rest of it."""
        now = self.reactor.seconds()
        if now - self._dtmfSecond >= 1.0:
            self._dtmfSecond = now
            self._dtmfLogged = 0
        self._dtmfLogged += 1
        if self._dtmfLogged <= DTMF_LOG_PER_SECOND:
            self.log.info("{call_id} {role} DTMF {digit!r}", digit=digit, **self._fields())
        elif self._dtmfLogged == DTMF_LOG_PER_SECOND + 1:
            self.log.warn(
                "{call_id} {role} sends over {limit} DTMF digits a second: more this second are "
                "counted (audiohangup_dtmf_total), not logged",
                limit=DTMF_LOG_PER_SECOND, **self._fields(),
            )

    def _tell(self, event: str, call: Callable[[ILegTap], object]) -> None:
        """C{call} on every tap (typed, which mypy checks); one tap's bug is logged and reaches neither the leg nor the others."""
        for tap in list(self.taps):
            try:
                call(tap)
            except Exception:
                self.log.failure(
                    "{call_id} {role} {tap} failed in {event}", tap=type(tap).__name__, event=event, **self._fields()
                )

    def _start(self, call_id: str) -> None:
        self._cancelTimer("uuid")
        self.registry.pending.discard(self)
        self.call_id = call_id
        holder = self.registry.holder(call_id, self.role)
        if holder is not None:
            # Never a leg: no session, no pacer, nothing of the call written to it.
            self._decided = CloseReason.DUPLICATE
            self._detail = f"the live leg is from {holder.peer}"
            self._sendHangup(HangupCause.DUPLICATE)
            return
        self.state = LIVE
        self.log.info("{call_id} {role} leg started from {peer}", **self._fields())
        self.pacer.add(self)
        if self.settings.max_duration:
            self._setTimer("max_duration", self.settings.max_duration, self.hangup, HangupCause.MAX_DURATION)
        self.session, replaced = self.registry.register(self)
        if replaced is not None:
            self.log.info(
                "{call_id} {role} leg from {old_peer} is replaced by the one from {peer}",
                old_peer=replaced.peer, **self._fields(),
            )
            replaced.hangup(HangupCause.REPLACED)

    # Frames out: nothing is ever written after 00 00 00.

    def send(self, data: bytes) -> bool:
        """Write one whole encoded frame now, unless the leg is not live."""
        if self.state is not LIVE:
            return False
        self._write(data)
        return True

    def _write(self, data: bytes) -> None:
        self.frames_out += 1
        self.bytes_out += len(data)
        if self.heard:
            for tap in self.heard:
                tap.legHeard(data)
        sock = self._socket
        if sock is not None and self._buffered:
            # Only this method writes to the transport, so its buffer can hold
            # bytes only after we gave it some: look at it only then.
            connection = self._tcp
            assert connection is not None
            self._buffered = bool(connection.dataBuffer or connection._tempDataBuffer)
        if sock is not None and not self._buffered:
            # Nothing is queued ahead of this frame: send it now rather than at
            # the reactor's next write pass, which comes only after every other
            # socket that was readable has been read (a whole burst of legs),
            # and costs two epoll_ctl calls per frame. What the socket does not
            # take, Twisted buffers as usual, in order.
            # The socket's own send: what writeSomeData does, without its
            # memoryview and EINTR wrapper, on the one path every frame takes.
            try:
                sent = sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as error:
                if error.errno != errno.ENOBUFS:
                    # The send found the peer gone (a reset). That error is now
                    # spent: the read that follows may see a plain end of
                    # stream, so remember it for connectionLost.
                    self._peerReset = True
                sent = 0
            if sent == len(data):
                return
            data = data[sent:]
            self._buffered = True
        self.wire.write(data)

    def forward(self, frame: Frame) -> None:
        """
        Bridge a frame from another leg: written at once, one write, same
        bytes. While a prompt or an app speaks to the leg (and for
        L{SPOKEN_TICKS} after), its slots are the pacer's: a bridged frame
        in a slot that had its frame waits for the next tick. Queued audio
        (a prompt) has the floor, and so has an app's speech under
        C{--stream-audio floor}: the bridged frame is dropped; under C{mix}
        it waits to be summed with the app's.
        """
        self.forwardBytes(frame.encode())

    def forwardBytes(self, data: bytes) -> None:
        """L{forward} for a frame still encoded, as it arrived on the other leg."""
        if self.state is LIVE:
            slot = self.pacer.slot
            if not self.queue and not self.feed and (
                self.written_in != slot or slot - self._spokenIn > SPOKEN_TICKS
            ):
                # A bridge alone is paced by the other leg's Asterisk: what
                # it sends goes through as it comes, a burst included.
                self._write(data)
                self.written_in = slot
            elif not self.queue and (not self.feed or self.feed.mix):
                self.held.append(data)
            self.forwarded_at = self.reactor.seconds()

    def queueFrames(self, frames: list[bytes]) -> int:
        """Queue encoded frames for the pacer; return how many old ones were dropped."""
        if self.state is not LIVE:
            return 0
        dropped = self.queue.push(frames)
        if dropped:
            self.log.debug("{call_id} {role} queue full: dropped {dropped} frames", dropped=dropped, **self._fields())
        return dropped

    def play(self, audio: bytes) -> int:
        """Queue raw audio in the leg's format, cut into 20 ms frames."""
        return self.queueFrames(self.format.frames(audio))

    @property
    def queued_ms(self) -> int:
        return round(len(self.queue) * FRAME_SECONDS * 1000)

    def paceTick(self, now: float, bridged_since: float, missed: int = 0) -> None:
        """
        The pacer's 20 ms tick: the idle check, then at most one frame:
        queued audio first, then the app's (summed with a held bridged frame
        under C{--stream-audio mix}), then a held bridged frame, else silence
        unless audio was bridged here since C{bridged_since}.

        After C{missed} slots without a tick, the audio due in them is
        dropped, not played late: see L{_catchUp}.
        """
        if self.state is not LIVE:
            return
        if now - self.last_frame_at >= self.idle_after:
            self.hangup(HangupCause.IDLE_TIMEOUT)
            return
        if missed or self._late:
            self._catchUp(missed)
        held, feed = self.held, self.feed
        frame: bytes | None = None
        fed = False  # a frame of the app's goes out
        if self.queue:
            frame = self.queue.popleft()
            held.clear()  # a prompt has the floor
            self._spokenIn = self.pacer.slot
        elif feed and (frame := feed.next_frame()) is not None:
            self._spokenIn = self.pacer.slot
            fed = True
            if not feed.mix:
                held.clear()  # the app has the floor
            elif held:
                frame = self._mixed(frame, held.popleft())
        else:
            if self._late:
                self._late += 1  # while catching up, this slot's audio is late too: it comes after the tick
            if held:
                frame = held.popleft()
            elif self.forwarded_at < bridged_since:
                frame = self.format.silence_frame
        if frame is not None:
            self._write(frame)
            self.written_in = self.pacer.slot
            if feed:
                feed.settle()  # the marks after it: that audio is out
        if feed is not None:
            feed.paced(self.pacer.slot, fed)
        if self._after_playout is not None and not self.queue and not self.feed:
            self.hangup(self._after_playout)

    def _catchUp(self, missed: int) -> None:
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
        slot = self.pacer.slot
        if missed:
            self._late += missed
            self._lateUntil = slot + CATCH_UP_TICKS
        elif slot > self._lateUntil:
            self._late = 0
            return
        late = self._late - self.queue.skip(self._late)
        if late and self.feed:
            late -= self.feed.skip(late)
        while late and self.held:
            self.held.popleft()
            late -= 1
        self._late = late

    def _mixed(self, app: bytes, bridged: bytes) -> bytes:
        """The app's frame and a bridged one, summed; the app's alone if they differ in size or kind."""
        if len(app) != len(bridged) or app[:3] != bridged[:3]:
            return app
        return app[:3] + mix(app[3:], bridged[3:], self.format)

    # Ending a leg

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
                self.registry.events.hangupSent(self, cause)
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

    def _closeFor(self, reason: CloseReason, detail: str) -> None:
        """The peer ended or broke the leg: send nothing more and close our side."""
        self._decided = reason
        self._detail = detail
        self._beginClosing()
        self._loseConnection()

    def _beginClosing(self) -> None:
        self.state = CLOSING
        self.registry.pending.discard(self)
        self.pacer.remove(self)
        self.queue.clear()
        self.held.clear()
        if self.feed is not None:
            self.feed.drain()  # its marks are answered: that audio will never play
        for name in ("uuid", "max_duration", "playout"):
            self._cancelTimer(name)
        self._setTimer("close", self.settings.close_timeout, self._abort)

    # Closing our side. Twisted reads nothing more of a transport that is
    # closing or aborted; nor may the relay, so the leg leaves it first.

    def _leaveRelay(self) -> None:
        if self.relay is not None:
            self.relay.release(self, resume=False)

    def _loseConnection(self) -> None:
        """Close once what is buffered is written."""
        self._leaveRelay()
        self.wire.loseConnection()

    def _abort(self) -> None:
        """Drop the connection now."""
        self._leaveRelay()
        self.wire.abortConnection()

    def _uuidTimedOut(self) -> None:
        self._closeFor(CloseReason.UUID_TIMEOUT, f"none within {self.settings.uuid_timeout:g} s")

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

    def summary(self) -> dict[str, Any]:
        """How an ended leg went, as the API and the live page show it."""
        ended = self.ended_at if self.ended_at is not None else self.reactor.seconds()
        return {
            "call_id": self.call_id,
            "role": self.role,
            "reason": self.close_reason,
            "cause": self.hangup_cause,
            "peer": self.peer,
            "started_at": iso_time(self.connected_at),
            "ended_at": iso_time(ended),
            "duration": round(ended - self.connected_at, 3),
        }

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
            "queued_ms": self.queued_ms,
            "dropped_frames": self.queue.dropped,
            "dtmf": self.dtmf,
            "streams": [stream.snapshot() for stream in self.streams],
        }


class AudioSocketFactory(Factory):
    """Builds the legs of one role; one factory per listening endpoint."""

    noisy = False

    def __init__(
        self,
        role: Role,
        registry: Registry,
        settings: LegSettings,
        reactor: IReactorTime,
        pacer: Pacer,
        relay: Relay | None = None,
    ) -> None:
        self.role = role
        self.registry = registry
        self.settings = settings
        self.reactor = reactor
        self.pacer = pacer
        self.relay = relay

    def buildProtocol(self, addr: IAddress | None) -> AudioSocketProtocol:
        protocol = AudioSocketProtocol(self.role, self.registry, self.settings, self.reactor, self.pacer, self.relay)
        protocol.factory = self
        return protocol

    def logPrefix(self) -> str:
        return f"audiosocket-{self.role}"

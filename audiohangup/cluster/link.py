# -*- test-case-name: tests.test_link -*-
"""
The media link: a leg that landed on one instance (the newcomer's) joins its
call's session on another (the home: the instance of the call's first leg, as
the directory says) through one TCP connection per remote leg.

What crosses it is AudioSocket's own framing (L{audiohangup.wire}), both
ways: audio and DTMF frames as the real leg sent them or is to hear them,
byte for byte, and control messages, each one frame of kind L{CONTROL}
holding a JSON object:

    home -> newcomer    {"type": "challenge", "instance_id": home, "nonce": hex}
    newcomer -> home    {"type": "hello", "instance_id", "call_id", "role", "format", "nonce", "mac"}
    home -> newcomer    {"type": "accepted", "mac"} or {"type": "refused", "why"}
    home -> newcomer    {"type": "hangup", "cause", "after_playout"}: the session hangs the leg up
                        (after_playout: false, the home has played its audio out by then)
    newcomer -> home    {"type": "ended", "reason", "cause"}: the real leg is gone, and how

Home to newcomer, every audio frame is what the leg is to hear now: the
home plays the remote leg's queue (C{/play}, a flow's C{play}) and a media
stream's audio with its own pacer, a frame per 20 ms slot, as for a leg of
its own (so its recorder hears them), and a hangup after the playout goes
as a plain hangup once it is played. The newcomer writes each frame to the
leg as it comes; its own pacer only fills the gaps with silence.

Only an instance of the cluster may link: the hello's C{mac} is the
HMAC-SHA256, under the instances' shared control token (C{--api-token},
which also signs what L{audiohangup.cluster.forward} forwards), of the
home's fresh nonce and the hello's fields; the acceptance's, of the
newcomer's nonce and the leg, so only the home takes the leg's audio. A client without it gets nothing but the challenge, is
closed, and is counted (C{audiohangup_connections_refused_total},
C{listener="link"}).

This module holds the messages and the home's side (the listener); the leg
the home registers is L{audiohangup.cluster.remoteleg.RemoteLeg}, the
newcomer's side is L{audiohangup.cluster.linker}.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHandshakeListener,
    IListeningPort,
    IPushProducer,
    IReactorTime,
    IStreamServerEndpoint,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from audiohangup.audio import AudioFormat, LegSettings
from audiohangup.cluster.linkio import LinkSocket, bound, set_up
from audiohangup.cluster.linkmessages import CONTROL, NONCE_BYTES, TLS_PREFIX, accepted, control, read_control, signed
from audiohangup.cluster.remoteleg import RemoteLeg
from audiohangup.listeners import Listener, SourceGate
from audiohangup.logs import LogLimit, describe_address
from audiohangup.metrics import series
from audiohangup.reasons import CloseReason, HangupCause, Role
from audiohangup.registry import Registry
from audiohangup.relay import Relay
from audiohangup.wire import FrameDecoder, whole_frames

if TYPE_CHECKING:
    from audiohangup.cluster.directory import CallDirectory
    from audiohangup.pacer import Pacer

#: Seconds a link has, from its connection, to be accepted.
HANDSHAKE_TIMEOUT = 3.0


def link_address(port: IListeningPort, advertised_host: str | None, *, tls: bool = False) -> str:
    """
    C{host:port} other instances reach a link listener at: its own address,
    or, when it listens on every address, the host of C{--advertise-url};
    after C{tls:} when it speaks TLS, so they connect with it.
    """
    address = port.getHost()
    host, number = str(getattr(address, "host", "")), int(getattr(address, "port", 0))
    if host in ("", "0.0.0.0", "::") and advertised_host:
        host = advertised_host
    where = f"[{host}]:{number}" if ":" in host else f"{host}:{number}"
    return TLS_PREFIX + where if tls else where


class LinkListener(Listener):
    """The link's listener: once it listens, the directory's presence says where (C{link})."""

    def __init__(
        self,
        factory: LinkServer,
        endpoint: IStreamServerEndpoint,
        directory: CallDirectory,
        advertised_host: str | None,
        gate: SourceGate | None = None,
        *,
        tls: bool = False,
    ) -> None:
        super().__init__("link", endpoint, factory, gate)
        self.directory = directory
        self.advertised_host = advertised_host
        self.tls = tls

    def _listening(self, port: IListeningPort) -> IListeningPort:
        self.directory.link = link_address(port, self.advertised_host, tls=self.tls)
        return super()._listening(port)


class LinkServer(Factory):
    """The home's side: every accepted link is one remote leg in this instance's registry."""

    noisy = False
    log = Logger()
    #: A refused client is logged once a minute per source host (each is counted).
    logNow = LogLimit(60.0)

    def __init__(
        self,
        registry: Registry,
        instance_id: str,
        token: str,
        formats: Mapping[Role, AudioFormat],
        reactor: IReactorTime,
        pacer: Pacer,
        *,
        settings: LegSettings | None = None,
        metrics: CollectorRegistry | None = None,
        relay: Relay | None = None,
    ) -> None:
        self.registry = registry
        #: Plays the remote legs' queues and feeds here, as it does the legs' of this instance.
        self.pacer = pacer
        #: Reads the links' sockets, as it does the legs' (see L{audiohangup.cluster.linkio}).
        self.relay = relay
        self.instance_id = instance_id
        self.token = token
        self.formats = formats
        self.reactor = reactor
        #: The remote legs' queue bound, playout and close timeouts (their formats are C{formats}').
        self.settings = settings or LegSettings()
        self.refused: Counter | None = None
        if metrics is not None:
            self.refused = series(
                metrics, Counter, "audiohangup_connections_refused",
                "Connections closed as they were accepted, by listener and reason (not_allowed: outside --allow).",
                ["listener", "reason"],
            )

    def buildProtocol(self, addr: IAddress | None) -> HomeSide:
        side = HomeSide(self)
        side.factory = self
        return side

    def logPrefix(self) -> str:
        return "link"


@implementer(IPushProducer, IHandshakeListener)
class HomeSide(Protocol):
    """One link, on the home's side: a challenge, a hello checked, then a remote leg's frames."""

    log = Logger()

    def __init__(self, server: LinkServer) -> None:
        self.server = server
        self.nonce = os.urandom(NONCE_BYTES).hex()
        self.decoder = FrameDecoder()
        self.leg: RemoteLeg | None = None
        self.peer = "-"
        self.closed = False
        self._timer: IDelayedCall | None = None
        self.socket: LinkSocket | None = None

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.peer = describe_address(self.transport.getPeer())
        # Bounded: past the transport's buffer (64 KiB, seconds of audio) the link is cut (pauseProducing).
        set_up(self.transport, self)
        self.socket = LinkSocket(self.transport, self, self.server.relay)
        self.socket.write(control({"type": "challenge", "instance_id": self.server.instance_id, "nonce": self.nonce}))
        self._timer = self.server.reactor.callLater(HANDSHAKE_TIMEOUT, self._refuse, "no hello in time", "timeout")

    def write(self, data: bytes) -> None:
        if not self.closed and self.socket is not None:
            self.socket.write(data)

    def close(self) -> None:
        """Close once what is written is out."""
        if not self.closed and self.transport is not None:
            self.closed = True
            self._leaveRelay()
            self.transport.loseConnection()

    def abort(self) -> None:
        if self.transport is not None:
            self.closed = True
            self._leaveRelay()
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def _leaveRelay(self) -> None:
        if self.socket is not None:
            self.socket.leave()

    def dataReceived(self, data: bytes) -> None:
        leg = self.leg
        if leg is not None and leg.route is not None and not self.decoder.pending and not self.closed:
            # The common case: whole frames of the leg's own audio, which
            # the bridge sends on as they came (the leg's own fast path,
            # in L{audiohangup.protocol}, does the same).
            frames = whole_frames(data, leg.audio_header, leg.audio_frame_size)
            if frames is not None:
                leg.receivedWhole(frames)
                return
        for frame in self.decoder.feed(data):
            leg = self.leg
            if leg is not None:
                if frame.kind == CONTROL:
                    self._controlReceived(leg, read_control(frame))
                else:
                    leg.received(frame)
            elif not self.closed:
                self._helloReceived(read_control(frame))
            if self.closed:
                return

    def _helloReceived(self, message: dict[str, Any] | None) -> None:
        server = self.server
        if message is None or message.get("type") != "hello":
            self._refuse("its first message is not a hello", "not_an_instance")
            return
        fields = [message.get(name) for name in ("instance_id", "call_id", "role", "format", "nonce")]
        if not all(isinstance(value, str) for value in fields):
            self._refuse("its hello lacks a field", "not_an_instance")
            return
        instance_id, call_id, role, audio, nonce = (str(value) for value in fields)
        if not signed(server.token, message.get("mac"), "hello", self.nonce, nonce, instance_id, call_id, role, audio):
            self._refuse(f"its hello, as instance {instance_id!r}, is not signed by the control token", "not_an_instance")
            return
        if role not in Role._value2member_map_:
            self._refuse(f"role {role!r}", "bad_hello", tell=True)
            return
        wanted = server.formats[Role(role)]
        if audio != wanted.name:
            self._refuse(f"its leg carries {audio}, this instance's {role} legs {wanted.name}", "bad_hello", tell=True)
            return
        self._cancelTimer()
        leg = RemoteLeg(
            self, call_id, Role(role), wanted, server.registry, server.reactor, server.pacer,
            instance_id=instance_id, peer=f"{instance_id}@{self.peer}", settings=server.settings,
        )
        holder = server.registry.holder(call_id, leg.role)
        if holder is not None:
            self.write(control({"type": "refused", "why": f"a live {role} leg holds call {call_id} here"}))
            self.close()
            return
        self.leg = leg
        self.write(accepted(server.token, nonce, server.instance_id, call_id, role))
        leg.start()

    def _controlReceived(self, leg: RemoteLeg, message: dict[str, Any] | None) -> None:
        if message is None or message.get("type") != "ended":
            return  # nothing else is sent this way; a newer peer's message is skipped
        reason = CloseReason._value2member_map_.get(str(message.get("reason")), CloseReason.LINK_LOST)
        cause = HangupCause._value2member_map_.get(str(message.get("cause")))
        assert isinstance(reason, CloseReason) and (cause is None or isinstance(cause, HangupCause))
        leg.end(reason, "as its instance says", cause)
        self.close()

    def _refuse(self, why: str, reason: str, *, tell: bool = False) -> None:
        """Close the link, counted; C{tell}: an instance (its hello is signed) hears why, a stranger nothing."""
        self._cancelTimer()
        if tell:
            self.write(control({"type": "refused", "why": why}))
        counter = self.server.refused
        if counter is not None:
            counter.labels("link", reason).inc()
        if tell:
            self.log.warn("link from {peer} refused: {why}", peer=self.peer, why=why)
            self.close()
            return
        if self.server.logNow(self.peer.rsplit(":", 1)[0], self.server.reactor.seconds()):
            self.log.warn(
                "link from {peer} refused: {why} (counted in audiohangup_connections_refused_total; "
                "logged once a minute per source)",
                peer=self.peer, why=why,
            )
        self.abort()

    def _cancelTimer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def handshakeCompleted(self) -> None:
        """Over TLS: bounded from now (see L{audiohangup.cluster.linkio.set_up})."""
        assert self.transport is not None
        bound(self.transport, self)

    def pauseProducing(self) -> None:
        """The other instance stopped reading: what this side sends it must not grow without bound."""
        if self.closed:
            return
        self.log.warn(
            "{call_id} link from {peer} cut: the other instance stopped reading what this one sends",
            call_id="-" if self.leg is None else self.leg.call_id, peer=self.peer,
        )
        self.abort()

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.closed = True
        self._leaveRelay()
        self._cancelTimer()
        if self.leg is not None:
            self.leg.end(CloseReason.LINK_LOST, f"the link from {self.peer} closed")

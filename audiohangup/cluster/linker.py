# -*- test-case-name: tests.test_link -*-
"""
The newcomer's side of the media link (L{audiohangup.cluster.link}): when a
leg starts here and the directory says its call's first leg is on another
live instance, the leg joins the session there through one link of its own.

The leg stays this instance's connection (its admission, its pacing, its
teardown, its close reason), but its session's flow is handed over to the
link (L{Session.handOver}): every frame and digit it receives crosses to the
session's home, and what the home sends (its audio, bridged or played and
paced there, and a hangup with its cause) comes to the leg. When the leg
ends, the home hears how.

Failure is explicit: a link that cannot be made, is refused or breaks hangs
the leg up with cause C{link}, logged once with both instance ids. A leg
whose call's first leg is on no live instance (its presence expired), or
whose first leg is this one, stays at home here.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, cast

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import (
    IDelayedCall,
    IHandshakeListener,
    IPushProducer,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.ssl import optionsForClientTLS
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from audiohangup.cluster.directory import DirectoryUnavailable
from audiohangup.cluster.linkio import LinkSocket, bound, set_up
from audiohangup.cluster.linkmessages import (
    CONTROL,
    NONCE_BYTES,
    control,
    hello,
    read_control,
    signed,
    split_address,
)
from audiohangup.events import LegObserver
from audiohangup.interfaces import IFlow, ILeg, ILegObserver, IRemoteLeg, ISession
from audiohangup.logs import iso_time
from audiohangup.reasons import CloseReason, HangupCause
from audiohangup.wire import HEADER, HEADER_SIZE, SAMPLE_RATES, Frame, FrameDecoder, Kind, encode_frame, whole_frames

if TYPE_CHECKING:
    from twisted.internet._sslverify import IOpenSSLTrustRoot  # Twisted exports no name for it

    from audiohangup.cluster.directory import CallDirectory
    from audiohangup.interfaces import IReactor, IServerLeg
    from audiohangup.registry import Registry
    from audiohangup.relay import Relay

#: Seconds from the connect to the home's acceptance.
LINK_TIMEOUT = 3.0


@implementer(ILegObserver)
class Linker(LegObserver):
    """Links each leg that starts here to its session's home, when that is another instance."""

    log = Logger()
    #: Reads the links' sockets, as it does the legs' (see L{audiohangup.cluster.linkio}); None: Twisted does.
    relay: Relay | None = None

    def __init__(
        self, directory: CallDirectory, registry: Registry, reactor: IReactor, token: str, relay: Relay | None = None,
        *, tls_only: bool = False, trust: IOpenSSLTrustRoot | None = None,
    ) -> None:
        self.directory = directory
        self.relay = relay
        #: This instance's own link speaks TLS: its legs' audio crosses to another instance over TLS only.
        self.tls_only = tls_only
        #: What a home's TLS certificate is verified against (--link-ca); None: the system's trust store.
        self.trust = trust
        self.registry = registry
        self.reactor = reactor
        self.token = token
        self.links: dict[IServerLeg, NewcomerSide] = {}
        #: The second look of a leg still alone (see L{_lookAgain}).
        self._again: dict[IServerLeg, IDelayedCall] = {}
        # Until this linker has decided where a leg's session lives, the observers that count legs wait.
        registry.events.mayLeave = self.mayLeave

    @property
    def instance_id(self) -> str:
        return self.directory.instance_id

    def mayLeave(self, leg: IServerLeg) -> bool:
        """Whether C{leg} may yet be handed over to its session's home: what the observers that count wait for."""
        return not IRemoteLeg.providedBy(leg) and leg.call_id is not None

    def legStarted(self, leg: IServerLeg) -> None:
        if self.mayLeave(leg):
            self._look(leg, again=True)

    def _look(self, leg: IServerLeg, *, again: bool) -> None:
        Deferred.fromCoroutine(self._consider(leg, again)).addErrback(
            lambda failure: self.log.failure("{call_id} linking failed", failure, call_id=leg.call_id)
        ).addCallback(lambda _: self._stays(leg))

    def _stays(self, leg: IServerLeg) -> None:
        """
        Unless a link is under way, the leg is this instance's to count. A
        leg alone at its first look is, even if its second look links it
        (two first legs that started at once on two instances): its start
        was told here already, so both instances count it.
        """
        if leg not in self.links:
            self.registry.events.release(leg)

    def _lookAgain(self, leg: IServerLeg) -> None:
        """
        Still alone a heartbeat later: look once more. Two legs that start
        on two instances at once may each miss the other's entry (each
        write races the other's look-up); looking again, the later of the
        two finds the earlier and links to it.
        """
        self._again.pop(leg, None)
        session = self.registry.session(leg.call_id or "")
        if leg.live and leg not in self.links and session is not None and list(session.legs.values()) == [leg]:
            self._look(leg, again=False)

    async def _consider(self, leg: IServerLeg, again: bool = False) -> None:
        call_id = leg.call_id
        assert call_id is not None
        try:
            owners = await self.directory.owners(call_id)
        except DirectoryUnavailable as error:
            self.log.warn("{call_id} {role} cannot tell where its session lives ({error}): it stays here",
                          call_id=call_id, role=leg.role, error=str(error))
            return
        mine = (iso_time(leg.connected_at), self.instance_id)
        first = sorted(
            (entry.started_at, entry.instance_id)
            for role, entry in owners.items()
            if role != leg.role.value and entry.instance_id != self.instance_id
        )
        if not first and again and leg.live:
            self._again[leg] = self.reactor.callLater(self.directory.heartbeat, self._lookAgain, leg)
        if not first or first[0] > mine or not leg.live:
            return  # alone, or the first leg: the session's home is here
        owner = first[0][1]
        try:
            address = await self.directory.link_of(owner)
        except DirectoryUnavailable as error:
            self.log.warn(
                "{call_id} {role}: the call's first leg is on instance {owner}, whose link cannot be looked up "
                "({error}); the leg is hung up (cause link)",
                call_id=call_id, role=leg.role, owner=owner, error=str(error),
            )
            leg.hangup(HangupCause.LINK)
            return
        if address is None:
            self.log.info(
                "{call_id} {role}: the call's first leg was on instance {owner}, which is gone (its presence "
                "expired); this instance {instance_id} is the session's home",
                call_id=call_id, role=leg.role, owner=owner, instance_id=self.instance_id,
            )
            return
        if not address:
            self.log.warn(
                "{call_id} {role}: the call's first leg is on instance {owner}, which has no link (--link none); "
                "the leg is hung up (cause link) rather than left unbridged",
                call_id=call_id, role=leg.role, owner=owner,
            )
            leg.hangup(HangupCause.LINK)
            return
        if not leg.live:
            return
        side = NewcomerSide(self, leg, owner, address)
        self.links[leg] = side
        side.connect()

    def legEnded(self, leg: IServerLeg) -> None:
        timer = self._again.pop(leg, None)
        if timer is not None and timer.active():
            timer.cancel()
        side = self.links.pop(leg, None)
        if side is not None:
            side.legGone()


@implementer(IFlow)
class LinkFlow:
    """A session whose home is elsewhere: its leg's frames and digits cross the link; its end is told."""

    def __init__(self, side: NewcomerSide) -> None:
        self.side = side

    def legJoined(self, session: ISession, leg: ILeg) -> None:
        pass

    def audioReceived(self, session: ISession, leg: ILeg, frame: Frame) -> None:
        if leg is self.side.leg:  # not a leg that joined here since
            self.side.write(frame.encode())

    def dtmfReceived(self, session: ISession, leg: ILeg, digit: str) -> None:
        if leg is self.side.leg:
            self.side.write(encode_frame(Kind.DTMF, digit.encode("latin-1")))

    def legEnded(self, session: ISession, leg: ILeg, reason: CloseReason) -> None:
        pass  # the Linker, an observer, tells the home (with the hangup cause, which a flow does not see)


class _Route:
    """
    Where a linked leg's fast path sends its whole frames: the link. The
    leg calls only C{forwardBytes} on its route (see
    L{audiohangup.protocol.AudioSocketProtocol.dataReceived}).
    """

    __slots__ = ("forwardBytes",)

    def __init__(self, side: NewcomerSide) -> None:
        self.forwardBytes = side.write


class _OneLink(Factory):
    """Connects one link, quietly (C{connectProtocol}'s factory logs every stop)."""

    noisy = False

    def __init__(self, side: NewcomerSide) -> None:
        self.side = side

    def buildProtocol(self, addr: object) -> NewcomerSide:
        return self.side


@implementer(IPushProducer, IHandshakeListener)
class NewcomerSide(Protocol):
    """One link, on the side of the instance that holds the leg's connection."""

    log = Logger()

    def __init__(self, linker: Linker, leg: IServerLeg, owner: str, address: str) -> None:
        self.linker = linker
        self.leg = leg
        self.owner = owner
        self.address = address
        self.decoder = FrameDecoder()
        #: A whole frame of the leg's own audio: its header and length (see L{dataReceived}).
        self.audio_header = HEADER.pack(leg.format.kind, leg.format.frame_bytes)
        self.audio_frame_size = HEADER_SIZE + leg.format.frame_bytes
        self.nonce = os.urandom(NONCE_BYTES).hex()
        self.accepted = False
        self.done = False  # the leg or the link ended: nothing more to say or do
        self._timer: IDelayedCall | None = None
        self.socket: LinkSocket | None = None

    def _fields(self) -> dict[str, Any]:
        return {
            "call_id": self.leg.call_id, "role": self.leg.role, "owner": self.owner,
            "address": self.address, "instance_id": self.linker.instance_id,
        }

    def connect(self) -> None:
        reactor = self.linker.reactor
        self._timer = reactor.callLater(LINK_TIMEOUT, self.fail, f"not accepted within {LINK_TIMEOUT:g} s")
        host, port, tls = split_address(self.address)
        endpoint: IStreamClientEndpoint = HostnameEndpoint(reactor, host, port, timeout=LINK_TIMEOUT)
        if tls:
            # The home proves its name (or address) with a certificate under --link-ca; the hello still proves both.
            endpoint = wrapClientTLS(optionsForClientTLS(host, trustRoot=self.linker.trust), endpoint)
        elif self.linker.tls_only:
            self.fail("its link is plain TCP, and this instance's legs cross to another instance over TLS only")
            return
        connecting = endpoint.connect(_OneLink(self))
        connecting.addErrback(lambda failure: self.fail(f"cannot connect: {failure.getErrorMessage()}"))

    def write(self, data: bytes) -> None:
        if self.accepted and not self.done and self.socket is not None:
            self.socket.write(data)

    def connectionMade(self) -> None:
        if self.done:
            self.transport.abortConnection()  # type: ignore[union-attr]
            return
        assert self.transport is not None
        set_up(self.transport, self)  # bounded: see pauseProducing
        self.socket = LinkSocket(self.transport, self, self.linker.relay)

    def dataReceived(self, data: bytes) -> None:
        leg = self.leg
        if self.accepted and not self.done and not self.decoder.pending:
            # The common case: whole frames of the leg's own audio, bridged
            # on as they came, with no parse and no frame object.
            whole = whole_frames(data, self.audio_header, self.audio_frame_size)
            if whole is not None:
                for encoded in whole:
                    if self.done:
                        return
                    leg.forwardBytes(encoded)
                return
        for frame in self.decoder.feed(data):
            if self.done:
                return
            kind = frame.kind
            if kind in SAMPLE_RATES and self.accepted:
                leg.forwardBytes(frame.encode())
            elif kind == CONTROL:
                self._controlReceived(read_control(frame) or {})

    def _controlReceived(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "challenge" and not self.accepted:
            leg = self.leg
            assert leg.call_id is not None
            nonce = message.get("nonce")
            if message.get("instance_id") != self.owner or not isinstance(nonce, str):
                self.fail(f"the link answers as instance {message.get('instance_id')!r}")
                return
            assert self.socket is not None
            self.socket.write(hello(
                self.linker.token, nonce, self.nonce, self.linker.instance_id, leg.call_id, leg.role.value,
                leg.format.name,
            ))
        elif kind == "accepted" and not self.accepted:
            leg = self.leg
            if not signed(self.linker.token, message.get("mac"), "accepted", self.nonce, self.owner,
                          leg.call_id or "", leg.role.value):
                self.fail("its acceptance is not signed by the control token: not an instance of this cluster")
                return
            self._cancelTimer()
            self.accepted = True
            events = self.linker.registry.events
            session = self.linker.registry.session(self.leg.call_id or "")
            if session is None or not self.leg.live:
                events.release(self.leg)
                self.legGone()
                return
            # The home counts the leg (metrics, records, webhooks) with its real end: this instance does not.
            events.handOver(self.leg)
            session.handOver(LinkFlow(self), self.owner)
            # The leg's fast path: its whole frames of its own audio go on as they came, unparsed.
            self.leg.bridgeTo(cast(ILeg, _Route(self)))
            self.log.info(
                "{call_id} {role} linked from instance {instance_id} to instance {owner} at {address}: "
                "its session lives there",
                **self._fields(),
            )
        elif kind == "refused":
            self.fail(f"refused: {message.get('why')}")
        elif kind == "hangup" and self.accepted:
            cause = message.get("cause")
            chosen = HangupCause(cause) if cause in HangupCause._value2member_map_ else HangupCause.SESSION
            if message.get("after_playout"):
                self.leg.hangupAfterPlayout(chosen)
            else:
                self.leg.hangup(chosen)

    def fail(self, why: str) -> None:
        """The link could not be made, or broke: the leg is hung up (cause link), logged once."""
        if self.done:
            return
        self.done = True
        self._cancelTimer()
        self.log.warn(
            "{call_id} {role} link from instance {instance_id} to instance {owner} at {address} failed: {why}; "
            "the leg is hung up (cause link)",
            why=why, **self._fields(),
        )
        if self.transport is not None:
            self._leaveRelay()
            self.transport.abortConnection()  # type: ignore[attr-defined]
        self.linker.registry.events.release(self.leg)  # not linked: counted here; linked: the home counts it
        self.leg.hangup(HangupCause.LINK)

    def legGone(self) -> None:
        """The leg ended (or will never be linked): tell the home how, and close."""
        if self.done:
            return
        self.done = True
        self._cancelTimer()
        leg = self.leg
        if self.transport is None or self.socket is None:
            return  # still connecting: connectionMade aborts it
        if self.accepted and leg.close_reason is not None:
            cause = leg.hangup_cause
            self.socket.write(control({
                "type": "ended", "reason": leg.close_reason.value, "cause": None if cause is None else cause.value,
            }))
        self._leaveRelay()
        self.transport.loseConnection()

    def handshakeCompleted(self) -> None:
        """Over TLS: bounded from now (see L{audiohangup.cluster.linkio.set_up})."""
        assert self.transport is not None
        bound(self.transport, self)

    def pauseProducing(self) -> None:
        """The home stopped reading: past the transport's buffer (64 KiB) the link is given up."""
        self.fail("the other instance stopped reading what this one sends")

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._leaveRelay()
        self.fail(f"the link closed ({reason.getErrorMessage()})")

    def _leaveRelay(self) -> None:
        if self.socket is not None:
            self.socket.leave()

    def _cancelTimer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

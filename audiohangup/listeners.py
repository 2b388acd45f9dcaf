# -*- test-case-name: tests.test_access -*-
"""
Listening endpoints: where each listens, and whom it lets in.

A connection from a source outside a listener's C{--allow} list (or
C{--http-allow}) is closed as soon as it is accepted, before a byte is read
or written; it is counted, and logged at most once a minute per source, so a
flood cannot flood the log.
"""

from __future__ import annotations

from twisted.application.internet import StreamServerEndpointService
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import UNIXServerEndpoint, _parse, serverFromString
from twisted.internet.interfaces import (
    IAddress,
    IListeningPort,
    IProtocol,
    IProtocolFactory,
    IReactorTime,
    IStreamServerEndpoint,
    ITCPTransport,
)
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from zope.interface import implementer

from audiohangup.access import LogOncePer, SourceACL, is_loopback
from audiohangup.metrics import Metrics
from audiohangup.protocol import describe_address

#: The mode of a UNIX socket whose endpoint string gives no C{mode=}: owner and group.
UNIX_SOCKET_MODE = 0o660


class Listener(StreamServerEndpointService):
    """
    A listening endpoint that logs where it listens and keeps its port, so
    C{tcp:0} works in tests and the log says which port to point Asterisk at.
    """

    log = Logger()
    #: A port that cannot be bound must stop start-up, not leave a deaf server.
    _raiseSynchronously = True
    port: IListeningPort | None = None

    def __init__(
        self, name: str, endpoint: IStreamServerEndpoint, factory: IProtocolFactory, gate: SourceGate | None = None
    ) -> None:
        super().__init__(endpoint, factory if gate is None else GatedFactory(factory, gate))
        self.setName(name)

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        assert self._waitingForPort is not None, "set by privilegedStartService"
        self._waitingForPort.addCallback(self._listening)

    def _listening(self, port: IListeningPort) -> IListeningPort:
        self.port = port
        self.log.info(
            "{name} listening on {address}", name=self.name, address=describe_address(port.getHost())
        )
        return port

    def stopService(self) -> Deferred[None]:
        self.port = None
        stopped: Deferred[None] = super().stopService()
        return stopped


class _Refused(Protocol):
    """
    Stands in for the protocol of a refused connection: aborted as it is
    made. (Returning None from C{buildProtocol} would do for plain TCP, but
    not under TLS, whose wrapper needs a protocol to wrap.)
    """

    def connectionMade(self) -> None:
        transport = self.transport
        if ITCPTransport.providedBy(transport):
            transport.abortConnection()
        elif transport is not None:
            transport.loseConnection()


class SourceGate:
    """One listener's source ACL, with its counting and its bounded log."""

    log = Logger()

    def __init__(
        self, listener: str, acl: SourceACL, clock: IReactorTime, metrics: Metrics | None = None, option: str = "--allow"
    ) -> None:
        self.listener = listener
        self.acl = acl
        self.clock = clock
        self.metrics = metrics
        self.option = option
        self._logNow = LogOncePer(60.0)

    def admits(self, address: IAddress | None) -> bool:
        host = getattr(address, "host", None)  # IPv4Address, IPv6Address; a UNIX address has none
        if self.acl.allows(host):
            return True
        if self.metrics is not None:
            self.metrics.connection_refused(self.listener, "not_allowed")
        if self._logNow(str(host), self.clock.seconds()):
            self.log.warn(
                "{listener}: connections from {source} refused: not in {option} "
                "(logged once a minute per source)",
                listener=self.listener, source=host, option=self.option,
            )
        return False



@implementer(IProtocolFactory)
class GatedFactory:
    """A factory that asks its gate first: a refused source gets nothing of the wrapped factory."""

    def __init__(self, factory: IProtocolFactory, gate: SourceGate) -> None:
        self.factory = factory
        self.gate = gate

    def buildProtocol(self, addr: IAddress) -> IProtocol | None:
        if self.gate.admits(addr):
            return self.factory.buildProtocol(addr)
        return _Refused()

    def doStart(self) -> None:
        self.factory.doStart()

    def doStop(self) -> None:
        self.factory.doStop()

    def logPrefix(self) -> str:
        prefix = getattr(self.factory, "logPrefix", None)
        return str(prefix()) if callable(prefix) else type(self.factory).__name__


def listens_beyond_loopback(reactor: object, description: str) -> bool:
    """
    Whether an endpoint description listens on more than loopback. Unknown
    kinds count as beyond loopback (the safe answer); UNIX sockets do not
    (their file's permissions say who may connect).
    """
    endpoint = serverFromString(reactor, description)
    if type(endpoint).__name__.startswith("UNIX"):
        return False
    # TCP4ServerEndpoint, TCP6ServerEndpoint and SSL4ServerEndpoint keep it here.
    interface = getattr(endpoint, "_interface", None)
    if not isinstance(interface, str):
        return True
    return not is_loopback(interface)


def server_endpoint(reactor: object, description: str) -> IStreamServerEndpoint:
    """
    C{serverFromString}, except that a C{unix:} endpoint without C{mode=} is
    made L{UNIX_SOCKET_MODE}, not Twisted's 0666: a client of a UNIX socket
    counts as loopback (the API asks it no token), so the socket file's mode
    is all that keeps other local users out.
    """
    endpoint: IStreamServerEndpoint = serverFromString(reactor, description)
    if isinstance(endpoint, UNIXServerEndpoint) and "mode" not in _parse(description)[1]:
        endpoint = serverFromString(reactor, f"{description}:mode={UNIX_SOCKET_MODE:o}")
    return endpoint

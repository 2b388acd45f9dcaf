# -*- test-case-name: tests.test_listeners -*-
"""
Listening endpoints: where each listens, and whom it lets in.

A connection from a source outside a listener's C{--allow} list (or
C{--http-allow}) is closed as soon as it is accepted, before a byte is read
or written; it is counted, and logged at most once a minute per source, so a
flood cannot flood the log.
"""

from __future__ import annotations

import socket
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, cast

from prometheus_client import CollectorRegistry, Counter
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import Service
from twisted.internet import tcp
from twisted.internet.defer import Deferred, execute, maybeDeferred, succeed
from twisted.internet.endpoints import (
    AdoptedStreamServerEndpoint,
    TCP4ServerEndpoint,
    TCP6ServerEndpoint,
    UNIXServerEndpoint,
    _parse,
    serverFromString,
)
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import (
    IAddress,
    IListeningPort,
    IProtocol,
    IProtocolFactory,
    IReactorSocket,
    IReactorTime,
    IStreamServerEndpoint,
    ITCPTransport,
)
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from zope.interface import implementer

from audiohangup.lifecycle import Once
from audiohangup.logs import LogLimit, describe_address
from audiohangup.metrics import series
from audiohangup.sources import IPNetwork, SourceACL, is_loopback, source_of

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
    _closing: Once | None = None

    def __init__(
        self, name: str, endpoint: IStreamServerEndpoint, factory: IProtocolFactory, gate: SourceGate | None = None
    ) -> None:
        super().__init__(endpoint, factory if gate is None else GatedFactory(factory, gate))
        self.setName(name)
        self._listeningWaiters: list[Deferred[None]] = []

    def listening(self) -> Deferred[None]:
        """Fires once the port listens (at once if it does): systemd's READY=1 waits for every listener."""
        if self.port is not None:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._listeningWaiters.append(waiter)
        return waiter

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        assert self._waitingForPort is not None, "set by privilegedStartService"
        self._waitingForPort.addCallback(self._listening)

    def _listening(self, port: IListeningPort) -> IListeningPort:
        self.port = port
        self.log.info(
            "{name} listening on {address}", name=self.name, address=describe_address(port.getHost())
        )
        waiters, self._listeningWaiters = self._listeningWaiters, []
        for waiter in waiters:
            waiter.callback(None)
        return port

    def stopListening(self) -> Deferred[None]:
        """
        Stop taking connections now, the service still running: a drain's
        first step. The connections made go on; L{stopService} later only
        marks the service stopped. Once: a second call waits for the first.
        """
        if self._closing is None:
            self._closing = Once()
            Deferred.fromCoroutine(self._stopListening(self._closing))
        return self._closing.wait()

    async def _stopListening(self, closing: Once) -> None:
        try:
            if self.port is not None:
                address = describe_address(self.port.getHost())
                # A socket others hold too (systemd's) keeps listening for them: only this copy closes.
                shared = isinstance(self.endpoint, AdoptedStreamServerEndpoint)
                accepted = 0 if shared else take_the_backlog(self.port)
                await maybeDeferred(self.port.stopListening)
                if accepted:
                    self.log.info(
                        "{name}: {count} connection(s) waiting to be accepted taken before closing",
                        name=self.name, count=accepted,
                    )
                self.log.info("{name} stopped listening on {address}", name=self.name, address=address)
        except Exception:
            self.log.failure("{name} could not stop listening", name=self.name)
        finally:
            closing.fire()

    def stopService(self) -> Deferred[None]:
        if self._closing is not None:  # a drain closed the port already
            Service.stopService(self)
            self.port = None
            return self._closing.wait()
        self.port = None
        stopped: Deferred[None] = super().stopService()
        return stopped


def take_the_backlog(port: IListeningPort) -> int:
    """
    Accept every connection the kernel holds for a listening TCP port, then
    stop it listening at once (C{shutdown}; never on a socket another
    process holds too, as systemd's: it would stop listening for all): a socket closed with
    connections in its backlog resets them, and Twisted closes its socket
    only a reactor turn after C{stopListening}, during which the kernel
    would still queue new ones to it (with C{SO_REUSEPORT}, ones it could
    have given the other process). The connections taken are served like
    any other. How many were taken; 0 for other kinds of port.
    """
    handle = getattr(port, "socket", None)
    if not isinstance(port, tcp.Port) or not isinstance(handle, socket.socket):
        return 0
    before = port.sessionno
    port.numberAccepts = max(port.numberAccepts, BACKLOG_SWEEP)
    port.doRead()
    try:
        handle.shutdown(socket.SHUT_RD)  # Linux: it leaves the listening state (and its SO_REUSEPORT group) now
    except OSError:
        pass  # not every system stops listening so: then the close does
    return int(port.sessionno - before)


#: Connections accepted at most by one sweep of a closing port's backlog (the kernel caps a backlog at somaxconn).
BACKLOG_SWEEP = 65536


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


def _refused(metrics: CollectorRegistry | None) -> Counter | None:
    """Connections closed as they were accepted, in C{metrics}: every gate and cap counts in the one series."""
    if metrics is None:
        return None
    return series(
        metrics, Counter, "audiohangup_connections_refused",
        "Connections closed as they were accepted, by listener and reason (not_allowed: outside --allow).",
        ["listener", "reason"],
    )


class SourceGate:
    """One listener's source ACL, with its counting and its bounded log."""

    log = Logger()

    def __init__(
        self, listener: str, acl: SourceACL, clock: IReactorTime, metrics: CollectorRegistry | None = None, option: str = "--allow"
    ) -> None:
        self.listener = listener
        self.acl = acl
        self.clock = clock
        self.refused = _refused(metrics)
        self.option = option
        self._logNow = LogLimit(60.0)

    def admits(self, address: IAddress | None) -> bool:
        host = getattr(address, "host", None)  # IPv4Address, IPv6Address; a UNIX address has none
        if self.acl.allows(host):
            return True
        if self.refused is not None:
            self.refused.labels(listener=self.listener, reason="not_allowed").inc()
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


class Slot:
    """
    One admitted connection's place under a L{ConnectionCap}. It is
    I{waiting} (evictable) until its request has arrived whole, busy while
    the server works for it, waiting again between keep-alive requests.
    """

    __slots__ = ("cap", "evict", "held", "source")

    def __init__(self, cap: ConnectionCap, source: str | None, evict: Callable[[], None]) -> None:
        self.cap = cap
        self.source = source
        self.evict = evict
        self.held = True

    def busy(self) -> None:
        self.cap._unqueue(self)

    def waiting(self) -> None:
        if self.held:
            self.cap._queue(self)

    def release(self) -> None:
        """The connection is gone (or going): its place is free. Idempotent."""
        if self.held:
            self.held = False
            self.cap._release(self)


class ConnectionCap:
    """
    At most C{total} connections on one listener and C{per_source} from one
    source (L{source_of}). A newcomer over either cap takes the place of the
    connection of that source (or, over the total, of any source) that has
    waited longest without sending a whole request, which is closed; a
    slow client therefore cannot starve a newcomer, even one from its own
    address. Only when every place is busy with a request is it refused.
    The C{uncapped} networks (C{--trusted-proxies}) speak for many clients
    each: only the total caps them.
    """

    log = Logger()

    def __init__(
        self, listener: str, total: int, per_source: int, clock: IReactorTime, metrics: CollectorRegistry | None = None,
        uncapped: tuple[IPNetwork, ...] = (),
    ) -> None:
        self.listener = listener
        self.uncapped = SourceACL(uncapped) if uncapped else None
        self.total = total
        self.per_source = per_source
        self.clock = clock
        self.refused = _refused(metrics)
        self.held = 0
        self._perSource: dict[str | None, int] = {}
        #: Waiting slots, the one that has waited longest first, overall and per source.
        self._waiting: OrderedDict[Slot, None] = OrderedDict()
        self._waitingFrom: dict[str | None, OrderedDict[Slot, None]] = {}
        self._logNow = LogLimit(60.0)

    def admit(self, address: IAddress | None, evict: Callable[[], None]) -> Slot | None:
        """A slot for a new connection from C{address} (made room for if need be), or None: refuse it."""
        source = source_of(address)
        if self.uncapped is not None and self.uncapped.allows(getattr(address, "host", None)):
            source = None
        if source is not None and self._perSource.get(source, 0) >= self.per_source:
            if not self._evictOldest(self._waitingFrom.get(source), source, "per_source"):
                return None
        if self.held >= self.total and not self._evictOldest(self._waiting, source, "total"):
            return None
        slot = Slot(self, source, evict)
        self.held += 1
        self._perSource[source] = self._perSource.get(source, 0) + 1
        self._queue(slot)
        return slot

    def _evictOldest(self, waiting: OrderedDict[Slot, None] | None, source: str | None, cap: str) -> bool:
        if not waiting:
            self._count("over_capacity", source, cap)
            return False
        oldest = next(iter(waiting))
        oldest.release()
        oldest.evict()
        self._count("evicted", source, cap)
        return True

    def _count(self, reason: str, source: str | None, cap: str) -> None:
        if self.refused is not None:
            self.refused.labels(listener=self.listener, reason=reason).inc()
        if self._logNow(f"{source}-{reason}", self.clock.seconds()):
            limit = f"{self.per_source} from {source}" if cap == "per_source" else f"{self.total} in all"
            what = (
                "the oldest one still sending its request closed to make room"
                if reason == "evicted" else "a new one refused: every place is busy with a request"
            )
            self.log.warn(
                "{listener}: {limit} connections: {what} (logged once a minute per source)",
                listener=self.listener, limit=limit, what=what,
            )

    def _queue(self, slot: Slot) -> None:
        self._waiting[slot] = None
        self._waitingFrom.setdefault(slot.source, OrderedDict())[slot] = None

    def _unqueue(self, slot: Slot) -> None:
        self._waiting.pop(slot, None)
        mine = self._waitingFrom.get(slot.source)
        if mine is not None:
            mine.pop(slot, None)
            if not mine:
                del self._waitingFrom[slot.source]

    def _release(self, slot: Slot) -> None:
        self._unqueue(slot)
        self.held -= 1
        left = self._perSource[slot.source] - 1
        if left:
            self._perSource[slot.source] = left
        else:
            del self._perSource[slot.source]


def descriptor_limit(
    needed: int,
    getrlimit: Callable[[int], tuple[int, int]] | None = None,
    setrlimit: Callable[[int, tuple[int, int]], None] | None = None,
) -> tuple[int, int | None]:
    """
    Make sure the process may open C{needed} descriptors: raise the soft
    limit (up to the hard one) if it is lower. The limit then in force
    (C{needed} if it is at least that, or unlimited) and the hard limit
    (None: unlimited).
    """
    import resource

    getrlimit = getrlimit or resource.getrlimit
    setrlimit = setrlimit or resource.setrlimit
    soft, hard = getrlimit(resource.RLIMIT_NOFILE)
    infinite = resource.RLIM_INFINITY
    ceiling = None if hard == infinite else hard
    if soft == infinite or soft >= needed:
        return needed, ceiling
    target = needed if ceiling is None else min(needed, ceiling)
    if target > soft:
        try:
            setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            target = soft
    return target, ceiling


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


def server_endpoint(reactor: object, description: str, *, reuse_port: bool = False) -> IStreamServerEndpoint:
    """
    C{serverFromString}, except that a C{unix:} endpoint without C{mode=} is
    made L{UNIX_SOCKET_MODE}, not Twisted's 0666: a client of a UNIX socket
    counts as loopback (the API asks it no token), so the socket file's mode
    is all that keeps other local users out. With C{reuse_port}, a C{tcp:}
    endpoint listens with C{SO_REUSEPORT} (L{ReusePortEndpoint}); any other
    kind raises ValueError, as C{--reuse-port} cannot apply to it.
    """
    endpoint: IStreamServerEndpoint = serverFromString(reactor, description)
    if isinstance(endpoint, UNIXServerEndpoint) and "mode" not in _parse(description)[1]:
        endpoint = serverFromString(reactor, f"{description}:mode={UNIX_SOCKET_MODE:o}")
    if reuse_port:
        return ReusePortEndpoint.of(reactor, endpoint, description)
    return endpoint


@implementer(IStreamServerEndpoint)
class ReusePortEndpoint:
    """
    A TCP listener whose socket has C{SO_REUSEPORT}: several processes (an
    old version draining and the new one) listen on the same address and
    port at once, and the kernel spreads new connections among those that
    listen. The one that closes its socket gets none from then on, so a
    drain hands the port over without a refused connection. Only processes
    of the same user may share a port so (the kernel's rule).

    Twisted's C{listenTCP} has no such option: the socket is made, bound and
    listening here, then adopted by the reactor (C{adoptStreamPort}).
    """

    def __init__(self, reactor: IReactorSocket, port: int, interface: str = "", backlog: int = 50) -> None:
        self.reactor = reactor
        self.port = port
        self.interface = interface
        self.backlog = backlog

    @classmethod
    def of(cls, reactor: object, endpoint: IStreamServerEndpoint, description: str) -> ReusePortEndpoint:
        """The C{SO_REUSEPORT} twin of a C{tcp:} endpoint; ValueError for any other kind."""
        if not hasattr(socket, "SO_REUSEPORT"):
            raise ValueError("--reuse-port: this system has no SO_REUSEPORT")
        if not isinstance(endpoint, (TCP4ServerEndpoint, TCP6ServerEndpoint)):
            raise ValueError(
                f"--reuse-port applies to tcp: endpoints only, not {description!r} (a systemd: socket is shared "
                "by systemd itself)"
            )
        return cls(
            cast(IReactorSocket, reactor), endpoint._port, endpoint._interface, endpoint._backlog,
        )

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        return execute(self._listen, protocolFactory)

    def _listen(self, factory: IProtocolFactory) -> IListeningPort:
        family = socket.AF_INET6 if ":" in self.interface else socket.AF_INET
        handle = socket.socket(family, socket.SOCK_STREAM)
        try:
            handle.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as listenTCP: TIME_WAIT must not block
            handle.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            try:
                handle.bind((self.interface or ("::" if family == socket.AF_INET6 else ""), self.port))
            except OSError as error:
                raise CannotListenError(self.interface, self.port, error) from None
            handle.listen(self.backlog)
            handle.setblocking(False)
            # The reactor listens on its own duplicate of the descriptor: ours is closed below.
            return self.reactor.adoptStreamPort(handle.fileno(), family, cast(Any, factory))
        finally:
            handle.close()

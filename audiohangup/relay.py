# -*- test-case-name: tests.test_relay -*-
"""
One read pass for the legs' sockets, instead of one reactor dispatch per frame.

A bridged call is a frame every 20 ms on each leg, and Twisted's reactor
wraps every read in its own dispatch (a log context, the event's checks, the
transport's C{doRead}): at 400 legs that is 20,000 times a second, and it
costs more than the read itself. The relay keeps the legs' descriptors in an
epoll set of its own, whose descriptor is one reader of the reactor: one
wakeup reads every leg that has bytes waiting, one C{recv} each, and hands
them to the leg's C{dataReceived} as Twisted would.

It takes over nothing but plain reads. On an end of stream, a reset or an
error event the socket goes back to the transport, whose own read handles
the event in the same pass, and the reactor's rules end the connection
(C{readConnectionLost} for an end of stream, C{connectionLost} otherwise),
so the leg settles how it ended as ever (C{IHalfCloseableProtocol},
C{SO_ERROR}). Writes, timers and closing stay the transport's. A leg
leaves the relay before it closes or aborts, and a relay that stops gives
its legs back to Twisted.

Linux only (epoll); elsewhere, or for a transport that is not a plain socket
(TLS), Twisted reads as usual.

The relay and the direct sends of a leg (L{audiohangup.protocol}) and of a
stream (L{audiohangup.streams.client}) lean on Twisted's internals: a plain
C{tcp.Connection}, its C{_tempDataBuffer} and C{_tempDataLen}.
C{AUDIOHANGUP_FAST_PATHS=off} in the environment, read once at start-up,
turns them all off: every read and write takes Twisted's own path. CI runs
the tests that way too, so the plain paths stay a working fallback should a
Twisted release change those internals.
"""

from __future__ import annotations

import os
import select
import socket
from collections.abc import Mapping
from typing import TYPE_CHECKING, Final
from typing import Protocol as TypingProtocol

from twisted.application.service import Service
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableDescriptor, IReactorFDSet, IReadDescriptor
from twisted.internet.main import CONNECTION_DONE, CONNECTION_LOST
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

if TYPE_CHECKING:
    from twisted.internet import tcp

#: What one recv may take: several frames, when a peer got ahead.
READ_SIZE = 65536

_EPOLL = getattr(select, "epoll", None)
_PLAIN_READ = getattr(select, "EPOLLIN", 1)
_WATCH = _PLAIN_READ | getattr(select, "EPOLLRDHUP", 0)

#: The environment variable whose C{off} turns the relay and the direct sends off.
FAST_PATHS_VARIABLE: Final = "AUDIOHANGUP_FAST_PATHS"
_OFF: Final = frozenset({"off", "0", "no", "false"})


def fast_paths_in(environ: Mapping[str, str]) -> bool:
    """Whether C{environ} leaves the fast paths on: anything but C{off} (C{0}, C{no}, C{false}) does."""
    return environ.get(FAST_PATHS_VARIABLE, "").strip().lower() not in _OFF


#: Read once, at start-up: whether the relay reads, and legs and streams send directly.
FAST_PATHS: bool = fast_paths_in(os.environ)


class Readable(TypingProtocol):
    """What the relay calls on a leg: Twisted's C{IProtocol.dataReceived}."""

    def dataReceived(self, data: bytes) -> None: ...


class Reader(TypingProtocol):
    """
    What the relay asks of a leg's transport: the socket, reading paused and
    resumed (a TCP transport's C{IPushProducer}), and what the reactor calls
    on a descriptor it reads (its read, its ends).
    """

    def getHandle(self) -> socket.socket: ...

    def pauseProducing(self) -> None: ...

    def resumeProducing(self) -> None: ...

    def connectionLost(self, reason: Failure) -> None: ...

    def readConnectionLost(self, reason: Failure) -> None: ...

    def doRead(self) -> object: ...


def fast_paths() -> bool:
    """Whether the relay and the direct sends are on (L{FAST_PATHS})."""
    return FAST_PATHS


def send_unqueued(connection: tcp.Connection, sock: socket.socket, data: bytes) -> bytes:
    """
    Send C{data} on C{connection}'s socket now if Twisted queues nothing ahead
    of it (nor is closing it); what is left, for Twisted's own write, in order.
    """
    if connection.dataBuffer or connection._tempDataLen or connection.disconnecting:
        return data
    try:
        sent = sock.send(data)
    except OSError:
        sent = 0  # full (EAGAIN), or the peer is gone: Twisted's write finds out and ends the connection
    return data[sent:]


def available() -> bool:
    """Whether the relay reads the legs here: the platform has epoll, and the fast paths are on."""
    return _EPOLL is not None and FAST_PATHS


@implementer(IReadDescriptor)
class Relay(Service):
    """
    The legs' reads, as one reader of the reactor. A service of the server:
    started with it, stopped after its drain.
    """

    log = Logger()
    name = "relay"

    def __init__(self, reactor: IReactorFDSet) -> None:
        self.reactor = reactor
        self._poller: select.epoll | None = None
        self._legs: dict[int, tuple[socket.socket, Readable, Reader]] = {}
        self._fds: dict[Readable, int] = {}

    def __len__(self) -> int:
        return len(self._legs)

    def startService(self) -> None:
        super().startService()
        if not FAST_PATHS:
            self.log.info(
                "{variable}=off: the reactor reads every leg and Twisted writes every frame", variable=FAST_PATHS_VARIABLE
            )
        elif _EPOLL is not None:
            self._poller = _EPOLL()
            self.reactor.addReader(self)

    def stopService(self) -> None:
        super().stopService()
        for leg in list(self._fds):
            self.release(leg)
        if self._poller is not None:
            self.reactor.removeReader(self)
            self._poller.close()
            self._poller = None

    def adopt(self, leg: Readable, transport: Reader) -> bool:
        """Read C{leg}'s socket from now on; False when the relay is not running."""
        if self._poller is None or leg in self._fds:
            return False
        handle = transport.getHandle()
        fd = handle.fileno()
        try:
            self._poller.register(fd, _WATCH)
        except OSError as error:  # out of epoll watches: Twisted reads it as ever
            self.log.warn("descriptor {fd} read by the reactor, not the relay: {error}", fd=fd, error=error)
            return False
        transport.pauseProducing()  # the reactor stops reading it: the relay does
        self._legs[fd] = (handle, leg, transport)
        self._fds[leg] = fd
        return True

    def release(self, leg: Readable, resume: bool = True) -> None:
        """
        Stop reading C{leg}'s socket; with C{resume}, the transport reads it
        again (if it is still open and not closing). Nothing if not adopted.
        """
        fd = self._fds.pop(leg, None)
        if fd is None:
            return
        entry = self._legs.get(fd)
        if entry is None or entry[1] is not leg:
            return  # its descriptor was closed and is now another leg's: never touch that one
        del self._legs[fd]
        transport = entry[2]
        if self._poller is not None:
            try:
                self._poller.unregister(fd)
            except OSError:
                pass  # already closed: the kernel dropped it from the set
        if resume:
            transport.resumeProducing()

    # IReadDescriptor

    def fileno(self) -> int:
        return -1 if self._poller is None else self._poller.fileno()

    def logPrefix(self) -> str:
        return "audiosocket-relay"

    def doRead(self) -> None:
        """Every leg with bytes waiting: one recv each, to its dataReceived."""
        legs = self._legs
        if self._poller is None or not legs:
            return None
        for fd, events in self._poller.poll(0, len(legs)):
            entry = legs.get(fd)
            if entry is None:
                continue  # released by an earlier leg's bytes in this pass
            handle, leg, transport = entry
            why: object = None
            try:
                if events == _PLAIN_READ:
                    data = handle.recv(READ_SIZE)
                    if data:
                        leg.dataReceived(data)
                    else:
                        why = CONNECTION_DONE  # the end of stream came after the poll
                else:
                    why = self._handBack(leg, transport, events)
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                why = CONNECTION_LOST  # a reset after the poll: as tcp.Connection.doRead says
            except BaseException:
                # A leg that raises ends alone, logged, as the reactor does for
                # a protocol; the relay's other legs go on.
                why = Failure()
                self.log.failure("a leg failed on its bytes; it ends alone (its own line names it)", why)
            if why is not None:
                self._end(leg, transport, why)
        return None

    def _handBack(self, leg: Readable, transport: Reader, events: int) -> object:
        """
        An end of stream, a reset or an error: the transport reads again and
        handles the event now, as the reactor would have (not at its next
        poll: by then the leg may have written to a closed peer, whose RST
        would turn a clean close into a reset).
        """
        self.release(leg)
        if events & _PLAIN_READ:
            return transport.doRead()  # the bytes, or the end, as Twisted reads them
        return CONNECTION_DONE  # HUP or ERR without IN: the reactor's verdict too

    def _end(self, leg: Readable, transport: Reader, why: object) -> None:
        """What the reactor does with a read that ended its connection (its _disconnectSelectable)."""
        self.release(leg, resume=False)
        self.reactor.removeReader(transport)  # type: ignore[arg-type]
        failure = why if isinstance(why, Failure) else Failure(why)
        try:
            if failure.check(ConnectionDone) and IHalfCloseableDescriptor.providedBy(transport):
                transport.readConnectionLost(failure)
            else:
                self.reactor.removeWriter(transport)  # type: ignore[arg-type]
                transport.connectionLost(failure)
        except BaseException:
            self.log.failure("a leg failed as it ended")

    def connectionLost(self, reason: Failure) -> None:
        """
        The reactor shuts down and ends every descriptor it reads or writes,
        which does not include the ones paused for the relay: end them too.
        """
        legs = list(self._legs.values())
        self._legs.clear()
        self._fds.clear()
        if self._poller is not None:
            self._poller.close()
            self._poller = None
        for _, _, transport in legs:
            self.reactor.removeWriter(transport)  # type: ignore[arg-type]
            try:
                transport.connectionLost(reason)
            except BaseException:
                self.log.failure("a leg failed as it ended")

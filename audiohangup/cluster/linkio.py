# -*- test-case-name: tests.test_link -*-
"""
The media link's socket on the legs' fast paths: read by the relay's one
epoll pass, written by a direct C{send} while Twisted buffers nothing.

A bridged frame crosses two link sockets (one per instance) besides its two
legs'. Through Twisted's own path each costs a reactor dispatch per read and
an epoll_ctl pair per buffered write, which made a split frame about four
times a local one in CPU; the legs' paths (L{audiohangup.relay},
L{audiohangup.protocol}) avoid both. The same rules hold here: a write goes
to the socket only when nothing is queued ahead of it (else Twisted buffers
it, in order); an end of stream, a reset or an error goes back to Twisted
(the relay hands the socket back); the socket leaves the relay before it is
closed or aborted. With C{AUDIOHANGUP_FAST_PATHS=off}, over TLS or a test
transport, Twisted reads and writes as usual.
"""

from __future__ import annotations

import socket
from typing import cast

from twisted.internet import tcp
from twisted.internet.interfaces import IConsumer, INegotiated, IPushProducer, ITCPTransport, ITransport

from audiohangup.relay import Readable, Relay, fast_paths, send_unqueued


class LinkSocket:
    """One link's transport, read by the relay and sent to directly when it can be."""

    __slots__ = ("_relay", "_side", "_socket", "_tcp", "transport")

    def __init__(self, transport: ITransport, side: Readable, relay: Relay | None) -> None:
        self.transport = transport
        self._side = side
        self._tcp: tcp.Connection | None = None
        self._socket: socket.socket | None = None
        self._relay: Relay | None = None
        if fast_paths() and isinstance(transport, tcp.Connection) and hasattr(transport, "_tempDataLen"):
            self._tcp = transport
            self._socket = transport.socket
            if relay is not None and relay.adopt(side, transport):
                self._relay = relay

    def write(self, data: bytes) -> None:
        """Send now when nothing is queued ahead; what the socket does not take, Twisted buffers, in order."""
        sock = self._socket
        if sock is not None:
            assert self._tcp is not None
            data = send_unqueued(self._tcp, sock, data)
            if not data:
                return
        self.transport.write(data)

    def leave(self) -> None:
        """Out of the relay (before a close or an abort, or once lost): Twisted's rules end the link."""
        relay, self._relay = self._relay, None
        if relay is not None:
            relay.release(self._side, resume=False)


def set_up(transport: ITransport, producer: IPushProducer) -> None:
    """
    A link's socket as it connects: no delay (a frame's pieces must not wait
    for each other; under TLS, on the TCP connection beneath); bounded by
    C{producer} (paused: its peer stopped reading) from now, or over TLS
    once the handshake is done (L{bound}), since TLS pauses a producer while
    what is written waits for the handshake.
    """
    found: object = transport
    while found is not None and not ITCPTransport.providedBy(found):
        found = getattr(found, "transport", None)
    if found is not None:
        found.setTcpNoDelay(True)
    if not INegotiated.providedBy(transport):
        bound(transport, producer)


def bound(transport: ITransport, producer: IPushProducer) -> None:
    """From now on a full send buffer pauses C{producer} (which gives the link up)."""
    cast(IConsumer, transport).registerProducer(producer, True)

# -*- test-case-name: tests.test_listen,tests.test_page_listen -*-
"""
The Twisted side of a listen-in (L{audiohangup.streams.listen}): the API's
HTTP connection, once its ticket is taken, handed to an autobahn WebSocket
server protocol, which sends the listener's messages and drops a browser
that does not keep up.

The connection stays the API site's: it keeps its place under the
connection cap (released when the WebSocket goes), and Twisted's HTTP
channel hears of its end, so nothing of the request is left behind.
"""

from __future__ import annotations

import struct
from collections import deque
from typing import Any

from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.protocol import WebSocketProtocol
from twisted.internet.interfaces import IConsumer, IPushProducer
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from zope.interface import implementer

from audiohangup.audio import FRAME_MS
from audiohangup.streams.client import CLOSE_GRACE, _QuietAutobahnLog, _tune_socket
from audiohangup.streams.listen import IListenSocket, Listener

#: The largest message a browser may send (it sends none; a close or a ping is smaller).
MAX_BROWSER_MESSAGE = 1024

_OPEN = WebSocketProtocol.STATE_OPEN
_SHORT = struct.Struct("!BBH")


def server_frame(binary: bool, payload: bytes) -> bytes:
    """One whole, unmasked frame (RFC 6455, 5.2): what autobahn's C{sendMessage} sends, for a fraction of its cost."""
    first = 0x82 if binary else 0x81
    size = len(payload)
    if size < 126:
        return bytes([first, size]) + payload
    if size < 0x10000:
        return _SHORT.pack(first, 126, size) + payload
    return struct.pack("!BBQ", first, 127, size) + payload


@implementer(IListenSocket, IPushProducer)
class _ListenSocket:
    """
    The open WebSocket as a listener sees it. While the transport is paused
    (the browser does not read), messages wait here; once more than
    C{max_ms} of audio waits, the browser is dropped (C{slow_listener}),
    with no closing handshake: it would wait behind the audio.
    """

    def __init__(self, protocol: _ListenProtocol, listener: Listener, max_ms: int) -> None:
        self.protocol = protocol
        self.listener = listener
        self.max_ms = max_ms
        #: Frames of audio that may wait: every channel's, for C{max_ms}.
        self.max_frames = max(1, max_ms // FRAME_MS) * max(1, len(listener.channels))
        self.paused = False
        self.outbox: deque[tuple[bytes, bool]] = deque()
        self.media_waiting = 0
        self.closing: tuple[int, str] | None = None

    def send(self, data: bytes, binary: bool) -> None:
        protocol = self.protocol
        if protocol.state != _OPEN:
            return
        frame = server_frame(binary, data)
        if not self.paused and not self.outbox:
            transport = protocol.transport
            assert transport is not None
            transport.write(frame)
            return
        self.outbox.append((frame, binary))
        if binary:
            self.media_waiting += 1
            if self.media_waiting > self.max_frames:
                self._drop()

    def _drop(self) -> None:
        self.stopProducing()
        self.protocol.dropConnection(abort=True)
        self.listener.slow(
            f"slow_listener: the browser left over {self.max_ms} ms of audio unsent (--stream-max-unsent-ms)"
        )

    def close(self, code: int, reason: str) -> None:
        if self.protocol.state != _OPEN:
            return
        # A close reason is at most 123 bytes of UTF-8.
        reason = reason.encode("utf-8")[:120].decode("utf-8", errors="ignore")
        if self.outbox:
            self.closing = (code, reason)  # sent once the audio before it is out
        else:
            self.protocol.sendClose(code, reason)

    # IPushProducer: the transport's back-pressure

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        transport = self.protocol.transport
        while self.outbox and not self.paused and transport is not None:
            frame, binary = self.outbox.popleft()
            self.media_waiting -= binary
            transport.write(frame)
        if not self.outbox and self.closing is not None:
            code, reason = self.closing
            self.closing = None
            self.protocol.sendClose(code, reason)

    def stopProducing(self) -> None:
        self.outbox.clear()
        self.media_waiting = 0
        self.closing = None


class _ListenProtocol(WebSocketServerProtocol):
    log = _QuietAutobahnLog()
    factory: _ListenFactory
    websocket: _ListenSocket | None = None

    def onOpen(self) -> None:
        factory = self.factory
        transport = self.transport
        assert IConsumer.providedBy(transport), "a TCP or TLS transport"
        _tune_socket(transport)
        # The HTTP channel was the transport's producer; from now on the WebSocket is.
        transport.unregisterProducer()
        self.websocket = _ListenSocket(self, factory.listener, factory.max_unsent_ms)
        transport.registerProducer(self.websocket, True)
        factory.listener.opened(self.websocket)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        pass  # a listener only hears: nothing it sends reaches the call

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.factory.listener.closed(wasClean, code)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)
        self.factory.listener.closed(False, None)  # if onClose did not say it (a handshake that failed)
        channel, self.factory.channel = self.factory.channel, None
        if channel is not None:
            channel.connectionLost(reason)  # its slot under the cap, its request: released


class _ListenFactory(WebSocketServerFactory):
    protocol = _ListenProtocol  # type: ignore[assignment]

    def __init__(self, listener: Listener, max_unsent_ms: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.listener = listener
        self.max_unsent_ms = max_unsent_ms
        self.channel: Any = None


class ListenResource(WebSocketResource):
    """The WebSocket of one listener, taken over from the request that carried its ticket."""

    def __init__(self, listener: Listener, max_unsent_ms: int) -> None:
        factory = _ListenFactory(listener, max_unsent_ms, server="audiohangup")
        factory.setProtocolOptions(
            closeHandshakeTimeout=CLOSE_GRACE, openHandshakeTimeout=CLOSE_GRACE,
            maxMessagePayloadSize=MAX_BROWSER_MESSAGE, maxFramePayloadSize=MAX_BROWSER_MESSAGE,
        )
        super().__init__(factory)

    def render(self, request: IRequest) -> Any:
        self._factory.channel = getattr(request, "channel", None)
        return super().render(request)

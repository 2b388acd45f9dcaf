# -*- test-case-name: tests.test_streams -*-
"""
The Twisted side of a media stream: an autobahn WebSocket client per
stream, connected with an endpoint (TLS for C{wss://}, verified), bounded in
time, and kept from holding more than C{--stream-max-unsent-ms} of audio
for an application that reads too slowly (the oldest is dropped, counted).
"""

from __future__ import annotations

import socket
import sys
from collections import deque
from typing import TYPE_CHECKING, Any

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from autobahn.websocket.protocol import WebSocketProtocol
from hyperlink import URL
from twisted.internet import tcp
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.error import ConnectingCancelledError, ConnectionRefusedError, DNSLookupError
from twisted.internet.interfaces import IConsumer, IDelayedCall, IPushProducer
from twisted.internet.protocol import connectionDone
from twisted.internet.ssl import optionsForClientTLS, platformTrust
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from audiohangup import __version__
from audiohangup.audio import FRAME_MS
from audiohangup.interfaces import IReactor
from audiohangup.relay import Relay, fast_paths, send_unqueued
from audiohangup.streams.frames import BINARY, TEXT, MaskKeys, client_frame, whole_data_frame
from audiohangup.streams.messages import MAX_APP_MESSAGE, Message

if TYPE_CHECKING:
    from twisted.internet._sslverify import IOpenSSLTrustRoot  # Twisted exports no name for it
from audiohangup.streams.stream import IStreamWebSocket, MediaStream

#: Kernel and Twisted buffering of a stream's socket: small, so what waits
#: for a slow application is mostly in our own bounded queue.
SEND_BUFFER = 16 * 1024
#: After our close, how long the application has to read what is left and answer.
CLOSE_GRACE = 2.0
#: Control messages (marks answered, DTMF, the start and stop) that may wait
#: for an application that does not read. They are never dropped (an app
#: waits for its marks), so past this the stream fails (C{slow_app}). 1 MiB,
#: the largest message an app may send us: thousands of mark answers (a name
#: is at most 256 bytes), which an app that reads at all never leaves unread.
MAX_CONTROL_UNSENT = 1 << 20
#: The application's answer to the WebSocket handshake (its status line and
#: headers): autobahn gathers it whole, unbounded, before it parses it.
MAX_HANDSHAKE = 64 * 1024


class _QuietAutobahnLog:
    """
    autobahn's own log lines, dropped: a stream's end is logged once, by the
    stream, with its reason and at its level, where autobahn would add lines
    of its own (an error for every TLS failure, a failure object for every
    clean close). A failure logged as such is a bug and is kept.
    """

    _log = Logger(namespace="audiohangup.streams.autobahn")

    def __getattr__(self, name: str) -> Any:
        if name == "failure":
            return self._log.failure
        return _drop


def _drop(*args: object, **kwargs: object) -> None:
    pass


_OPEN = WebSocketProtocol.STATE_OPEN


@implementer(IStreamWebSocket, IPushProducer)
class _StreamWebSocket:
    """
    The open WebSocket as a stream sees it. The transport pauses it when its
    buffer is full; meanwhile messages wait here, bounded in bytes: media
    beyond C{max_media} frames is dropped oldest first, and control messages
    (start, marks, DTMF, stop), which are never dropped, fail the stream
    (C{slow_app}) once more than L{MAX_CONTROL_UNSENT} bytes of them wait.
    """

    def __init__(self, protocol: _ClientProtocol, stream: MediaStream, max_media: int) -> None:
        self.protocol = protocol
        self.stream = stream
        self.max_media = max_media
        self.paused = False
        self.outbox: deque[tuple[bytes, bool, bool]] = deque()
        self.media_waiting = 0
        self.bytes_waiting = 0  # media and control: what the outbox holds
        self.control_waiting = 0
        self.closing: tuple[int, str] | None = None
        self.ping: bytes | None = None  # the app's latest ping, answered once we may write again

    def _open(self) -> bool:
        """
        Whether the WebSocket still takes messages. Once the app's Close has
        arrived, autobahn refuses to send (it raises) until the TCP connection
        is gone and the stream hears of it: what the stream sends meanwhile
        (media, a mark played out, its stop) has nowhere to go and is dropped.
        """
        return bool(self.protocol.state == _OPEN)

    def send(self, message: Message, media: bool) -> None:
        protocol = self.protocol
        if protocol.state != _OPEN:  # self._open(), inline: every frame's path
            return
        payload, binary = message
        if not self.paused and not self.outbox:
            protocol.sendDataFrame(payload, binary)
            return
        self.outbox.append((payload, binary, media))
        self.bytes_waiting += len(payload)
        if media:
            self.media_waiting += 1
            if self.media_waiting > self.max_media:
                self._dropOldestMedia()
        else:
            self.control_waiting += len(payload)
            if self.control_waiting > MAX_CONTROL_UNSENT:
                self._giveUp()

    def _dropOldestMedia(self) -> None:
        for index, (payload, _, media) in enumerate(self.outbox):
            if media:
                del self.outbox[index]
                self.media_waiting -= 1
                self.bytes_waiting -= len(payload)
                self.stream.counts.dropped_to_app += 1
                return

    def _giveUp(self) -> None:
        """The app does not read and what waits for it is not media we may drop: the stream fails."""
        waiting = self.control_waiting
        self.stopProducing()
        self.closing = None
        self.protocol.dropConnection(abort=True)  # first: what the stream sends as it ends goes nowhere
        self.stream.fail(
            f"slow_app: the app does not read ({waiting} bytes of control messages unsent, "
            f"over {MAX_CONTROL_UNSENT})"
        )

    def close(self, code: int, reason: str) -> None:
        self.closing = (code, reason)
        if not self._open():
            self.stopProducing()  # the closing handshake is under way already
        elif not self.outbox:
            self.protocol.sendClose(code, reason)
        # else: sent once the outbox is out; the close timer bounds the wait.
        self.protocol.startCloseTimer()

    # IPushProducer: the transport's back-pressure

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        if not self._open():
            self.stopProducing()
            return
        if self.ping is not None:
            ping, self.ping = self.ping, None
            self.protocol.sendPong(ping)
        while self.outbox and not self.paused:
            payload, binary, media = self.outbox.popleft()
            self.bytes_waiting -= len(payload)
            if media:
                self.media_waiting -= 1
            else:
                self.control_waiting -= len(payload)
            self.protocol.sendDataFrame(payload, binary)
        if not self.outbox and self.closing is not None:
            code, reason = self.closing
            self.closing = None
            self.protocol.sendClose(code, reason)

    def stopProducing(self) -> None:
        self.outbox.clear()
        self.media_waiting = self.bytes_waiting = self.control_waiting = 0
        self.ping = None


class _ClientProtocol(WebSocketClientProtocol):
    """
    autobahn's client, with a stream's data frames (every 20 ms, each way)
    built, sent and read on a short path of ours (see L{frames}); autobahn
    keeps the handshake, control frames, the closing handshake and whatever
    is not a whole unfragmented data frame.
    """

    log = _QuietAutobahnLog()
    factory: _ClientFactory
    websocket: _StreamWebSocket | None = None
    _closeTimer: IDelayedCall | None = None
    #: The plain TCP connection under the WebSocket (not TLS), which
    #: sendDataFrame sends to directly while Twisted buffers nothing, and
    #: the legs' relay reads (one wakeup for every socket with bytes waiting);
    #: neither with AUDIOHANGUP_FAST_PATHS=off (see L{audiohangup.relay}).
    _tcp: tcp.Connection | None = None
    _socket: socket.socket | None = None
    _relay: Relay | None = None

    def connectionMade(self) -> None:
        self._keys = MaskKeys()
        super().connectionMade()

    def onOpen(self) -> None:
        factory = self.factory
        factory.opened = True
        if factory.timer is not None and factory.timer.active():
            factory.timer.cancel()
        transport = self.transport
        assert IConsumer.providedBy(transport), "a TCP or TLS transport"
        _tune_socket(transport)
        if fast_paths() and isinstance(transport, tcp.Connection) and hasattr(transport, "_tempDataLen"):
            self._tcp = transport
            self._socket = transport.socket
            relay = factory.relay
            if relay is not None and relay.adopt(self, transport):
                self._relay = relay
        self.websocket = _StreamWebSocket(self, factory.stream, factory.max_media)
        transport.registerProducer(self.websocket, True)
        factory.stream.opened(self.websocket)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.factory.stream.messageReceived(payload, isBinary)

    def sendDataFrame(self, payload: bytes, binary: bool) -> None:
        """
        One whole message, in one frame: what autobahn's C{sendMessage} sends
        for us (no compression, no fragments), for a fraction of its cost. On
        plain TCP, with nothing queued ahead, it goes straight to the socket:
        Twisted's write would add an epoll_ctl pair per frame and wait for the
        reactor's next pass. Under TLS it goes through the TLS transport.
        """
        frame = client_frame(BINARY if binary else TEXT, payload, self._keys.next())
        sock = self._socket
        if sock is not None:
            assert self._tcp is not None
            frame = send_unqueued(self._tcp, sock, frame)
            if not frame:
                return
        transport = self.transport
        assert transport is not None
        transport.write(frame)

    def dataReceived(self, data: bytes) -> None:
        # autobahn's would first build the arguments of a debug line that is dropped.
        self._dataReceived(data)

    def _closeConnection(self, abort: bool = False) -> None:
        self._leaveRelay()  # the relay reads no socket that is closing: Twisted's rules end it
        super()._closeConnection(abort)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._leaveRelay()
        super().connectionLost(reason)

    def _leaveRelay(self) -> None:
        relay, self._relay = self._relay, None
        if relay is not None:
            relay.release(self, resume=False)

    def processData(self) -> bool:
        """
        Read the next frame: a whole, final data frame here, at once (UTF-8
        checked for text, as autobahn would); anything else by autobahn.
        """
        if self.current_frame is None and not self.inside_message:
            data = self.data
            found = whole_data_frame(data, self.maxMessagePayloadSize or sys.maxsize)  # 0: unbounded
            if found is not None:
                opcode, start, end = found
                payload = data[start:end]
                if opcode == TEXT and not payload.isascii():
                    try:
                        payload.decode("utf-8")
                    except UnicodeDecodeError:
                        return bool(super().processData())  # autobahn closes the stream (1007)
                self.data = data[end:]
                if not self.failedByMe:
                    self.onMessage(payload, opcode == BINARY)
                return len(self.data) > 0
        return bool(super().processData())

    def onPing(self, payload: bytes) -> None:
        """
        A pong per ping while the app reads would pile up under a paused
        transport: RFC 6455 (5.5.3) lets us answer only the latest ping, once
        we may write again.
        """
        websocket = self.websocket
        if websocket is not None and (websocket.paused or websocket.outbox):
            websocket.ping = payload  # at most 125 bytes
            return
        super().onPing(payload)

    def processHandshake(self) -> None:
        if len(self.data) > MAX_HANDSHAKE and self.data.find(b"\r\n\r\n", 0, MAX_HANDSHAKE) < 0:
            self.factory.failed(f"the app's answer to the WebSocket handshake is over {MAX_HANDSHAKE} bytes")
            self.dropConnection(abort=True)
            return
        super().processHandshake()

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if self._closeTimer is not None and self._closeTimer.active():
            self._closeTimer.cancel()
        factory = self.factory
        if factory.opened:
            factory.stream.closed(wasClean, code, _why(reason))
        else:
            factory.failed(_why(reason) or "the WebSocket handshake failed")

    def startCloseTimer(self) -> None:
        if self._closeTimer is None:
            self._closeTimer = self.factory.reactor.callLater(CLOSE_GRACE, self.dropConnection, True)


class _ClientFactory(WebSocketClientFactory):
    # autobahn's factory derives from Twisted's without naming its protocol type.
    protocol = _ClientProtocol  # type: ignore[assignment]
    def __init__(
        self, stream: MediaStream, reactor: IReactor, max_media: int, relay: Relay | None = None, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.stream = stream
        self.reactor = reactor
        self.max_media = max_media
        self.relay = relay
        self.opened = False
        self.reported = False
        self.timer: IDelayedCall | None = None

    def failed(self, reason: str) -> None:
        if not self.reported:
            self.reported = True
            self.stream.connectFailed(reason)


def _why(reason: str | None) -> str:
    """autobahn's close reason, without its wrapping."""
    text = reason or ""
    prefix = 'connection was closed uncleanly ("'
    if text.startswith(prefix) and text.endswith('")'):
        text = text[len(prefix) : -2]
    return text


def _tune_socket(transport: Any) -> None:
    """
    The socket under the WebSocket (TCP, or TLS over TCP): small buffers, so
    back-pressure reaches us early, and no Nagle: a small write that follows
    one not yet acknowledged would wait for the app's delayed ACK (up to 40 ms
    on Linux), and the app's own writes wait for the ACKs ours carry.
    """
    layer = transport
    while layer is not None:
        if hasattr(layer, "bufferSize"):
            layer.bufferSize = SEND_BUFFER
        handle = getattr(layer, "getHandle", None)
        if handle is not None:
            sock = handle()
            if isinstance(sock, socket.socket):
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
                    if sock.family in (socket.AF_INET, socket.AF_INET6):
                        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                except OSError:
                    pass
        layer = getattr(layer, "transport", None)


def _describe(failure: Failure, timeout: float) -> str:
    if failure.check(CancelledError, ConnectingCancelledError):
        return f"no WebSocket within {timeout:g} s (--stream-connect-timeout)"
    if failure.check(ConnectionRefusedError):
        return "connection refused"
    if failure.check(DNSLookupError):
        return f"host not found ({failure.getErrorMessage()})"
    return f"{type(failure.value).__name__}: {failure.getErrorMessage()}"


def connect(
    stream: MediaStream,
    reactor: IReactor,
    *,
    headers: dict[str, str],
    timeout: float,
    max_unsent_ms: int,
    trust_root: IOpenSSLTrustRoot | None = None,
    relay: Relay | None = None,
) -> None:
    """
    Open the stream's WebSocket; the stream hears of the outcome: C{opened}
    with its L{_StreamWebSocket}, or C{connectFailed} with the reason. The whole of it (TCP,
    TLS, the WebSocket handshake) is bounded by C{timeout}, and a stream
    stopped meanwhile is closed as soon as it opens.
    """
    url = URL.from_text(stream.url)
    secure = url.scheme == "wss"
    factory = _ClientFactory(
        stream, reactor, max(1, max_unsent_ms // FRAME_MS), None if secure else relay,
        url=stream.url, headers=headers, useragent=f"audiohangup/{__version__}",
    )
    # A message over the bound is refused as it arrives (close 1009), not
    # gathered whole first: autobahn's default is no bound at all.
    factory.setProtocolOptions(
        closeHandshakeTimeout=CLOSE_GRACE, maxMessagePayloadSize=MAX_APP_MESSAGE, maxFramePayloadSize=MAX_APP_MESSAGE
    )
    endpoint: Any = HostnameEndpoint(reactor, url.host, url.port or (443 if secure else 80), timeout=timeout)
    if secure:
        trust = trust_root if trust_root is not None else platformTrust()
        endpoint = wrapClientTLS(optionsForClientTLS(url.host, trustRoot=trust), endpoint)
    connecting: Deferred[Any] = endpoint.connect(factory)
    made: list[_ClientProtocol] = []

    def giveUp() -> None:
        if factory.opened:
            return
        if made:  # connected, but the TLS or WebSocket handshake did not finish
            factory.failed(f"no WebSocket within {timeout:g} s (--stream-connect-timeout)")
            made[0].dropConnection(abort=True)
        else:
            connecting.cancel()

    timer = reactor.callLater(timeout, giveUp)

    def failed(failure: Failure) -> None:
        if timer.active():
            timer.cancel()
        factory.failed(_describe(failure, timeout))

    connecting.addCallbacks(made.append, failed)
    factory.timer = timer

"""
A WebSocket application for the media stream tests: autobahn's server side
on loopback, as a voice app, a transcriber or a broken app would be. It
keeps every connection, its handshake headers and every message in order,
and can answer, echo, stop reading, close or vanish.
"""

from __future__ import annotations

import base64
import json
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import SSL4ServerEndpoint, TCP4ServerEndpoint

from tests.tls import SelfSigned


@dataclass
class Received:
    """One message from audiohangup, with when it arrived."""

    at: float
    payload: bytes
    binary: bool

    @property
    def json(self) -> dict[str, Any]:
        assert not self.binary
        body: dict[str, Any] = json.loads(self.payload)
        return body

    @property
    def event(self) -> str | None:
        return None if self.binary else self.json.get("event")


@dataclass
class Connection:
    """One stream as the app sees it."""

    protocol: Any
    headers: dict[str, str]
    path: str
    messages: list[Received] = field(default_factory=list)
    opened: Deferred[None] = field(default_factory=Deferred)
    closed: Deferred[tuple[bool, int | None]] = field(default_factory=Deferred)

    def events(self, name: str | None = None) -> list[Received]:
        return [m for m in self.messages if not m.binary and (name is None or m.event == name)]

    def media(self) -> list[Received]:
        return [m for m in self.messages if m.binary or m.event == "media"]

    def twilio_audio(self) -> bytes:
        """The μ-law of every Twilio media message, in order."""
        return b"".join(base64.b64decode(m.json["media"]["payload"]) for m in self.events("media"))

    def send_json(self, body: dict[str, Any]) -> None:
        self.protocol.sendMessage(json.dumps(body).encode(), isBinary=False)

    def send_binary(self, payload: bytes) -> None:
        self.protocol.sendMessage(payload, isBinary=True)

    def close(self, code: int = 1000) -> None:
        self.protocol.sendClose(code, "the app is done")

    def vanish(self) -> None:
        """Go away without a closing handshake (a crash, a network cut)."""
        self.protocol.transport.abortConnection()

    def stop_reading(self) -> None:
        self.protocol.transport.pauseProducing()


class _AppProtocol(WebSocketServerProtocol):
    factory: _AppFactory
    connection: Connection

    def onConnect(self, request: Any) -> None:
        headers = {name.lower(): value for name, value in request.headers.items()}
        self.connection = Connection(self, headers, self.http_request_uri)  # the path and its query
        self.factory.app.connections.append(self.connection)

    def onOpen(self) -> None:
        self.connection.opened.callback(None)
        if self.factory.app.on_open is not None:
            self.factory.app.on_open(self.connection)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        received = Received(reactor.seconds(), payload, isBinary)
        self.connection.messages.append(received)
        if self.factory.app.on_message is not None:
            self.factory.app.on_message(self.connection, received)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        connection = getattr(self, "connection", None)
        if connection is not None and not connection.closed.called:
            connection.closed.callback((wasClean, code))


class _AppFactory(WebSocketServerFactory):
    protocol = _AppProtocol

    def __init__(self, app: App) -> None:
        super().__init__()
        self.app = app


@dataclass
class App:
    """The application end of media streams, listening on loopback."""

    on_open: Callable[[Connection], None] | None = None
    on_message: Callable[[Connection, Received], None] | None = None
    connections: list[Connection] = field(default_factory=list)
    port: Any = None
    tls: bool = False

    async def listen(self, tls: SelfSigned | None = None, receive_buffer: int | None = None) -> App:
        factory = _AppFactory(self)
        if tls is None:
            endpoint: Any = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
        else:
            self.tls = True
            endpoint = SSL4ServerEndpoint(reactor, 0, tls.server_options(), interface="127.0.0.1")
        self.port = await endpoint.listen(factory)
        if receive_buffer is not None:  # inherited by accepted sockets: a small window fills fast
            self.port.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        return self

    def url(self, path: str = "/stream") -> str:
        if self.tls:
            return f"wss://localhost:{self.port.getHost().port}{path}"
        return f"ws://127.0.0.1:{self.port.getHost().port}{path}"

    async def close(self) -> None:
        for connection in self.connections:
            transport = connection.protocol.transport
            if transport is not None and not connection.closed.called:
                transport.abortConnection()
        if self.port is not None:
            await self.port.stopListening()


def echo(connection: Connection, received: Received) -> None:
    """Send every bit of audio back as it came (Twilio media, or binary frames)."""
    if received.binary:
        connection.send_binary(received.payload)
    elif received.event == "media":
        connection.send_json({"event": "media", "media": {"payload": received.json["media"]["payload"]}})

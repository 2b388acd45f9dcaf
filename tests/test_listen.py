"""
Listen-in: tickets and scopes as pure code; then the server in-process on
loopback, fake Asterisk legs on one side and an autobahn WebSocket client
(a browser's stand-in) on the other, over the API's real port.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol, connectWS
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater

from audiohangup.http.access import Scope, TokenFileError, Tokens
from audiohangup.reasons import Role
from audiohangup.streams.listen import Tickets
from audiohangup.streams.manager import StreamConfig
from audiohangup.wire import Kind, encode_frame
from tests.conftest import LogCapture, Server, bridged, until

READ = "read-token-0123456789"
LISTEN = "listen-token-0123456789"
CONTROL = "control-token-0123456789"


def slin(value: int, count: int = 160) -> bytes:
    return value.to_bytes(2, "little", signed=True) * count


# Pure code


def test_scopes() -> None:
    """listen covers read, control covers both; read never covers listen."""
    assert Scope.LISTEN.covers(Scope.READ) and Scope.LISTEN.covers(Scope.LISTEN)
    assert not Scope.READ.covers(Scope.LISTEN) and not Scope.LISTEN.covers(Scope.CONTROL)
    assert Scope.CONTROL.covers(Scope.LISTEN)
    tokens = Tokens.parse(f"read {READ}\nlisten {LISTEN}\ncontrol {CONTROL}\nlisten {CONTROL}\n")
    assert tokens.counts() == {"read": 1, "listen": 2, "control": 1}
    assert tokens.scope_of(LISTEN) is Scope.LISTEN
    assert tokens.scope_of(CONTROL) is Scope.CONTROL  # the widest, whatever the order
    with pytest.raises(TokenFileError, match="read, listen, control"):
        Tokens.parse(f"hear {LISTEN}\n")


def test_tickets() -> None:
    """A ticket is good once, for its call, until it expires; the table is bounded."""
    tickets = Tickets(seconds=10.0, limit=3)
    call, other = str(uuid.uuid4()), str(uuid.uuid4())
    ticket = tickets.issue(call, Role.VISITOR, "someone", now=100.0)
    grant = tickets.take(ticket, call, now=109.0)
    assert grant is not None and grant.role is Role.VISITOR and grant.who == "someone"
    assert tickets.take(ticket, call, now=109.0) is None  # used
    wrong = tickets.issue(call, None, "someone", now=100.0)
    assert tickets.take(wrong, other, now=100.0) is None
    assert tickets.take(wrong, call, now=100.0) is None  # spent on the wrong call
    late = tickets.issue(call, None, "someone", now=100.0)
    assert tickets.take(late, call, now=110.0) is None
    elsewhere = tickets.issue(call, None, "someone", now=100.0, source="192.0.2.1")
    assert tickets.take(elsewhere, call, now=100.0, source="192.0.2.2") is None
    here = tickets.issue(call, None, "someone", now=100.0, source="192.0.2.1")
    assert tickets.take(here, call, now=100.0, source="192.0.2.1") is not None
    first = tickets.issue(call, None, "x", now=200.0)
    for _ in range(3):
        tickets.issue(call, None, "x", now=200.0)
    assert len(tickets) == 3 and tickets.take(first, call, now=200.0) is None  # the oldest went


# Over real sockets


class _Client(WebSocketClientProtocol):
    factory: Any

    def onOpen(self) -> None:
        self.factory.protocol_made = self
        self.factory.opened.callback(None)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.factory.messages.append((payload, isBinary))

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if not self.factory.opened.called:
            self.factory.opened.errback(ConnectionError(reason))
        if not self.factory.closed.called:
            self.factory.closed.callback((wasClean, code, reason))


class Listening:
    """A browser's stand-in: the messages of one listen-in's WebSocket."""

    def __init__(self, url: str) -> None:
        factory = WebSocketClientFactory(url)
        factory.protocol = _Client
        factory.messages = []
        factory.opened = Deferred()
        factory.closed = Deferred()
        self.factory = factory
        connectWS(factory)

    @property
    def messages(self) -> list[tuple[bytes, bool]]:
        return list(self.factory.messages)

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(payload) for payload, binary in self.messages if not binary]

    def audio(self, channel: int = 0) -> list[bytes]:
        return [payload[2:] for payload, binary in self.messages if binary and payload[0] == channel]

    @property
    def protocol(self) -> Any:
        return self.factory.protocol_made


async def tokens_server(make_server: Any, tmp_path: Path, **options: Any) -> Server:
    path = tmp_path / "tokens"
    path.write_text(f"read {READ}\nlisten {LISTEN}\ncontrol {CONTROL}\n")
    os.chmod(path, 0o600)
    return await make_server(api_tokens_file=str(path), **options)


async def ticket(server: Server, call_id: Any, token: str, role: str | None = None) -> tuple[int, dict[str, Any]]:
    url = f"{server.url}/calls/{call_id}/listen" + (f"?role={role}" if role else "")
    response = await treq.post(url, headers={"Authorization": f"Bearer {token}"}, persistent=False)
    return response.code, await response.json()


async def listen(server: Server, call_id: Any, token: str = LISTEN, role: str | None = None) -> Listening:
    code, answer = await ticket(server, call_id, token, role)
    assert code == 201, answer
    listening = Listening(server.url.replace("http://", "ws://") + "/" + answer["path"])
    await listening.factory.opened
    return listening


def metric(server: Server, name: str, **labels: str) -> float:
    return server.service.api.metrics.get_sample_value(name, labels) or 0.0


@pytest_twisted.ensureDeferred
async def test_read_token_is_refused(make_server: Any, tmp_path: Path, logs: LogCapture) -> None:
    """A read token gets a 403 that names the scope; a WebSocket without a valid ticket gets a 403 too."""
    server = await tokens_server(make_server, tmp_path)
    call_id, visitor, resident = await bridged(server)
    code, answer = await ticket(server, call_id, READ)
    assert code == 403 and answer["error"]["code"] == "forbidden"
    assert "needs a listen token" in answer["error"]["message"] and "read scope" in answer["error"]["message"]
    for query in ("", "?ticket=made-up"):
        response = await treq.get(
            f"{server.url}/calls/{call_id}/listen{query}", persistent=False,
            headers={"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
                     "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="},
        )
        assert response.code == 403 and (await response.json())["error"]["code"] == "bad_ticket"
    plain = await treq.get(f"{server.url}/calls/{call_id}/listen", persistent=False)
    assert plain.code == 400 and (await plain.json())["error"]["code"] == "websocket_required"
    assert metric(server, "audiohangup_listens_total", result="refused") == 3
    assert all(not leg.taps for leg in server.registry.call(str(call_id)))
    visitor.close()
    resident.close()
    await until(lambda: len(server.registry) == 0, what="the legs to end")


@pytest_twisted.ensureDeferred
async def test_listen_hears_the_leg(make_server: Any, tmp_path: Path, logs: LogCapture) -> None:
    """
    A listen token's ticket opens the WebSocket: the browser gets the leg's
    audio byte for byte, as L16; the use is logged (who, which call) and
    counted; closing the WebSocket takes the tap off the leg. A ticket is
    good once.
    """
    server = await tokens_server(make_server, tmp_path)
    call_id, visitor, resident = await bridged(server)
    [leg] = [leg for leg in server.registry.call(str(call_id)) if leg.role == "visitor"]
    code, answer = await ticket(server, call_id, LISTEN, "visitor")
    assert code == 201 and answer["role"] == "visitor" and answer["expires_in"] == 10
    url = server.url.replace("http://", "ws://") + "/" + answer["path"]
    listening = Listening(url)
    await listening.factory.opened
    [start] = await until(listening.events, what="the start message")
    assert start["channels"] == [{"role": "visitor", "rate": 8000}] and start["encoding"] == "L16"
    assert metric(server, "audiohangup_listens_active") == 1
    cap = server.service.getServiceNamed("http").factory.cap
    assert cap.held == 1  # the WebSocket keeps its HTTP connection's place under the cap
    sent = [slin(37 * n - 1000) for n in range(25)]
    for payload in sent:
        visitor.send(encode_frame(Kind.SLIN, payload))
    resident.send(encode_frame(Kind.SLIN, slin(5)))  # not this listen-in's leg
    await until(lambda: len(listening.audio()) == 25, what="25 frames at the browser")
    assert listening.audio() == sent
    assert listening.audio(1) == []
    [opened] = [text for text in logs.texts() if "listen-in" in text and "open" in text]
    assert str(call_id) in opened and "listen token sha256:" in opened and "127.0.0.1" in opened
    assert LISTEN not in " ".join(logs.texts())

    again = Listening(url)  # the same ticket, once more
    with pytest.raises(ConnectionError):
        await again.factory.opened

    listening.protocol.sendClose(1000)
    await listening.factory.closed
    await until(lambda: metric(server, "audiohangup_listens_active") == 0, what="the listener to end")
    assert leg.taps == [] and leg.live
    await until(lambda: cap.held == 0, what="the connection's place under the cap to be freed")
    assert metric(server, "audiohangup_listens_total", result="closed") == 1
    assert any("ended (closed)" in text for text in logs.texts())
    visitor.close()
    resident.close()
    await until(lambda: len(server.registry) == 0, what="the legs to end")


@pytest_twisted.ensureDeferred
async def test_call_listen_ends_with_the_legs(make_server: Any, logs: LogCapture) -> None:
    """
    No role: both parties, on two channels (a G.711 leg decoded to L16). When
    the legs end, the browser gets a stop with the reason and a clean close.
    No token on a loopback API: the log says so.
    """
    from audiohangup.audio import FORMATS
    from audiohangup.codecs import decode, encode

    server = await make_server(resident_audio="ulaw")
    call_id, visitor, resident = await bridged(server)
    listening = await listen(server, call_id, token="")
    [start] = await until(listening.events, what="the start message")
    assert start["channels"] == [{"role": "visitor", "rate": 8000}, {"role": "resident", "rate": 8000}]
    ulaw = encode(slin(1234), FORMATS["ulaw"])
    visitor.send(encode_frame(Kind.SLIN, slin(-42)))
    resident.send(encode_frame(Kind.SLIN, ulaw))
    await until(lambda: listening.audio(0) and listening.audio(1), what="both channels")
    assert listening.audio(0) == [slin(-42)] and listening.audio(1) == [decode(ulaw, FORMATS["ulaw"])]
    visitor.close()
    clean, code, _ = await listening.factory.closed
    assert (clean, code) == (True, 1000)
    assert listening.events()[-1] == {"event": "stop", "reason": "the call's legs ended"}
    await until(lambda: len(server.registry) == 0, what="the legs to end")
    assert metric(server, "audiohangup_listens_total", result="leg_ended") == 1
    assert metric(server, "audiohangup_listens_active") == 0
    assert any("for no token (the API takes none)" in text for text in logs.texts())


@pytest_twisted.ensureDeferred
async def test_slow_listener_is_dropped(make_server: Any, logs: LogCapture) -> None:
    """A browser that stops reading is dropped past --stream-max-unsent-ms; the call goes on."""
    server = await make_server(streams=StreamConfig(max_unsent_ms=100))
    call_id, visitor, resident = await bridged(server)
    listening = await listen(server, call_id, token="", role="visitor")
    listening.protocol.transport.pauseProducing()  # reads nothing more
    [leg] = [leg for leg in server.registry.call(str(call_id)) if leg.role == "visitor"]
    frame = encode_frame(Kind.SLIN, slin(1000))

    for _ in range(400):  # bounded: 20000 frames, 6 MB
        visitor.send(frame * 50)
        await deferLater(reactor, 0.01)
        if metric(server, "audiohangup_listens_total", result="slow_listener") == 1:
            break
    assert metric(server, "audiohangup_listens_total", result="slow_listener") == 1
    assert leg.taps == [] and leg.live and len(server.registry) == 2
    [ended] = [text for text in logs.texts() if "ended (slow_listener)" in text]
    assert "over 100 ms of audio unsent" in ended
    listening.protocol.transport.resumeProducing()
    await listening.factory.closed
    visitor.close()
    resident.close()
    await until(lambda: len(server.registry) == 0, what="the legs to end")


@pytest_twisted.ensureDeferred
async def test_failed_handshake(make_server: Any, logs: LogCapture) -> None:
    """A valid ticket on a request the WebSocket handshake refuses: 400, the listener failed, the connection freed."""
    server = await make_server()
    call_id, visitor, resident = await bridged(server)
    code, answer = await ticket(server, call_id, "")
    assert code == 201
    response = await treq.get(
        f"{server.url}/{answer['path']}", headers={"Upgrade": "websocket", "Connection": "Upgrade"}, persistent=False
    )
    assert response.code == 400
    await response.content()
    await until(lambda: metric(server, "audiohangup_listens_total", result="failed") == 1, what="the failed listener")
    assert metric(server, "audiohangup_listens_active") == 0
    cap = server.service.getServiceNamed("http").factory.cap
    await until(lambda: cap.held == 0, what="the connection's place under the cap to be freed")
    assert all(not leg.taps for leg in server.registry.call(str(call_id)))
    visitor.close()
    resident.close()
    await until(lambda: len(server.registry) == 0, what="the legs to end")


@pytest_twisted.ensureDeferred
async def test_server_stop_ends_the_listen_in(make_server: Any, logs: LogCapture) -> None:
    """Stopping the server hangs the legs up: the browser gets the stop and a clean close."""
    server = await make_server()
    call_id, _, _ = await bridged(server)
    listening = await listen(server, call_id, token="")
    await server.service.stopService()
    clean, code, _ = await listening.factory.closed
    assert (clean, code) == (True, 1000)
    assert listening.events()[-1]["event"] == "stop"
    assert metric(server, "audiohangup_listens_total", result="leg_ended") == 1

"""
Media streams over real sockets: the server in-process on loopback, fake
Asterisk legs on one side, an autobahn WebSocket application on the other
(tests/ws_app.py). Timing assertions use the server's own record of when it
wrote each frame (a spy on the leg), which no load can reorder.
"""

from __future__ import annotations

import base64
import json
import socket
import uuid
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.logger import LogLevel

from audiohangup import relay as relay_module
from audiohangup.audio import FORMATS
from audiohangup.codecs import decode as g711_decode
from audiohangup.codecs import encode as g711_encode
from audiohangup.http.api import leg_view
from audiohangup.reasons import HangupCause, Role
from audiohangup.streams import client as stream_client
from audiohangup.streams.manager import StreamConfig
from audiohangup.streams.stream import MediaStream
from audiohangup.webhooks import verify
from audiohangup.wire import Kind, encode_frame
from tests.bystander import Bystander
from tests.conftest import LogCapture, Server, bridged, until
from tests.fake_asterisk import FakeAsterisk, connect
from tests.redis_server import free_port
from tests.tls import self_signed
from tests.ws_app import App, Connection

ULAW = FORMATS["ulaw"]


def slin(value: int, count: int = 160) -> bytes:
    return value.to_bytes(2, "little", signed=True) * count


def ulaw_frame(value: int) -> bytes:
    """160 μ-law bytes that decode to C{value}-ish samples: a marked frame of the app's audio."""
    return g711_encode(slin(value), ULAW)


def media(audio: bytes) -> dict[str, Any]:
    return {"event": "media", "streamSid": "ignored", "media": {"payload": base64.b64encode(audio).decode()}}


class Writes:
    """The server side of a leg: when each frame was written to it, and what."""

    def __init__(self, leg: Any) -> None:
        self.written: list[tuple[float, bytes]] = []
        original = leg._write

        def spy(data: bytes) -> None:
            self.written.append((reactor.seconds(), data))
            original(data)

        leg._write = spy

    def payloads(self, since: float = 0.0) -> list[tuple[float, bytes]]:
        return [(at, data[3:]) for at, data in self.written if at >= since and data[:1] != b"\x00"]


async def start(
    make_server: Any, app: App, *, path: str = "/s/{call_id}/{role}", roles: tuple[Role, ...] = (Role.VISITOR,),
    **options: Any,
) -> tuple[Server, uuid.UUID, FakeAsterisk, Connection]:
    server = await make_server(streams=StreamConfig(url=app.url(path), roles=roles, **options))
    call_id = uuid.uuid4()
    client = await connect(server.port("visitor"), on_hangup="close")
    client.send_uuid(call_id)
    await until(lambda: app.connections and app.connections[0].events("start"), what="the stream's start")
    return server, call_id, client, app.connections[0]


async def metric(server: Server, name: str, **labels: str) -> float:
    return server.service.api.metrics.get_sample_value(name, labels) or 0.0


@pytest_twisted.async_yield_fixture
async def app() -> Any:
    made = App()
    yield await made.listen()
    await made.close()


# Both protocols, leg to app


@pytest_twisted.ensureDeferred
async def test_twilio_stream(make_server: Any, app: App, logs: LogCapture) -> None:
    server, call_id, client, stream = await start(make_server, app, path="/twilio?token=secret")
    connected, begun = stream.events()[:2]
    assert connected.json == {"event": "connected", "protocol": "Call", "version": "1.0.0"}
    start_ = begun.json
    assert start_["sequenceNumber"] == "1" and start_["streamSid"] == start_["start"]["streamSid"]
    assert start_["start"]["callSid"] == str(call_id)
    assert start_["start"]["tracks"] == ["inbound"]
    assert start_["start"]["customParameters"] == {"role": "visitor"}
    assert start_["start"]["mediaFormat"] == {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}
    assert stream.path == "/twilio?token=secret"
    sent = [slin(100 * n) for n in range(1, 11)]
    for payload in sent:
        client.send(encode_frame(Kind.SLIN, payload))
    await until(lambda: len(stream.events("media")) == 10, what="ten media messages")
    messages = [m.json for m in stream.events("media")]
    assert [m["media"]["chunk"] for m in messages] == [str(n) for n in range(1, 11)]
    assert [int(m["sequenceNumber"]) for m in messages] == list(range(2, 12))
    assert stream.twilio_audio() == b"".join(g711_encode(payload, ULAW) for payload in sent)
    [leg] = server.registry.call(str(call_id))
    assert leg_view(leg)["streams"][0]["url"] == app.url("/twilio")  # no query string: it may hold a token
    assert "token=secret" not in "".join(logs.texts())


@pytest_twisted.ensureDeferred
async def test_audiohangup_stream(make_server: Any, app: App, logs: LogCapture) -> None:
    _server, call_id, client, stream = await start(make_server, app, protocol="audiohangup")
    [begun] = stream.events()
    assert {k: v for k, v in begun.json.items() if k != "stream_id"} == {
        "event": "start", "call_id": str(call_id), "role": "visitor",
        "format": {"encoding": "L16", "sample_rate": 8000, "channels": 1}, "parameters": {},
    }
    sent = [slin(7 * n) for n in range(1, 11)]
    for payload in sent:
        client.send(encode_frame(Kind.SLIN, payload))
    client.send(encode_frame(Kind.DTMF, b"7"))
    await until(lambda: len(stream.media()) == 10 and stream.events("dtmf"), what="ten frames and a digit")
    assert [m.payload for m in stream.media()] == sent
    assert stream.events("dtmf")[0].json == {"event": "dtmf", "digit": "7"}


# App to leg


@pytest_twisted.ensureDeferred
async def test_app_audio_is_paced_cleared_and_marked(make_server: Any, app: App, logs: LogCapture) -> None:
    """
    One second of speech in one message plays at 50 frames/s, never a burst;
    a mark comes back after its audio; clear stops the rest at once and
    answers the marks still waiting.
    """
    server, call_id, _client, stream = await start(make_server, app)
    leg = server.registry.get(str(call_id), Role.VISITOR)
    writes = Writes(leg)
    began = reactor.seconds()
    pacer = server.service.pacer
    missed = pacer.missed_slots
    stream.send_json(media(b"".join(ulaw_frame(100 * n) for n in range(1, 51))))
    stream.send_json({"event": "mark", "mark": {"name": "first second"}})
    stream.send_json(media(b"".join(ulaw_frame(-100 * n) for n in range(1, 151))))
    stream.send_json({"event": "mark", "mark": {"name": "never played"}})
    await until(lambda: stream.events("mark"), timeout=10, what="the first mark")
    missed = pacer.missed_slots - missed
    played = writes.payloads(began)
    first = [g711_decode(ulaw_frame(100 * n), ULAW) for n in range(1, 51)]
    # In order, each once, the last one included: a busy machine's late tick drops what was due in the
    # slots it missed (docs/streams.rst, "No standing delay"), and only that.
    marked_at = stream.events("mark")[0].at
    heard = [data for at, data in played if at <= marked_at]  # answered after the last frame before it was written
    rest = iter(first)
    assert all(frame in rest for frame in heard) and heard[-1] == first[-1]  # in order, each once
    assert 50 >= len(heard) >= 50 - missed
    assert stream.events("mark")[0].json["mark"] == {"name": "first second"}
    times = [at for at, _ in played[: len(heard)]]
    assert times[-1] - times[0] >= (len(heard) - 1) * 0.020 - 0.005  # one frame a tick: a second for 50
    assert max(sum(1 for t in times if start_ <= t < start_ + 0.1) for start_ in times) <= 6  # never a burst
    cleared = len(writes.payloads(began))
    stream.send_json({"event": "clear"})
    await until(lambda: len(stream.events("mark")) == 2, what="the cleared mark")
    assert stream.events("mark")[1].json["mark"] == {"name": "never played"}
    cleared_at = stream.events("mark")[1].at
    # Within one tick of the clear reaching the server, the app's audio stops; the pacer's silence follows.
    leftovers = [data for at, data in writes.payloads(began)[cleared:] if at < cleared_at and data != slin(0)]
    assert len(leftovers) <= 1
    assert all(data == slin(0) for at, data in writes.payloads(began) if at >= cleared_at)
    assert await metric(server, "audiohangup_stream_dropped_frames_total", direction="from_app") >= 100


@pytest_twisted.ensureDeferred
async def test_app_hangs_the_leg_up(make_server: Any, app: App, logs: LogCapture) -> None:
    _server, call_id, client, stream = await start(make_server, app, protocol="audiohangup")
    stream.send_json({"event": "hangup", "after_playout": False})
    await client.closed
    assert client.ended_with_single_hangup()
    [ended] = await until(lambda: logs.ended(str(call_id)), what="the leg's end")
    assert ended["cause"] == HangupCause.STREAM
    clean, code = await stream.closed
    assert (clean, code) == (True, 1000)
    assert [m.event for m in stream.events()][-1] == "stop"


@pytest_twisted.ensureDeferred
async def test_app_hangs_the_leg_up_after_playout(make_server: Any, app: App, logs: LogCapture) -> None:
    """Twilio's extension with afterPlayout: the app's ten queued frames reach the leg whole, then 00 00 00."""
    _server, call_id, client, stream = await start(make_server, app)
    marked = [g711_decode(ulaw_frame(100 * n), ULAW) for n in range(1, 11)]
    stream.send_json(media(b"".join(ulaw_frame(100 * n) for n in range(1, 11))))
    stream.send_json({"event": "hangup", "afterPlayout": True})
    await client.closed
    assert client.ended_with_single_hangup()
    heard = [frame.payload for frame in client.frames if frame.kind == Kind.SLIN and frame.payload != slin(0)]
    assert heard == marked
    [ended] = await until(lambda: logs.ended(str(call_id)), what="the leg's end")
    assert ended["cause"] == HangupCause.STREAM


@pytest_twisted.ensureDeferred
async def test_leg_end_sends_stop_and_closes(make_server: Any, app: App, logs: LogCapture) -> None:
    server, call_id, client, stream = await start(make_server, app)
    client.reset()
    clean, code = await stream.closed
    assert (clean, code) == (True, 1000)
    stop = stream.events()[-1].json
    assert stop["event"] == "stop" and stop["stop"]["callSid"] == str(call_id)
    await until(lambda: not server.service.streams.current, what="the stream to be over")
    assert await metric(server, "audiohangup_streams_total", protocol="twilio", outcome="ended") == 1
    assert await metric(server, "audiohangup_streams_active") == 0


@pytest_twisted.ensureDeferred
async def test_listen_mode_leaves_the_bridge_alone(make_server: Any, app: App, logs: LogCapture) -> None:
    server, call_id, visitor, stream = await start(make_server, app, mode="listen", protocol="audiohangup")
    resident = await connect(server.port("resident"), on_hangup="close")
    resident.send_uuid(call_id)
    await until(lambda: len(server.registry) == 2, what="both legs")
    for n in range(1, 6):
        stream.send_binary(slin(-1000 * n))  # the app talks: not played
        resident.send(encode_frame(Kind.SLIN, slin(10 * n)))
        visitor.send(encode_frame(Kind.SLIN, slin(20 * n)))
    heard = lambda client: [f.payload for f in client.frames if f.kind == Kind.SLIN and f.payload != slin(0)]  # noqa: E731
    await until(lambda: len(heard(visitor)) == 5 and len(heard(resident)) == 5, what="the bridge both ways")
    assert heard(visitor) == [slin(10 * n) for n in range(1, 6)]
    assert heard(resident) == [slin(20 * n) for n in range(1, 6)]
    await until(lambda: len(stream.media()) == 5, what="the visitor's audio at the app")
    assert await metric(server, "audiohangup_stream_ignored_frames_total") == 5


# Failures never hurt the call, unless asked


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("policy", ["continue", "hangup"])
async def test_app_down_at_start(make_server: Any, logs: LogCapture, policy: str) -> None:
    server = await make_server(streams=StreamConfig(url=f"ws://127.0.0.1:{free_port()}/x", failure=policy))
    client = await connect(server.port("visitor"), on_hangup="close")
    call_id = uuid.uuid4()
    client.send_uuid(call_id)
    await until(lambda: [e for e in logs.events if "failed: {reason}" in e.get("log_format", "")], what="the failure")
    [failed] = [e for e in logs.events if "failed: {reason}" in e.get("log_format", "")]
    assert failed["log_level"] is LogLevel.warn and failed["reason"] == "connection refused"
    assert await metric(server, "audiohangup_streams_total", protocol="twilio", outcome="failed") == 1
    if policy == "hangup":
        await client.closed
        [ended] = await until(lambda: logs.ended(str(call_id)), what="the leg's end")
        assert ended["cause"] == HangupCause.STREAM
    else:
        heard = len(client.frames)
        await until(lambda: len(client.frames) > heard + 2, what="the call to go on")
        assert server.registry.get(str(call_id), Role.VISITOR).live


@pytest_twisted.ensureDeferred
async def test_an_oversized_message_ends_the_stream_not_the_call(make_server: Any, app: App, logs: LogCapture) -> None:
    """Over 1 MiB in one message: refused as it arrives, the stream failed with the reason, the leg live."""
    server, call_id, _client, stream = await start(make_server, app, protocol="audiohangup")
    stream.send_binary(bytes(2 * 1024 * 1024))
    await stream.closed  # 1009 from us, or 1006 if the TCP connection went first
    [failed] = await until(
        lambda: [e for e in logs.events if "failed: {reason}" in e.get("log_format", "")], what="the failure"
    )
    assert failed["log_level"] is LogLevel.warn and "exceeds payload limit" in failed["reason"], failed["reason"]
    leg = server.registry.get(str(call_id), Role.VISITOR)
    assert leg.live and not leg.feed  # nothing of it was queued


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("policy", ["continue", "hangup"])
async def test_app_gone_mid_call(make_server: Any, app: App, logs: LogCapture, policy: str) -> None:
    server, call_id, client, stream = await start(make_server, app, failure=policy)
    stream.vanish()
    await until(lambda: not server.service.streams.current, what="the stream to fail")
    assert await metric(server, "audiohangup_streams_total", protocol="twilio", outcome="failed") == 1
    if policy == "hangup":
        await client.closed
        assert client.hangup_frames == 1
    else:
        assert server.registry.get(str(call_id), Role.VISITOR).live


@pytest_twisted.ensureDeferred
async def test_app_that_never_reads_is_bounded(make_server: Any, logs: LogCapture) -> None:
    """What waits for a reader that stopped is bounded, the oldest dropped and counted; the leg goes on."""
    app = await App().listen(receive_buffer=4096)
    try:
        server, call_id, client, stream = await start(
            make_server, app, protocol="audiohangup", max_unsent_ms=200
        )
        stream.stop_reading()
        frame = encode_frame(Kind.SLIN, slin(3))
        for _ in range(40):
            client.send(frame * 50)  # 2000 frames, faster than real time
        await until(
            lambda: server.service.streams.current and next(iter(server.service.streams.current.values())).counts.dropped_to_app > 0,
            timeout=20, what="drops",
        )
        [live] = server.service.streams.current.values()
        wire = live.websocket
        assert wire.media_waiting <= 10  # 200 ms of 20 ms frames
        assert await metric(server, "audiohangup_stream_dropped_frames_total", direction="to_app") > 0
        assert server.registry.get(str(call_id), Role.VISITOR).live
        client.close()
        await until(lambda: not server.service.streams.current, timeout=10, what="the stream to be over")
    finally:
        await app.close()


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("mode", ["converse", "listen"])
async def test_mark_flood_from_an_app_that_never_reads(
    server: Server, logs: LogCapture, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    """
    An app that stops reading and sends marks, a few with names of almost
    1 MiB and thousands at the longest name allowed: the long ones are
    ignored, the answers waiting for it stay under 1 MiB, and past it the
    stream fails (slow_app); the leg goes on, and an unrelated call keeps
    its audio meanwhile.
    """
    bound = 1 << 20  # stream_client.MAX_CONTROL_UNSENT, as documented
    peak = [0]
    original = stream_client._StreamWebSocket.send

    def measured(wire: Any, message: Any, media: bool) -> None:
        original(wire, message, media)
        waiting = sum(len(payload) for payload, _, _ in wire.outbox)
        peak[0] = max(peak[0], waiting)

    monkeypatch.setattr(stream_client._StreamWebSocket, "send", measured)
    app = await App().listen(receive_buffer=4096)
    bystander = await Bystander.start(server.port("visitor"), server.port("resident"), server.registry)
    try:
        call_id = uuid.uuid4()
        attacked = await connect(server.port("visitor"), on_hangup="close")
        attacked.send_uuid(call_id)
        await until(lambda: server.registry.get(str(call_id), Role.VISITOR), what="the leg")
        status, _ = await api(server, "POST", f"/calls/{call_id}/streams", json={"url": app.url(), "mode": mode})
        assert status == 201
        await until(lambda: app.connections and app.connections[0].events("start"), what="the stream")
        stream = app.connections[0]
        stream.stop_reading()
        huge = {"event": "mark", "mark": {"name": "x" * 1_000_000}}
        longest = {"event": "mark", "mark": {"name": "y" * 256}}
        for n in range(6000):
            stream.send_json(huge if n % 500 == 0 else longest)
        failed = await until(
            lambda: [e for e in logs.events if "failed: {reason}" in e.get("log_format", "")], timeout=20,
            what="the stream to fail",
        )
        assert failed[0]["reason"].startswith("slow_app: the app does not read"), failed[0]["reason"]
        assert 0 < peak[0] <= bound
        assert server.registry.get(str(call_id), Role.VISITOR).live
        assert [e for e in logs.events if "a mark name over 256 bytes" in e.get("why", "")]
        kept = await bystander.stop()
        assert kept >= 0.95, kept
    finally:
        bystander.close()
        await app.close()


@pytest_twisted.ensureDeferred
async def test_endless_handshake_answer_is_bounded(make_server: Any, logs: LogCapture) -> None:
    """An 'app' that answers the handshake with megabytes of headers: the stream fails at 64 KiB, the leg goes on."""
    from twisted.internet.endpoints import TCP4ServerEndpoint
    from twisted.internet.protocol import Factory, Protocol

    class Endless(Protocol):
        def dataReceived(self, data: bytes) -> None:
            self.transport.write(b"HTTP/1.1 101 Switching Protocols\r\n" + b"X-Pad: " + b"a" * 100 + b"\r\n")
            for _ in range(64):
                self.transport.write((b"X-Pad: " + b"a" * 1000 + b"\r\n") * 64)  # 4 MiB, no blank line

    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Factory.forProtocol(Endless))
    try:
        server = await make_server(
            streams=StreamConfig(url=f"ws://127.0.0.1:{port.getHost().port}/x", connect_timeout=60.0)
        )
        call_id = uuid.uuid4()
        client = await connect(server.port("visitor"), on_hangup="close")
        client.send_uuid(call_id)
        [failed] = await until(
            lambda: [e for e in logs.events if "failed: {reason}" in e.get("log_format", "")], timeout=20,
            what="the failure",
        )
        assert "handshake is over 65536 bytes" in failed["reason"], failed["reason"]
        assert server.registry.get(str(call_id), Role.VISITOR).live
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_the_stream_socket_is_not_nagled(make_server: Any, app: App) -> None:
    """
    TCP_NODELAY on the stream's connection: with Nagle, a write waits for the
    app's delayed ACK, and every frame from the app was about 40 ms late.
    """
    server, call_id, _client, _stream = await start(make_server, app)
    [leg] = server.registry.call(str(call_id))
    [stream] = [tap for tap in leg.taps if isinstance(tap, MediaStream)]
    sock = stream.websocket.protocol.transport.getHandle()
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


@pytest.mark.skipif(not relay_module.available(), reason="the relay needs epoll and the fast paths on")
@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("end", ["app_closes", "app_vanishes", "leg_ends"])
async def test_the_relay_reads_a_stream_until_it_ends(make_server: Any, app: App, logs: LogCapture, end: str) -> None:
    """A stream's socket is read with the legs' (one wakeup for all), and leaves the relay however it ends."""
    server, call_id, client, connection = await start(make_server, app, protocol="audiohangup")
    relay = server.service.relay
    [leg] = server.registry.call(str(call_id))
    [stream] = [tap for tap in leg.taps if isinstance(tap, MediaStream)]
    protocol = stream.websocket.protocol
    assert protocol in relay._fds
    connection.send_binary(slin(7))
    await until(lambda: slin(7) in [f.payload for f in client.frames], what="the app's audio at the leg")
    if end == "app_closes":
        connection.close()
    elif end == "app_vanishes":
        connection.vanish()
    else:
        client.reset()
    await until(lambda: not server.service.streams.current, what="the stream's end")
    assert protocol not in relay._fds
    assert str(stream.outcome) == {"app_closes": "app_closed", "app_vanishes": "failed", "leg_ends": "ended"}[end]
    assert [e for e in logs.events if e.get("log_failure") or e["log_level"] >= LogLevel.error] == []


@pytest_twisted.ensureDeferred
async def test_wss_is_verified(make_server: Any, tmp_path: Path, logs: LogCapture) -> None:
    certificate = self_signed(tmp_path)
    app = await App().listen(tls=certificate)
    try:
        server = await make_server(streams=StreamConfig(url=app.url()))
        client = await connect(server.port("visitor"), on_hangup="close")
        client.send_uuid(uuid.uuid4())
        await until(lambda: [e for e in logs.events if "failed: {reason}" in e.get("log_format", "")], what="the failure")
        [failed] = [e for e in logs.events if "failed: {reason}" in e.get("log_format", "")]
        assert "certificate verify failed" in failed["reason"]
        assert app.connections == [] or not app.connections[0].opened.called
        trusting = await make_server(streams=StreamConfig(url=app.url(), ca=str(certificate.cert)))
        client = await connect(trusting.port("visitor"), on_hangup="close")
        client.send_uuid(uuid.uuid4())
        await until(lambda: [c for c in app.connections if c.events("start")], what="a verified stream")
    finally:
        await app.close()


@pytest_twisted.ensureDeferred
async def test_the_app_can_tell_it_is_us(make_server: Any, app: App, logs: LogCapture) -> None:
    _server, call_id, _client, stream = await start(
        make_server, app, secret="stream-key", headers=(("Authorization", "Bearer app-token"),)
    )
    assert stream.headers["authorization"] == "Bearer app-token"
    url = app.url(f"/s/{call_id}/visitor")
    assert verify("stream-key", url.encode(), stream.headers["x-audiohangup-signature"])
    assert int(stream.headers["x-audiohangup-timestamp"]) == int(stream.headers["x-audiohangup-signature"][2:12])
    assert "app-token" not in "".join(logs.texts())


# The API


async def api(server: Server, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
    response = await treq.request(method, f"{server.url}{path}", persistent=False, timeout=10, **kwargs)
    return response.code, await response.json()


@pytest_twisted.ensureDeferred
async def test_streams_through_the_api(make_server: Any, app: App, logs: LogCapture) -> None:
    server = await make_server()
    call_id, _visitor, _resident = await bridged(server)
    status, body = await api(server, "POST", f"/calls/{call_id}/streams", json={
        "url": app.url("/{role}?k=v"), "protocol": "audiohangup", "mode": "listen", "parameters": {"site": "gate"},
        "headers": {"X-App-Token": "t0k"},
    })
    assert status == 201, body
    assert [(s["role"], s["protocol"], s["mode"], s["url"]) for s in body["streams"]] == [
        ("visitor", "audiohangup", "listen", app.url("/visitor")),
        ("resident", "audiohangup", "listen", app.url("/resident")),
    ]
    await until(lambda: len(app.connections) == 2 and all(c.events("start") for c in app.connections), what="both")
    assert sorted(c.path for c in app.connections) == ["/resident?k=v", "/visitor?k=v"]
    assert all(c.headers["x-app-token"] == "t0k" for c in app.connections)
    assert all(c.events("start")[0].json["parameters"] == {"site": "gate"} for c in app.connections)
    status, call = await api(server, "GET", f"/calls/{call_id}")
    streams = {leg["role"]: leg["streams"] for leg in call["legs"]}
    assert [s["state"] for s in streams["visitor"]] == ["streaming"]
    visitor_stream = body["streams"][0]["stream_id"]
    status, deleted = await api(server, "DELETE", f"/calls/{call_id}/streams/{visitor_stream}")
    assert status == 200 and deleted["stream"]["stream_id"] == visitor_stream
    [visitor_app] = [c for c in app.connections if c.path.startswith("/visitor")]
    assert await visitor_app.closed == (True, 1000)
    assert visitor_app.events()[-1].json == {"event": "stop", "reason": "deleted through the API"}
    assert server.registry.get(str(call_id), Role.VISITOR).live  # the leg stays
    assert (await api(server, "DELETE", f"/calls/{call_id}/streams/{visitor_stream}"))[0] == 404
    # One converse stream per leg: a second is a conflict.
    conversing = {"url": app.url(), "role": "resident"}
    assert (await api(server, "POST", f"/calls/{call_id}/streams", json=conversing))[0] == 201
    status, conflict = await api(server, "POST", f"/calls/{call_id}/streams", json=conversing)
    assert (status, conflict["error"]["code"]) == (409, "already_conversing")


@pytest_twisted.ensureDeferred
async def test_stream_route_errors(server: Server, app: App, logs: LogCapture) -> None:
    call_id = uuid.uuid4()
    client = await connect(server.port("visitor"), on_hangup="close")
    client.send_uuid(call_id)
    await until(lambda: len(server.registry) == 1, what="the leg")
    path = f"/calls/{call_id}/streams"
    for body, code in [
        ({"url": "http://app/"}, "bad_url"),
        ({"url": "ws:///nohost"}, "bad_url"),
        ({}, "bad_url"),
        ({"url": app.url(), "protocol": "sip"}, "bad_protocol"),
        ({"url": app.url(), "mode": "shout"}, "bad_mode"),
        ({"url": app.url(), "parameters": {"a": 1}}, "bad_parameters"),
        ({"url": app.url(), "headers": {"Host": "evil"}}, "bad_headers"),
        ({"url": app.url(), "headers": {"x-audiohangup-signature": "t=1,sha256=00"}}, "bad_headers"),
        ({"url": app.url(), "headers": {"X-A\n": "x"}}, "bad_headers"),
        ({"url": app.url("/a b")}, "bad_url"),
        ({"url": app.url(), "role": "caller"}, "bad_role"),
        ({"url": app.url(), "extra": 1}, "unknown_field"),
    ]:
        status, answer = await api(server, "POST", path, json=body)
        assert (status, answer["error"]["code"]) == (400, code), body
    status, answer = await api(server, "POST", f"/calls/{uuid.uuid4()}/streams", json={"url": app.url()})
    assert (status, answer["error"]["code"]) == (404, "unknown_call")
    status, answer = await api(server, "POST", path, json={"url": app.url(), "role": "resident"})
    assert (status, answer["error"]["code"]) == (404, "no_live_leg")
    status, answer = await api(server, "POST", path, data=json.dumps({"url": "ws://x/" + "a" * 70000}).encode(),
                               headers={"Content-Type": "application/json"})
    assert (status, answer["error"]["code"]) == (413, "body_too_large")
    status, answer = await api(server, "DELETE", f"/calls/{call_id}/streams/MZnothing")
    assert (status, answer["error"]["code"]) == (404, "unknown_stream")
    assert app.connections == []


@pytest_twisted.ensureDeferred
async def test_streams_in_records_and_webhooks(make_server: Any, app: App, tmp_path: Path, logs: LogCapture) -> None:
    """The leg's record lists its streams; webhooks tell stream.started, stream.ended and stream.failed."""
    from tests.test_webhooks import Receiver

    receiver = await Receiver().start()
    try:
        server = await make_server(
            webhooks=(receiver.url,), streams=StreamConfig(url=app.url("/ok"), protocol="audiohangup"),
        )
        call_id = uuid.uuid4()
        client = await connect(server.port("visitor"), on_hangup="close")
        client.send_uuid(call_id)
        await until(lambda: app.connections and app.connections[0].events("start"), what="the stream")
        failing = f"ws://127.0.0.1:{free_port()}/down"
        status, _ = await api(server, "POST", f"/calls/{call_id}/streams", json={"url": failing, "mode": "listen"})
        assert status == 201
        await until(lambda: any(r.json["event"] == "stream.failed" for r in receiver.requests), what="stream.failed")
        client.close()
        await until(lambda: any(r.json["event"] == "stream.ended" for r in receiver.requests), what="stream.ended")
        events = {r.json["event"]: r.json for r in receiver.requests}
        assert events["stream.started"]["stream"]["url"] == app.url("/ok")
        assert events["stream.failed"]["reason"] == "connection refused"
        assert events["stream.ended"]["stream"]["outcome"] == "ended"
        assert events["stream.ended"]["call_id"] == str(call_id) and events["stream.ended"]["role"] == "visitor"
        await until(lambda: len(server.registry) == 0, what="the leg to end")
        [record] = (await server.service.records.query(call_id=str(call_id)))["records"]
        assert [(s["url"], s["protocol"], s["mode"], s["outcome"]) for s in record["streams"]] == [
            (app.url("/ok"), "audiohangup", "converse", "ended"),
            (failing, "audiohangup", "listen", "failed"),  # the command line's protocol, the request's mode
        ]
    finally:
        await receiver.close()

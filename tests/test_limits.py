"""
Resource bounds: --max-legs, slow consumers, HTTP bodies and content types,
and running out of file descriptors (EMFILE) in a real twistd process.
"""

from __future__ import annotations

import os
import resource
import socket
import uuid
from collections import Counter
from typing import Any

import pytest
import pytest_twisted
import treq
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import deferLater
from twisted.logger import LogLevel, formatEvent
from twisted.python.failure import Failure
from twisted.web.iweb import UNKNOWN_LENGTH

from audiohangup.reasons import CloseReason, Role
from audiohangup.wire import Kind, encode_frame, encode_uuid
from tests.bystander import Bystander
from tests.conftest import LogCapture, Server, until
from tests.fake_asterisk import FakeAsterisk, connect
from tests.twistd_child import start_server, wait_for_legs


async def metric(server: Server, name: str, **labels: str) -> float:
    response = await treq.get(f"{server.url}/metrics", persistent=False)
    for family in text_string_to_metric_families(await response.text()):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return 0.0


@pytest_twisted.ensureDeferred
async def test_over_capacity(make_server: Any, logs: LogCapture) -> None:
    """Past --max-legs a new connection is closed at once, logged at warn and counted."""
    server = await make_server(max_legs=2)
    held = []
    for _ in range(2):
        client = await connect(server.port("visitor"))
        client.send_uuid(uuid.uuid4())
        held.append(client)
    await until(lambda: len(server.registry) == 2)
    refused = await connect(server.port("resident"))
    assert isinstance(await refused.closed, ConnectionDone)
    assert refused.frames == []
    [event] = [e for e in logs.ended() if e["reason"] is CloseReason.OVER_CAPACITY]
    assert event["log_level"] is LogLevel.warn
    assert "--max-legs 2" in event["detail"]
    assert await metric(server, "audiohangup_connections_without_leg_total", reason="over_capacity") == 1
    assert len(server.registry) == 2

    held[0].close()
    await until(lambda: len(server.registry) == 1)
    again = await connect(server.port("resident"))
    again.send_uuid(uuid.uuid4())
    await until(lambda: len(server.registry) == 2, what="a connection accepted again")
    for client in (held[1], again):
        client.close()
    await until(lambda: not server.registry.connections())


class Pending(Protocol):
    """A connection that never sends its UUID; the attack opens another each time one ends."""

    def __init__(self, attack: PendingFlood) -> None:
        self.attack = attack

    def connectionMade(self) -> None:
        self.attack.open.add(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.attack.open.discard(self)
        self.attack.ended += 1
        self.attack.later()


class PendingFlood:
    """
    One client, from 127.0.0.2, keeping C{width} connections without a UUID
    open to both AudioSocket ports, and reopening each one that ends.
    """

    def __init__(self, ports: list[int], width: int) -> None:
        self.ports = ports
        self.open: set[Pending] = set()
        self.attempts: list[Deferred[Any]] = []
        self.ended = 0
        self.running = True
        for _ in range(width):
            self.later()

    def later(self) -> None:
        if self.running:
            self.attempts.append(deferLater(reactor, 0.05, self._connect))

    def _connect(self) -> None:
        if not self.running:
            return
        port = self.ports[len(self.attempts) % len(self.ports)]
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, bindAddress=("127.0.0.2", 0))
        attempt = connectProtocol(endpoint, Pending(self))
        attempt.addErrback(lambda failure: self.later())  # refused or reset at once: again
        self.attempts.append(attempt)

    async def stop(self) -> None:
        self.running = False
        for attempt in self.attempts:
            attempt.addErrback(lambda failure: None)
        await gatherResults(self.attempts)
        for connection in list(self.open):
            connection.transport.abortConnection()


@pytest.mark.parametrize("per_source", [8, 0])
@pytest_twisted.ensureDeferred
async def test_connections_without_uuid_keep_no_real_leg_out(
    make_server: Any, logs: LogCapture, per_source: int
) -> None:
    """
    One client holding more connections without a UUID than --max-legs: past
    --max-pending-per-source (or, without that cap, at --max-legs) its oldest
    make way for each newcomer, so every real leg from another address is
    accepted, none refused as over_capacity, and a bystander call keeps its
    audio. The crowding is logged once, and counted.
    """
    server = await make_server(max_legs=20, max_pending_per_source=per_source)
    bystander = await Bystander.start(server.port("visitor"), server.port("resident"), server.registry)
    flood = PendingFlood([server.port("visitor"), server.port("resident")], width=40)
    await until(lambda: flood.ended > 40, timeout=30, what="the flood to be crowding")
    served = 0
    for _ in range(10):
        client = await connect(server.port("resident"), on_hangup="close")
        client.send_uuid(uuid.uuid4())
        await until(lambda c=client: c.frames or c.closed.called, what="a frame or a close")
        served += bool(client.frames)
        if not client.closed.called:
            client.close()
        await client.closed
    kept = await bystander.stop()
    await flood.stop()
    bystander.close()
    await until(lambda: not server.registry.connections(), what="every connection to go")
    ours = [e for e in logs.ended() if e["peer"].startswith("127.0.0.1:")]
    assert served == 10, "\n".join(formatEvent(e) for e in ours)
    assert [e for e in logs.ended() if e["reason"] is CloseReason.OVER_CAPACITY] == []
    assert kept >= 0.95
    crowded = [e for e in logs.ended() if e["reason"] is CloseReason.TOO_MANY_PENDING]
    assert crowded and {e["log_level"] for e in crowded} == {LogLevel.debug}
    assert {e["peer"].split(":")[0] for e in crowded} == {"127.0.0.2"}
    # Once a minute per source (and for --max-legs, which the flood's first burst may reach).
    warnings = [
        formatEvent(e) for e in logs.events if "the oldest connection without a UUID" in e.get("log_format", "")
    ]
    keys = Counter(key for text in warnings for key in ("--max-pending-per-source 8", "--max-legs 20") if key in text)
    assert len(warnings) == sum(keys.values()) and max(keys.values()) == 1, warnings
    assert ("--max-pending-per-source 8" if per_source else "--max-legs 20") in keys
    counted = await metric(server, "audiohangup_connections_without_leg_total", reason="too_many_pending")
    assert counted == len(crowded)


@pytest_twisted.ensureDeferred
async def test_a_burst_of_real_legs_after_a_stall_is_not_crowded_out(make_server: Any, logs: LogCapture) -> None:
    """
    Twenty legs from one address connect and send their UUID while the
    reactor is busy (this test holds it: loopback connects complete in the
    kernel's backlog). The reactor then accepts them in one batch before it
    reads any, so each looks pending when the next arrives; with their UUIDs
    waiting they are no flood, and none is closed for being over
    --max-pending-per-source.
    """
    server = await make_server(max_pending_per_source=4)
    sockets = []
    try:
        for _ in range(20):
            client = socket.create_connection(("127.0.0.1", server.port("visitor")))
            client.sendall(encode_uuid(uuid.uuid4()))
            sockets.append(client)
        await until(lambda: len(server.registry) == 20, what="twenty legs")
        assert [e for e in logs.ended() if e["reason"] is CloseReason.TOO_MANY_PENDING] == []
    finally:
        for client in sockets:
            client.close()
    await until(lambda: not server.registry.connections(), what="every connection to go")


@pytest_twisted.ensureDeferred
async def test_dtmf_flood_is_counted_not_logged(make_server: Any, logs: LogCapture) -> None:
    """
    A leg sending DTMF frames as fast as it can writes a bounded log (a few
    lines per second of flood, not one per frame), and the metric counts
    every digit. A bystander call meanwhile keeps its audio.
    """
    from audiohangup.protocol import DTMF_LOG_PER_SECOND

    server = await make_server()
    bystander = await Bystander.start(server.port("visitor"), server.port("resident"), server.registry)
    flood = 50_000
    call_id = uuid.uuid4()
    client = await connect(server.port("visitor"), on_hangup="close")
    client.send_uuid(call_id)
    leg = await until(lambda: server.registry.get(str(call_id), Role.VISITOR), what="the flooding leg")
    started = reactor.seconds()
    for _ in range(flood // 1000):
        client.send(encode_frame(Kind.DTMF, b"7") * 1000)
    await until(lambda: leg.dtmf_count == flood, timeout=30, what="every digit read")
    seconds = reactor.seconds() - started
    assert await metric(server, "audiohangup_dtmf_total") == flood
    lines = [e for e in logs.events if "DTMF" in e.get("log_format", "") and e.get("call_id") == str(call_id)]
    # Each second of flood (and the one it began in) at most its info lines and one warning.
    assert 0 < len(lines) <= (DTMF_LOG_PER_SECOND + 1) * (int(seconds) + 2), (len(lines), seconds)
    assert await bystander.stop() >= 0.95
    bystander.close()
    client.close()
    await until(lambda: not server.registry.connections(), what="every connection to go")


class NotReading(FakeAsterisk):
    """A peer that stops reading at once, with a small receive buffer, as a stuck Asterisk would."""

    def connectionMade(self) -> None:
        self.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        super().connectionMade()
        self.transport.pauseProducing()


@pytest_twisted.ensureDeferred
async def test_slow_consumer_is_aborted(make_server: Any, logs: LogCapture) -> None:
    """
    A peer that stops reading is aborted as slow_consumer once the unsent
    audio passes the bound; what the server buffers never exceeds it.
    """
    server = await make_server(max_unsent_ms=200)
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

    client = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", server.port("visitor")), NotReading())
    call_id = uuid.uuid4()
    client.send_uuid(call_id)
    leg = await until(lambda: server.registry.get(str(call_id), Role.VISITOR))
    bound = leg.settings.max_unsent_bytes
    peak = 0

    def buffered() -> bool:
        nonlocal peak
        transport = leg.transport
        if transport is not None and hasattr(transport, "dataBuffer"):
            peak = max(peak, len(transport.dataBuffer) + transport._tempDataLen)
        return leg.close_reason is not None

    await until(buffered, timeout=30, what="the slow consumer to be aborted")
    assert leg.close_reason is CloseReason.SLOW_CONSUMER
    assert peak <= bound + len(leg.format.silence_frame)
    [event] = logs.ended(str(call_id))
    assert event["log_level"] is LogLevel.warn and "200 ms" in event["detail"]
    assert len(server.registry) == 0
    client.transport.resumeProducing()
    await client.closed


@pytest_twisted.ensureDeferred
async def test_frames_behind_a_buffer_keep_their_order(make_server: Any) -> None:
    """
    A peer that reads late, not too late: the bridged frames its socket did
    not take wait in Twisted's buffer, and every frame after them waits
    behind them until the buffer has drained (none is sent to the socket
    ahead of them). Every bridged frame reaches it once, in order.
    """
    server = await make_server()
    call_id = uuid.uuid4()
    visitor = await connect(server.port("visitor"), on_hangup="close")
    resident = await connect(server.port("resident"), on_hangup="close", read=False)
    visitor.send_uuid(call_id)
    resident.send_uuid(call_id)
    leg = await until(lambda: server.registry.get(str(call_id), Role.RESIDENT))
    source = await until(lambda: server.registry.get(str(call_id), Role.VISITOR))
    sent: list[bytes] = []

    def send_marked(count: int) -> int:
        for _ in range(count):
            number = len(sent) + 1
            frame = encode_frame(Kind.SLIN, number.to_bytes(4, "big") * 80)
            sent.append(frame)
            visitor.send(frame)
        return len(sent)

    def buffered() -> int:
        return len(leg.transport.dataBuffer) + leg.transport._tempDataLen

    async def all_read() -> None:
        count = len(sent)  # the visitor's UUID frame counts too: more than count
        await until(lambda: source.frames_in > count, what="the visitor's frames read by the server")

    # Frames until the kernel's buffers are full and Twisted's holds some
    # (far below the slow-consumer bound: 10 frames at a time).
    while not buffered():
        send_marked(10)
        await all_read()
        assert len(sent) < 5000, "the resident's socket never filled"
    assert leg.close_reason is None
    send_marked(10)  # these queue behind the buffer
    await all_read()
    resident.transport.resumeProducing()
    send_marked(20)  # and these while it drains
    await until(lambda: sum(frame.encode() in sent[-1:] for frame in resident.frames) == 1, what="the last frame")
    marked = [frame.encode() for frame in resident.frames if any(frame.payload)]
    assert marked == sent


@pytest_twisted.ensureDeferred
async def test_http_bodies_and_types(make_server: Any, logs: LogCapture) -> None:
    server = await make_server(max_queue_ms=100)
    call = uuid.uuid4()
    big = b"x" * (200 * 1024)
    lingers: set[Any] = set()

    def note_lingers() -> None:
        from twisted.internet import reactor

        lingers.update(c for c in reactor.getDelayedCalls() if getattr(c.func, "__name__", "") == "abortConnection")

    response = await treq.post(f"{server.url}/calls/{call}/hangup", data=big, persistent=False)
    note_lingers()
    assert response.code == 413
    assert (await response.json())["error"]["code"] == "body_too_large"

    def chunks():  # no Content-Length: the limit holds as the chunks arrive
        import io

        from twisted.web.client import FileBodyProducer

        producer = FileBodyProducer(io.BytesIO(big))
        producer.length = UNKNOWN_LENGTH  # sent chunked
        return producer

    response = await treq.post(f"{server.url}/api/hangup", data=chunks(), persistent=False)
    note_lingers()
    assert response.code == 413

    response = await treq.post(
        f"{server.url}/api/hangup", data=b"call_id=x", persistent=False,
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    body = await response.json()
    assert (response.code, body["error"]["code"]) == (400, "bad_content_type")
    assert "application/json" in body["error"]["message"]
    response = await treq.post(f"{server.url}/api/hangup", json={"call_id": str(call), "x": 1}, persistent=False)
    assert (response.code, (await response.json())["error"]["code"]) == (400, "unknown_field")
    assert await metric(server, "audiohangup_http_requests_total", route="unrouted", method="-", status="413") == 2
    # Each refused body's linger ends with its connection: cancelled, not left to fire.
    await until(lambda: all(call.cancelled or call.called for call in lingers), what="the lingers to end")
    assert len(lingers) == 2 and all(call.cancelled for call in lingers)


@pytest_twisted.ensureDeferred
async def test_max_legs_fit_the_descriptor_limit(spawn: Any) -> None:
    """
    Under a hard open files limit of 400, --max-legs (2000) is lowered at
    start-up to what fits, with a warning: 420 connections without a UUID
    from 14 addresses (each under --max-pending-per-source) then crowd each
    other out at --max-legs instead of exhausting the descriptors, and a real
    leg is still served and /health answers.
    """
    # A long --uuid-timeout: however slowly a busy machine lets the flood in, it is all held at once.
    child, ports = await start_server(
        spawn, "--call-records", "none", "--http-max-connections", "64", "--uuid-timeout", "60",
        prefix=("prlimit", "--nofile=400:400"),
    )
    assert "--max-legs is lowered to 272" in child.log, child.describe()
    flood = []
    try:
        for source in range(2, 16):
            for _ in range(30):
                client = socket.socket()
                client.bind((f"127.0.0.{source}", 0))
                client.connect(("127.0.0.1", ports["audiosocket-visitor"]))
                flood.append(client)
        leg = await connect(ports["audiosocket-resident"], on_hangup="close")
        leg.send_uuid(uuid.uuid4())
        await until(lambda: leg.frames or leg.closed.called, what="a frame or a close")
        assert leg.frames, child.describe()
        await wait_for_legs(f"http://127.0.0.1:{ports['http']}", 1)
        assert "EMFILE" not in child.log, child.describe()
        assert "too_many_pending" in child.log or "--max-legs 272" in child.log, child.describe()
        leg.close()
    finally:
        for client in flood:
            client.close()
    child.signal("TERM")
    await child.exit()
    assert "Traceback" not in child.output, child.describe()


@pytest_twisted.ensureDeferred
async def test_out_of_file_descriptors(spawn: Any, logs: LogCapture) -> None:
    """
    EMFILE: the server logs it, keeps its live legs going, refuses what it
    cannot accept, and accepts again once descriptors are free.
    """
    child, ports = await start_server(spawn, "--call-records", "none")
    base = f"http://127.0.0.1:{ports['http']}"
    pid = child.transport.pid
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (fds + 2, hard))

    live: list[FakeAsterisk] = []
    refused = None
    for _ in range(10):
        client = await connect(ports["audiosocket-visitor"])
        client.send_uuid(uuid.uuid4())
        await until(lambda c=client: c.frames or c.closed.called, what="a frame or a close")
        if not client.frames:
            refused = client  # accepted into the reserved descriptor, then closed
            break
        live.append(client)
    assert live and refused is not None, (len(live), child.describe())
    await until(lambda: "EMFILE recovery: Closed socket" in child.log, what="the EMFILE log line")

    # The live legs are still served: their silence keeps coming.
    counts = [len(client.frames) for client in live]
    await until(lambda: all(len(c.frames) > n + 5 for c, n in zip(live, counts)), what="frames on live legs")

    live[0].close()
    await until(lambda: len(os.listdir(f"/proc/{pid}/fd")) < fds + 2, what="a descriptor freed")
    again = await connect(ports["audiosocket-visitor"])
    again.send_uuid(uuid.uuid4())
    await until(lambda: len(again.frames) > 0, what="a new leg served after EMFILE")
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
    await wait_for_legs(base, len(live))
    child.signal("TERM")
    await child.exit()
    assert "Traceback" not in child.output, child.describe()
    assert "Unhandled" not in child.output, child.describe()

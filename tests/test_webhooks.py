"""
Webhooks over real loopback HTTP: a receiving C{twisted.web} server records
each request and answers with a scripted status after a scripted delay (or
never). Events must arrive signed, in order per call id, retried and then
delivered or dropped as specified, while calls keep working; and the C{logs}
fixture fails a test on any traceback or unhandled error.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from types import SimpleNamespace
from typing import Any

import pytest
import pytest_twisted
from prometheus_client import CollectorRegistry
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import SSL4ServerEndpoint, TCP4ServerEndpoint
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import deferLater
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel
from twisted.protocols.policies import WrappingFactory
from twisted.python.failure import Failure
from twisted.web._newclient import HTTPClientParser
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from audiohangup.audio import LegSettings
from audiohangup.httpclient import MAX_HEAD_BYTES
from audiohangup.pacer import Pacer
from audiohangup.protocol import AudioSocketProtocol
from audiohangup.reasons import CloseReason, HangupCause, Role
from audiohangup.registry import Registry
from audiohangup.webhooks import Webhooks, sign, trust_root, verify
from audiohangup.wire import HANGUP_FRAME, encode_uuid
from tests.bystander import Bystander
from tests.conftest import LogCapture, until
from tests.fake_asterisk import connect
from tests.tls import SelfSigned, self_signed

SECRET = "s3cret-for-tests"

#: Small figures, so the tests are quick.
FAST = dict(timeout=0.5, backoff=0.05, max_backoff=1.0)


# The receiving end


@dataclass
class Received:
    """One request as the receiver saw it."""

    body: bytes
    headers: dict[str, str]
    at: float
    attempt: int  # 1 for the first request with this event id, 2 for its first retry, ...
    status: int | None = None  # what the receiver answered (None: never, or not yet)

    @property
    def json(self) -> dict[str, Any]:
        return json.loads(self.body)

    @property
    def event(self) -> str:
        return self.json["event"]

    @property
    def call_id(self) -> str:
        return self.json["call_id"]


#: (request, attempt) -> (status, delay in seconds, or None to never answer)
Script = Callable[[Received], "tuple[int, float | None]"]


class Receiver(Resource):
    """A webhook receiver that records every POST and answers as scripted."""

    isLeaf = True

    def __init__(self, script: Script | None = None) -> None:
        super().__init__()
        self.script: Script = script or (lambda received: (200, 0.0))
        self.requests: list[Received] = []
        self.timers: list[Any] = []
        self.port: Any = None
        self.wrapper: WrappingFactory | None = None
        self.tls = False

    @property
    def url(self) -> str:
        if self.tls:
            return f"https://localhost:{self.port.getHost().port}/hook?token=abc"
        return f"http://127.0.0.1:{self.port.getHost().port}/hook?token=abc"

    def answered(self, status: int = 200) -> list[Received]:
        return [r for r in self.requests if r.status == status]

    def render_POST(self, request: Any) -> Any:
        body = request.content.read()
        headers = {
            name.decode("latin-1").lower(): values[-1].decode("latin-1")
            for name, values in request.requestHeaders.getAllRawHeaders()
        }
        event_id = headers.get("x-audiohangup-event-id")
        attempt = 1 + sum(1 for r in self.requests if r.headers.get("x-audiohangup-event-id") == event_id)
        received = Received(body, headers, reactor.seconds(), attempt)
        self.requests.append(received)
        status, delay = self.script(received)
        gone: list[Failure] = []
        request.notifyFinish().addErrback(gone.append)  # the client may give up first

        def answer() -> None:
            if gone:
                return
            received.status = status
            request.setResponseCode(status)
            request.setHeader(b"content-type", b"text/plain")
            request.write(b"ok" if status < 300 else b"no")
            request.finish()

        if delay is None:
            return NOT_DONE_YET  # never answers
        if delay == 0:
            answer()
        else:
            self.timers.append(reactor.callLater(delay, answer))
        return NOT_DONE_YET

    async def start(self, tls: SelfSigned | None = None, port: int = 0) -> Receiver:
        site = Site(self)
        site.displayTracebacks = False
        self.wrapper = WrappingFactory(site)
        if tls is None:
            endpoint: Any = TCP4ServerEndpoint(reactor, port, interface="127.0.0.1")
        else:
            self.tls = True
            endpoint = SSL4ServerEndpoint(reactor, 0, tls.server_options(), interface="127.0.0.1")
        self.port = await endpoint.listen(self.wrapper)
        return self

    @property
    def connections(self) -> int:
        return len(self.wrapper.protocols) if self.wrapper is not None else 0

    async def close(self) -> None:
        for timer in self.timers:
            if timer.active():
                timer.cancel()
        if self.wrapper is not None:
            for connection in list(self.wrapper.protocols):
                connection.transport.abortConnection()
        if self.port is not None:
            await self.port.stopListening()
        await until(lambda: self.connections == 0, what="the receiver's connections to close")


@dataclass
class Harness:
    """Receivers and webhooks made by a test, all closed and stopped after it."""

    receivers: list[Receiver] = field(default_factory=list)
    webhooks: list[Webhooks] = field(default_factory=list)
    #: Paces the test's real legs; stopped after the test, so no tick outlives it.
    pacer: Pacer = field(default_factory=lambda: Pacer(reactor))

    async def receiver(self, script: Script | None = None, tls: SelfSigned | None = None, port: int = 0) -> Receiver:
        receiver = Receiver(script)
        self.receivers.append(receiver)
        return await receiver.start(tls, port)

    def hooks(self, urls: list[str], **options: Any) -> Webhooks:
        webhooks = Webhooks(urls, reactor, **options)
        self.webhooks.append(webhooks)
        return webhooks


@pytest_twisted.async_yield_fixture
async def harness() -> AsyncIterator[Harness]:
    made = Harness()
    try:
        yield made
    finally:
        made.pacer.stopService()
        for webhooks in made.webhooks:
            await webhooks.stop()
        for receiver in made.receivers:
            await receiver.close()


# Helpers


def new_metrics() -> CollectorRegistry:
    return CollectorRegistry()


def count(metrics: CollectorRegistry, outcome: str) -> float:
    value = metrics.get_sample_value("audiohangup_webhook_deliveries_total", {"outcome": outcome})
    return value or 0.0


def stand_in(call_id: str, role: Role = Role.VISITOR, reason: CloseReason | None = None,
             cause: HangupCause | None = None) -> Any:
    """What the observer reads of a leg, without a connection."""
    return SimpleNamespace(call_id=call_id, role=role, close_reason=reason, hangup_cause=cause)


def whole_call(webhooks: Webhooks, call_id: str) -> None:
    """leg_started, leg_ended and call_ended for one visitor leg."""
    leg = stand_in(call_id, reason=CloseReason.PEER_CLOSED)
    webhooks.legStarted(leg)
    webhooks.legEnded(leg)
    webhooks.callEnded(call_id)


def real_leg(
    harness: Harness, registry: Registry, role: Role, call_id: uuid.UUID
) -> tuple[AudioSocketProtocol, StringTransport]:
    """A live leg on a fake transport, on the real reactor: the pacer writes silence to it."""
    leg = AudioSocketProtocol(role, registry, LegSettings(close_timeout=2.0), reactor, harness.pacer)
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
    leg.makeConnection(transport)
    leg.dataReceived(encode_uuid(call_id))
    return leg, transport


def free_port() -> int:
    """A loopback port with nothing listening on it."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def sleep(seconds: float) -> None:
    await deferLater(reactor, seconds)


def warnings(logs: LogCapture, text: str) -> list[dict[str, Any]]:
    return [
        event for event in logs.events
        if event.get("log_level") is LogLevel.warn and text in event.get("log_format", "")
    ]


ISO_MS_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00$")


# Tests


def test_sign_and_verify(logs: LogCapture) -> None:
    """The signature covers the timestamp and the body, and is only good near its time."""
    body = b'{"event":"call_ended"}'
    now = 1_800_000_000
    header = sign(SECRET, body, now)
    expected = hmac.new(SECRET.encode(), b"1800000000." + body, hashlib.sha256).hexdigest()
    assert header == f"t=1800000000,sha256={expected}"
    assert verify(SECRET, body, header, now=now)
    assert verify(SECRET, body, header.encode(), now=now + 299)
    assert verify(SECRET, body, f" sha256={expected} , t={now} ", now=now)  # order and spaces do not matter
    assert not verify("other", body, header, now=now)
    assert not verify(SECRET, body + b" ", header, now=now)
    assert not verify(SECRET, body, header.replace("t=1800000000", "t=1800000600"), now=now + 600)  # re-dated
    assert not verify(SECRET, body, None, now=now)
    assert not verify(SECRET, body, f"sha256={expected}", now=now)  # no timestamp: the old format
    assert not verify(SECRET, body, "t=1800000000,sha256=nothex\u00e9", now=now)
    assert not verify(SECRET, body, "t=soon,sha256=00", now=now)


def test_a_replayed_request_fails_verify(logs: LogCapture) -> None:
    """A captured request replayed 10 minutes later fails; a fresh one passes; the tolerance is the receiver's."""
    body = b'{"event":"leg_started"}'
    captured = sign(SECRET, body, 1_800_000_000)
    assert verify(SECRET, body, captured, now=1_800_000_000 + 1)
    assert not verify(SECRET, body, captured, now=1_800_000_000 + 600)
    assert not verify(SECRET, body, captured, now=1_800_000_000 - 600)  # from the future, too
    assert verify(SECRET, body, captured, now=1_800_000_000 + 600, tolerance=900)
    fresh = sign(SECRET, body, int(time.time()))
    assert verify(SECRET, body, fresh)


def test_bad_urls_are_refused(logs: LogCapture) -> None:
    for url in ("ftp://example.com/", "not a url", "http://user:pw@example.com/hook", "/relative"):
        with pytest.raises(ValueError):
            Webhooks([url], reactor)
    with pytest.raises(ValueError):
        Webhooks(["http://127.0.0.1/"], reactor, secret="")


@pytest_twisted.ensureDeferred
async def test_events_arrive_signed_in_order(harness: Harness, logs: LogCapture) -> None:
    """
    A real call of two legs: both start, the visitor's peer closes, the session
    hangs up the resident, which resets. Five events arrive in that order, each
    signed, with exactly the specified fields and a unique event id.
    """
    receiver = await harness.receiver()
    metrics = new_metrics()
    webhooks = harness.hooks([receiver.url], secret=SECRET, metrics=metrics, **FAST)
    registry = Registry()
    registry.events.add(webhooks)
    call = uuid.uuid4()

    visitor, _ = real_leg(harness, registry, Role.VISITOR, call)
    resident, resident_wire = real_leg(harness, registry, Role.RESIDENT, call)
    visitor.connectionLost(Failure(ConnectionDone()))
    assert resident_wire.value().endswith(HANGUP_FRAME)
    resident.connectionLost(Failure(ConnectionLost()))
    assert len(registry) == 0

    await until(lambda: len(receiver.answered()) == 5, what="five events")
    await until(lambda: webhooks.pending == 0, what="nothing pending")
    requests = receiver.requests
    assert len(requests) == 5

    for request in requests:
        stamp = request.headers["x-audiohangup-timestamp"]
        assert abs(int(stamp) - time.time()) < 60
        expected = hmac.new(SECRET.encode(), stamp.encode() + b"." + request.body, hashlib.sha256).hexdigest()
        assert request.headers["x-audiohangup-signature"] == f"t={stamp},sha256={expected}"
        assert verify(SECRET, request.body, request.headers["x-audiohangup-signature"])
        assert request.headers["content-type"] == "application/json"
        payload = request.json
        assert request.body == json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()
        assert request.headers["x-audiohangup-event"] == payload["event"]
        assert request.headers["x-audiohangup-event-id"] == payload["event_id"]
        assert uuid.UUID(hex=payload["event_id"]).version == 4
        assert len(payload["event_id"]) == 32
        assert payload["call_id"] == str(call)
        assert ISO_MS_UTC.match(payload["at"]), payload["at"]
        at = datetime.fromisoformat(payload["at"])
        assert at.utcoffset() == timedelta(0)
        assert abs(at.timestamp() - request.at) < 5

    payloads = [request.json for request in requests]
    assert len({p["event_id"] for p in payloads}) == 5
    assert [(p["event"], p["role"]) for p in payloads] == [
        ("leg_started", "visitor"),
        ("leg_started", "resident"),
        ("leg_ended", "visitor"),
        ("leg_ended", "resident"),
        ("call_ended", None),
    ]
    for p in payloads:
        keys = {"event", "event_id", "call_id", "role", "at"}
        assert set(p) == (keys | {"reason", "cause"} if p["event"] == "leg_ended" else keys)
    assert (payloads[2]["reason"], payloads[2]["cause"]) == ("peer_closed", None)
    assert (payloads[3]["reason"], payloads[3]["cause"]) == ("hangup_reset", "session")
    assert count(metrics, "delivered") == 5
    assert count(metrics, "retried") == 0


@pytest_twisted.ensureDeferred
async def test_unsigned_without_a_secret(harness: Harness, logs: LogCapture) -> None:
    receiver = await harness.receiver()
    webhooks = harness.hooks([receiver.url], **FAST)
    webhooks.callEnded(str(uuid.uuid4()))
    await until(lambda: receiver.answered(), what="the event")
    assert "x-audiohangup-signature" not in receiver.requests[0].headers
    assert "x-audiohangup-timestamp" not in receiver.requests[0].headers
    assert receiver.requests[0].json["role"] is None


@pytest_twisted.ensureDeferred
async def test_order_kept_through_a_retry_and_other_calls_not_held_up(
    harness: Harness, logs: LogCapture
) -> None:
    """
    Call A's first event gets a 500 on its first attempt: A's later events wait
    for it and arrive in order; call B's events go through meanwhile.
    """
    slow_call, other_call = str(uuid.uuid4()), str(uuid.uuid4())

    def script(received: Received) -> tuple[int, float]:
        if received.call_id == slow_call and received.event == "leg_started" and received.attempt == 1:
            return 500, 0.0
        return 200, 0.0

    receiver = await harness.receiver(script)
    metrics = new_metrics()
    # A backoff long enough for B's three deliveries to finish inside it, even on a starved machine.
    webhooks = harness.hooks([receiver.url], secret=SECRET, metrics=metrics, timeout=0.5, backoff=2.0)
    whole_call(webhooks, slow_call)
    whole_call(webhooks, other_call)
    assert webhooks.pending == 6

    await until(lambda: count(metrics, "delivered") == 6, what="every event delivered")
    of_slow = [r for r in receiver.requests if r.call_id == slow_call]
    of_other = [r for r in receiver.requests if r.call_id == other_call]
    assert [(r.event, r.status) for r in of_slow] == [
        ("leg_started", 500),
        ("leg_started", 200),
        ("leg_ended", 200),
        ("call_ended", 200),
    ]
    assert of_slow[0].json["event_id"] == of_slow[1].json["event_id"]  # a retry, not a new event
    assert of_slow[1].at - of_slow[0].at >= 2.0 * 0.9  # the backoff
    assert [r.event for r in of_other] == ["leg_started", "leg_ended", "call_ended"]
    assert of_other[-1].at < of_slow[1].at  # B was not held up behind A's retry
    assert count(metrics, "retried") == 1
    assert count(metrics, "delivered") == 6
    await until(lambda: webhooks.pending == 0)


@pytest_twisted.ensureDeferred
async def test_receiver_down_retried_then_dropped_and_calls_go_on(
    harness: Harness, logs: LogCapture
) -> None:
    """
    Nothing listens: each event is tried max_attempts times with growing
    backoff, then dropped as failed, while the legs start, play and hang up
    as usual.
    """
    metrics = new_metrics()
    webhooks = harness.hooks(
        [f"http://127.0.0.1:{free_port()}/hook"], metrics=metrics,
        timeout=0.5, max_attempts=3, backoff=0.1, max_backoff=1.0,
    )
    registry = Registry()
    registry.events.add(webhooks)

    started = reactor.seconds()
    leg, wire = real_leg(harness, registry, Role.VISITOR, uuid.uuid4())
    await until(lambda: count(metrics, "retried") >= 1, what="a first retry")
    # The call is unaffected: the pacer keeps writing, and a hangup goes out.
    written = len(wire.value())
    await sleep(0.1)
    assert len(wire.value()) > written
    gone = leg.hangup(HangupCause.API)
    assert wire.value().endswith(HANGUP_FRAME)
    leg.connectionLost(Failure(ConnectionLost()))
    assert await gone is CloseReason.HANGUP_RESET
    assert len(registry) == 0

    await until(lambda: count(metrics, "failed") == 3, what="three events dropped")
    assert reactor.seconds() - started >= 0.1 + 0.2  # two backoffs: 0.1, then 0.2
    assert count(metrics, "retried") == 6  # two retries for each of three events
    assert count(metrics, "delivered") == 0
    assert webhooks.pending == 0
    [warned] = warnings(logs, "dropped after")
    assert "leg_started" in str(warned["event"])
    assert warned["attempt"] == 3


@pytest_twisted.ensureDeferred
async def test_slow_receiver_times_out_then_delivered(harness: Harness, logs: LogCapture) -> None:
    def script(received: Received) -> tuple[int, float]:
        return (200, 2.0) if received.attempt == 1 else (200, 0.0)  # slow once, then fast

    receiver = await harness.receiver(script)
    metrics = new_metrics()
    webhooks = harness.hooks([receiver.url], metrics=metrics, timeout=0.5, backoff=0.05)
    call_id = str(uuid.uuid4())
    webhooks.callEnded(call_id)

    await until(lambda: count(metrics, "delivered") == 1, what="delivery")
    first, second = receiver.requests
    assert (first.status, second.status) == (None, 200)  # we gave up on the first
    assert first.json["event_id"] == second.json["event_id"]
    assert second.at - first.at >= 0.5  # the timeout
    assert count(metrics, "retried") == 1
    await until(lambda: webhooks.pending == 0)


@pytest_twisted.ensureDeferred
async def test_500_then_200_is_one_retry(harness: Harness, logs: LogCapture) -> None:
    receiver = await harness.receiver(lambda received: (500 if received.attempt == 1 else 200, 0.0))
    metrics = new_metrics()
    webhooks = harness.hooks([receiver.url], metrics=metrics, timeout=0.5, backoff=0.3)
    webhooks.legStarted(stand_in(str(uuid.uuid4())))

    await until(lambda: count(metrics, "retried") == 1, what="the retry")
    assert count(metrics, "delivered") == 0
    assert webhooks.pending == 1
    await until(lambda: count(metrics, "delivered") == 1, what="the delivery")
    assert [r.status for r in receiver.requests] == [500, 200]
    assert count(metrics, "retried") == 1
    assert count(metrics, "failed") == 0
    assert webhooks.pending == 0


@pytest_twisted.ensureDeferred
async def test_400_is_rejected_not_retried(harness: Harness, logs: LogCapture) -> None:
    receiver = await harness.receiver(lambda received: (400, 0.0))
    metrics = new_metrics()
    webhooks = harness.hooks([receiver.url], metrics=metrics, **FAST)
    call_id = str(uuid.uuid4())
    webhooks.callEnded(call_id)

    await until(lambda: count(metrics, "rejected") == 1, what="the rejection")
    await sleep(0.3)  # several backoffs: no retry comes
    assert len(receiver.requests) == 1
    assert count(metrics, "retried") == 0
    assert count(metrics, "delivered") == 0
    assert webhooks.pending == 0
    [warned] = warnings(logs, "rejected by")
    assert warned["status"] == 400
    assert warned["call_id"] == call_id
    assert "token" not in warned["url"]  # the query string may hold a secret


@pytest_twisted.ensureDeferred
async def test_overflow_is_dropped_counted_and_logged_once(harness: Harness, logs: LogCapture) -> None:
    receiver = await harness.receiver(lambda received: (200, None))  # never answers
    metrics = new_metrics()
    webhooks = harness.hooks([receiver.url], metrics=metrics, max_queue=3, **FAST)
    for _ in range(3):
        webhooks.callEnded(str(uuid.uuid4()))
    assert webhooks.pending == 3
    for _ in range(50):
        webhooks.legStarted(stand_in(str(uuid.uuid4())))
    assert webhooks.pending == 3
    assert count(metrics, "overflow") == 50
    await until(lambda: len(receiver.requests) == 3, what="three requests in flight")
    assert len(warnings(logs, "already queued")) == 1  # not one line per dropped event

    await webhooks.stop()
    [summary] = warnings(logs, "queue full")
    assert summary["count"] == 49
    assert webhooks.pending == 0


@pytest_twisted.ensureDeferred
async def test_stop_is_bounded_and_leaves_nothing_behind(harness: Harness, logs: LogCapture) -> None:
    """
    stop() with requests in flight to a receiver that never answers, events
    queued behind them, and a retry waiting: it returns within its bound,
    drops what is left (logged with the count), and leaves no delayed call
    and no connection open.
    """
    failing = str(uuid.uuid4())

    def script(received: Received) -> tuple[int, float | None]:
        return (500, 0.0) if received.call_id == failing else (200, None)

    receiver = await harness.receiver(script)
    before = set(reactor.getDelayedCalls())
    metrics = new_metrics()
    webhooks = Webhooks([receiver.url], reactor, metrics=metrics, timeout=0.4, backoff=10.0)
    harness.webhooks.append(webhooks)
    webhooks.callEnded(failing)
    for _ in range(3):
        whole_call(webhooks, str(uuid.uuid4()))
    assert webhooks.pending == 10
    # Under way: the failing event retried at least once, the three hung requests sent (a
    # starved machine may see them time out and be sent again meanwhile).
    await until(lambda: count(metrics, "retried") >= 1 and len(receiver.requests) >= 4, what="all under way")

    started = reactor.seconds()
    stopped = webhooks.stop()
    again = webhooks.stop()
    await stopped
    await again
    assert reactor.seconds() - started < 0.4 + 2.0  # bounded by the request timeout, not by the receiver
    assert webhooks.pending == 0
    [summary] = warnings(logs, "webhooks stopped")
    assert summary["count"] == 10
    assert count(metrics, "delivered") == 0

    webhooks.legStarted(stand_in(str(uuid.uuid4())))  # after stop: ignored
    assert webhooks.pending == 0
    await webhooks.stop()  # a third time, after the end

    assert webhooks.pool._connections == {}
    await until(lambda: receiver.connections == 0, what="the receiver's connections to close")
    left = [call for call in reactor.getDelayedCalls() if call not in before and call.active()]
    assert left == []
    sent = len(receiver.requests)
    await sleep(0.2)
    assert len(receiver.requests) == sent  # nothing is sent once stop() has fired


@pytest_twisted.ensureDeferred
async def test_stop_drains_queued_events_when_the_receiver_answers(harness: Harness, logs: LogCapture) -> None:
    receiver = await harness.receiver(lambda received: (200, 0.05))
    metrics = new_metrics()
    webhooks = harness.hooks([receiver.url], metrics=metrics, **FAST)
    whole_call(webhooks, str(uuid.uuid4()))
    await webhooks.stop()
    assert count(metrics, "delivered") == 3
    assert [r.event for r in receiver.requests] == ["leg_started", "leg_ended", "call_ended"]
    assert warnings(logs, "webhooks stopped") == []


# Through the whole server


@pytest_twisted.ensureDeferred
async def test_server_sends_signed_events_and_flushes_them_on_shutdown(
    harness: Harness, make_server: Any, logs: LogCapture
) -> None:
    """
    Wired by the options: a call's events reach the receiver signed, and the
    events of a leg hung up by the shutdown still go out before it ends.
    """
    receiver = await harness.receiver()
    server = await make_server(webhooks=(receiver.url,), webhook_secret="k3y")
    call_id = uuid.uuid4()
    client = await connect(server.port("visitor"), on_hangup="reset")
    client.send_uuid(call_id)
    leg = await until(lambda: server.registry.get(str(call_id), Role.VISITOR))
    await leg.hangup(HangupCause.API)
    await until(lambda: len(receiver.answered()) == 3, what="three events")
    assert [r.event for r in receiver.requests] == ["leg_started", "leg_ended", "call_ended"]
    assert all(verify("k3y", r.body, r.headers["x-audiohangup-signature"]) for r in receiver.requests)
    ended = receiver.requests[1].json
    assert (ended["reason"], ended["cause"], ended["role"]) == ("hangup_reset", "api", "visitor")

    late = uuid.uuid4()
    closer = await connect(server.port("resident"), on_hangup="close")
    closer.send_uuid(late)
    await until(lambda: server.registry.get(str(late), Role.RESIDENT))
    await server.service.stopService()
    events = [(r.event, r.json.get("cause")) for r in receiver.requests if r.call_id == str(late)]
    assert events == [("leg_started", None), ("leg_ended", "shutdown"), ("call_ended", None)]


@pytest_twisted.ensureDeferred
async def test_receiver_certificates_are_verified(harness: Harness, tmp_path: Any, logs: LogCapture) -> None:
    """
    A receiver whose certificate the system does not trust is a failed
    delivery, logged with the reason; with --webhook-ca naming its
    certificate, the same receiver gets the event.
    """
    certificate = self_signed(tmp_path)
    receiver = await harness.receiver(tls=certificate)
    metrics = new_metrics()
    untrusting = harness.hooks([receiver.url], metrics=metrics, max_attempts=1, **FAST)
    untrusting.callEnded(str(uuid.uuid4()))
    await until(lambda: count(metrics, "failed") == 1, what="the failed delivery")
    assert receiver.requests == []
    [dropped] = warnings(logs, "dropped after")
    assert "certificate verify failed" in str(dropped["why"])

    trusting = harness.hooks([receiver.url], metrics=metrics, ca=str(certificate.cert), **FAST)
    trusting.callEnded(str(uuid.uuid4()))
    await until(lambda: count(metrics, "delivered") == 1, what="the delivery")
    assert len(receiver.answered()) == 1


def test_a_ca_file_that_cannot_serve_is_refused(tmp_path: Any) -> None:
    (tmp_path / "empty.pem").write_text("no certificate here\n")
    for name, reason in [("missing.pem", "cannot be read"), ("empty.pem", "holds no PEM certificate")]:
        with pytest.raises(ValueError, match=reason):
            trust_root(str(tmp_path / name))


# Hostile receivers


class EndlessHead(Protocol):
    """
    A receiver that answers 200, then sends header lines for as long as it is
    read (as fast as the socket takes them), stopping at L{CAP} so that a
    client without a bound still ends, by its timeout.
    """

    CAP = 4 * 1024 * 1024

    def __init__(self, line: int) -> None:
        self.line = b"X-Flood: " + b"x" * line + b"\r\n"
        self.sent = 0
        self.lost = False

    def connectionMade(self) -> None:
        self.transport.registerProducer(self, False)  # resumeProducing each time the buffer drains

    def resumeProducing(self) -> None:
        if self.sent == 0:
            self.transport.write(b"HTTP/1.1 200 OK\r\n")
        if self.sent < self.CAP:
            chunk = self.line * max(1, 16384 // len(self.line))
            self.sent += len(chunk)
            self.transport.write(chunk)

    def stopProducing(self) -> None:
        pass

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = True


@pytest.mark.parametrize(("line", "bound"), [(1000, "65536 bytes"), (2, "100 lines")])
@pytest_twisted.ensureDeferred
async def test_a_receiver_sending_headers_forever_is_cut_off(
    make_server: Any, logs: LogCapture, monkeypatch: pytest.MonkeyPatch, line: int, bound: str
) -> None:
    """
    Eleven events in flight to a receiver whose response head never ends
    (long header lines, or many short ones): each attempt fails with the bound
    it passed, its connection is aborted after at most 64 KiB were parsed, the
    drop is logged once and counted, and a live call keeps its audio.
    """
    fed: dict[int, int] = {}  # bytes Twisted's response parser was given, per parser
    parse = HTTPClientParser.dataReceived

    def counting(parser: HTTPClientParser, data: bytes) -> None:
        fed[id(parser)] = fed.get(id(parser), 0) + len(data)
        parse(parser, data)

    monkeypatch.setattr(HTTPClientParser, "dataReceived", counting)
    receivers: list[EndlessHead] = []

    def receiver() -> EndlessHead:
        receivers.append(EndlessHead(line))
        return receivers[-1]

    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Factory.forProtocol(receiver))
    try:
        server = await make_server(webhooks=(f"http://127.0.0.1:{port.getHost().port}/hook",))
        webhooks, metrics = server.service.webhooks, server.service.metrics
        webhooks.max_attempts = 1  # each event is dropped at its first failure: logged, counted
        bystander = await Bystander.start(server.port("visitor"), server.port("resident"), server.registry)
        for _ in range(10):
            webhooks.event("flood", str(uuid.uuid4()), None, {})
        await until(lambda: count(metrics, "failed") >= 12, timeout=15, what="the bystander's two and ten more")
        kept = await bystander.stop()
        bystander.close()
        assert kept >= 0.95
        await until(lambda: all(r.lost for r in receivers), what="every receiver connection closed")
        assert len(receivers) >= 12  # a connection per attempt: an aborted one is not reused
        assert all(r.sent < EndlessHead.CAP for r in receivers)  # cut off, long before its end
        assert 0 < max(fed.values()) <= MAX_HEAD_BYTES
        assert count(metrics, "delivered") == 0
        [warned] = warnings(logs, "dropped after")  # one line; the rest are counted for the summary
        assert warned["why"] == f"ResponseFailed: ResponseHeadTooLarge: the response head passed {bound}"
    finally:
        await port.stopListening()
        for r in receivers:
            if not r.lost:
                r.transport.abortConnection()

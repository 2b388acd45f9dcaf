"""
The API's edge against slow and greedy clients: each request's head and body
must arrive in time (408), connections are capped in total and per source (the
oldest one still sending its request makes room for a newcomer), and start-up
checks the descriptor limit. Deterministic tests on a Clock and
StringTransports, and a real-socket flood of slow clients from several
loopback addresses beside a live call.
"""

from __future__ import annotations

import json
import resource
import uuid
from dataclasses import replace
from typing import Any

import pytest_twisted
import treq
from prometheus_client import CollectorRegistry
from twisted.internet import reactor
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import Clock, LoopingCall
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase

from audiohangup.http.api import ControlAPI
from audiohangup.http.hosts import ServedHosts, check_name
from audiohangup.http.site import ApiSite
from audiohangup.listeners import ConnectionCap, descriptor_limit
from audiohangup.registry import Registry
from audiohangup.service import Config, fit_descriptors, served_names
from audiohangup.sources import parse_networks, source_of
from audiohangup.streams.manager import StreamConfig
from audiohangup.tap import Options
from audiohangup.wire import Kind, encode_frame
from tests.bystander import Bystander
from tests.conftest import LogCapture, Server, until
from tests.fake_asterisk import FakeAsterisk, connect

PEER = IPv4Address("TCP", "127.0.0.1", 40000)


def _site(clock: Clock, **options: Any) -> ApiSite:
    registry = Registry()
    api = ControlAPI(registry, clock=clock, metrics=CollectorRegistry())
    return ApiSite.forAPI(api, clock, **options)


class _Connection:
    """One client of a site, on a StringTransport."""

    def __init__(self, site: ApiSite, peer: IPv4Address = PEER) -> None:
        self.transport = StringTransport(peerAddress=peer)
        self.protocol = site.buildProtocol(peer)
        assert self.protocol is not None
        self.protocol.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    @property
    def answer(self) -> bytes:
        return self.transport.value()


class DeadlineTests(SynchronousTestCase):
    """Twisted's own timeout is reset by every byte; these deadlines are not."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.site = _site(self.clock)

    def assertTimedOut(self, connection: _Connection, part: str) -> None:
        head, _, body = connection.answer.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 408 "), connection.answer)
        self.assertIn(b"connection: close", head)
        error = json.loads(body)["error"]
        self.assertEqual(error["code"], "request_timeout")
        self.assertIn(part, error["message"])
        self.assertTrue(connection.transport.disconnecting)

    def test_headOneByteAtATime(self) -> None:
        """A head dribbled a byte a second is cut off 10 s after the connection, with a JSON 408."""
        connection = _Connection(self.site)
        for byte in b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-Slow: abcdefg":
            self.clock.advance(0.5)
            if self.clock.seconds() >= 10:
                break
            connection.send(bytes([byte]))
            self.assertEqual(connection.answer, b"")
        self.clock.advance(10 - self.clock.seconds())
        self.assertTimedOut(connection, "head")
        self.assertEqual(
            self.site.metrics.get_sample_value(
                "audiohangup_http_requests_total", {"route": "unrouted", "method": "-", "status": "408"}
            ),
            1.0,
        )

    def test_silentConnection(self) -> None:
        connection = _Connection(self.site)
        self.clock.advance(9.9)
        self.assertEqual(connection.answer, b"")
        self.clock.advance(0.1)
        self.assertTimedOut(connection, "head")

    def test_bodyDeadline(self) -> None:
        """A body announced and dribbled is cut off C{body_timeout} after its head."""
        site = _site(self.clock, head_timeout=5, body_timeout=7)
        connection = _Connection(site)
        self.clock.advance(4)
        connection.send(b"POST /api/hangup HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\n\r\n{")
        for _ in range(6):
            self.clock.advance(1)
            connection.send(b" ")
        self.assertEqual(connection.answer, b"")
        self.clock.advance(1)
        self.assertTimedOut(connection, "body")

    def test_keptAliveConnectionTimesEachRequest(self) -> None:
        """A request in time is served; the next one's deadline starts at its first byte, not before."""
        connection = _Connection(self.site)
        connection.send(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        self.assertTrue(connection.answer.startswith(b"HTTP/1.1 200 "))
        connection.transport.clear()
        self.clock.advance(30)  # idle between requests: Twisted's idle timeout (60 s) governs that
        self.assertEqual(connection.answer, b"")
        connection.send(b"GET /heal")
        self.clock.advance(9.9)
        self.assertEqual(connection.answer, b"")
        self.clock.advance(0.1)
        self.assertTimedOut(connection, "head")

    def test_servedRequestLeavesNoTimer(self) -> None:
        connection = _Connection(self.site)
        connection.send(b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        self.assertTrue(connection.answer.startswith(b"HTTP/1.1 200 "))
        connection.protocol.connectionLost(Failure(connectionDone))
        self.assertEqual(self.clock.getDelayedCalls(), [])


def _cap(total: int = 4, per_source: int = 2) -> tuple[ConnectionCap, list[str]]:
    """A cap on a Clock, and the names of the connections it evicts, in order."""
    return ConnectionCap("http", total, per_source, Clock()), []


class CapTests(SynchronousTestCase):
    def admit(self, cap: ConnectionCap, host: str, name: str, evicted: list[str]) -> Any:
        address = IPv4Address("TCP", host, 1) if ":" not in host else IPv6Address("TCP", host, 1)
        return cap.admit(address, lambda: evicted.append(name))

    def test_perSourceEvictsItsOldestWaiting(self) -> None:
        """A source at its cap: its connection waiting longest for its request makes room."""
        cap, evicted = _cap()
        first = self.admit(cap, "10.0.0.1", "first", evicted)
        self.admit(cap, "10.0.0.1", "second", evicted)
        self.assertIsNotNone(self.admit(cap, "10.0.0.1", "third", evicted))
        self.assertEqual(evicted, ["first"])
        self.assertFalse(first.held)
        self.assertEqual(cap.held, 2)
        first.release()  # its connectionLost, later: nothing counted twice
        self.assertEqual(cap.held, 2)

    def test_busyConnectionsAreNotEvicted(self) -> None:
        cap, evicted = _cap()
        self.admit(cap, "10.0.0.1", "a", evicted).busy()
        self.admit(cap, "10.0.0.1", "b", evicted).busy()
        self.assertIsNone(self.admit(cap, "10.0.0.1", "c", evicted))
        self.assertEqual(evicted, [])
        self.assertIsNotNone(self.admit(cap, "10.0.0.2", "other source", evicted))

    def test_totalEvictsTheOldestWaitingOfAnySource(self) -> None:
        cap, evicted = _cap(total=3, per_source=3)
        a = self.admit(cap, "10.0.0.1", "a", evicted)
        self.admit(cap, "10.0.0.2", "b", evicted)
        self.admit(cap, "10.0.0.3", "c", evicted)
        a.busy()
        a.waiting()  # served, and waiting for its next request: now the newest waiting
        self.admit(cap, "10.0.0.4", "d", evicted)
        self.assertEqual(evicted, ["b"])
        self.assertEqual(cap.held, 3)

    def test_trustedProxiesAreNotCappedPerSource(self) -> None:
        """A proxy of --trusted-proxies speaks for many clients: only the total caps it."""
        cap = ConnectionCap("http", 3, 1, Clock(), uncapped=parse_networks("10.0.0.7/32"))
        evicted: list[str] = []
        for name in "abc":
            self.assertIsNotNone(self.admit(cap, "10.0.0.7", name, evicted))
        self.assertEqual(evicted, [])
        self.admit(cap, "10.0.0.7", "d", evicted)
        self.assertEqual(evicted, ["a"])
        self.admit(cap, "10.0.0.8", "e", evicted)
        self.admit(cap, "10.0.0.8", "f", evicted)
        self.assertEqual(evicted, ["a", "b", "e"])

    def test_unixClientsAreNotCappedPerSource(self) -> None:
        cap, evicted = _cap(total=3, per_source=1)
        for name in "abc":
            self.assertIsNotNone(cap.admit(UNIXAddress("/run/api.sock"), lambda name=name: evicted.append(name)))
        self.assertEqual(evicted, [])
        cap.admit(UNIXAddress("/run/api.sock"), lambda: evicted.append("d"))
        self.assertEqual(evicted, ["a"])  # the total still holds

    def test_sourceKeys(self) -> None:
        self.assertEqual(source_of(IPv4Address("TCP", "10.0.0.1", 5)), "10.0.0.1")
        self.assertEqual(source_of(IPv6Address("TCP", "2001:db8:1:2:aaaa::1", 5)), "2001:db8:1:2::/64")
        self.assertEqual(
            source_of(IPv6Address("TCP", "2001:db8:1:2:bbbb::9", 5)), source_of(IPv6Address("TCP", "2001:db8:1:2::", 5))
        )
        self.assertEqual(source_of(IPv6Address("TCP", "::ffff:10.0.0.1", 5)), "10.0.0.1")
        self.assertIsNone(source_of(UNIXAddress(b"/run/api.sock")))

    def test_siteRefusesOverTheCapAndEvictsWaitingChannels(self) -> None:
        clock = Clock()
        site = _site(clock, cap=ConnectionCap("http", 2, 2, clock))
        first, second = _Connection(site), _Connection(site)
        second.send(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")  # served: waiting for its next
        first.transport.abortConnection = lambda: first.transport.loseConnection()  # type: ignore[method-assign]
        third = _Connection(site)
        self.assertTrue(first.transport.disconnecting)
        self.assertFalse(second.transport.disconnecting or third.transport.disconnecting)


class DescriptorTests(SynchronousTestCase):
    def check(self, soft: int, hard: int, needed: int = 2320, settable: bool = True) -> tuple[tuple[int, int | None], list[Any]]:
        calls: list[Any] = []

        def setrlimit(which: int, limits: tuple[int, int]) -> None:
            if not settable:
                raise ValueError("not allowed")
            calls.append((which, limits))

        return descriptor_limit(needed, lambda which: (soft, hard), setrlimit), calls

    def test_raisedToWhatIsNeeded(self) -> None:
        self.assertEqual(self.check(1024, 524288), ((2320, 524288), [(resource.RLIMIT_NOFILE, (2320, 524288))]))
        self.assertEqual(
            self.check(1024, resource.RLIM_INFINITY),
            ((2320, None), [(resource.RLIMIT_NOFILE, (2320, resource.RLIM_INFINITY))]),
        )

    def test_enoughAlready(self) -> None:
        self.assertEqual(self.check(4096, 4096), ((2320, 4096), []))

    def test_hardLimitTooLow(self) -> None:
        self.assertEqual(self.check(512, 1024), ((1024, 1024), [(resource.RLIMIT_NOFILE, (1024, 1024))]))

    def test_notAllowedToRaise(self) -> None:
        self.assertEqual(self.check(1024, 4096, settable=False), ((1024, 4096), []))

    def test_maxLegsFitTheLimit(self) -> None:
        """
        A limit that cannot be raised lowers --max-legs to what fits beside the
        API's connections and the spare, so a flood of connections meets
        over_capacity and too_many_pending, never EMFILE; the warning names the numbers.
        """
        config, warning = fit_descriptors(Config(), lambda needed: (1024, 1024))
        self.assertEqual(config.max_legs, 1024 - 256 - 64)
        assert warning is not None
        self.assertIn("limit is 1024 (hard limit 1024), below the 2320", warning)
        self.assertIn("--max-legs is lowered to 704", warning)
        streamed, _ = fit_descriptors(Config(streams=StreamConfig(url="ws://127.0.0.1/x")), lambda needed: (1024, None))
        self.assertEqual(streamed.max_legs, (1024 - 256 - 64) // 2)
        clustered = Config(redis="redis://127.0.0.1:1/0", api_token="t" * 32, advertise_url="http://127.0.0.1:1")
        linked, _ = fit_descriptors(clustered, lambda needed: (1024, None))
        self.assertEqual(linked.max_legs, (1024 - 256 - 64) // 2)  # a media link per leg
        unlinked, _ = fit_descriptors(replace(clustered, link="none"), lambda needed: (1024, None))
        self.assertEqual(unlinked.max_legs, 1024 - 256 - 64)
        same, none = fit_descriptors(Config(max_legs=100), lambda needed: (needed, None))
        self.assertEqual((same.max_legs, none), (100, None))


# Real sockets


class _SlowClient(Protocol):
    """Sends a request head that never ends, a byte at a time when told to."""

    HEAD = b"GET /calls HTTP/1.1\r\nHost: localhost\r\nX-Slow: "

    def __init__(self) -> None:
        self.sent = 0
        self.open = False
        self.closed = False

    def connectionMade(self) -> None:
        self.open = True

    def drip(self) -> None:
        if self.open and self.transport is not None:
            byte = self.HEAD[self.sent : self.sent + 1] or b"a"
            self.transport.write(byte)
            self.sent += 1

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.open = False
        self.closed = True


async def _new_call(server: Server) -> tuple[FakeAsterisk, FakeAsterisk]:
    """A visitor and a resident of a new call, once the server holds both."""
    call_id = uuid.uuid4()
    visitor = await connect(server.port("visitor"), on_hangup="close")
    resident = await connect(server.port("resident"), on_hangup="close")
    visitor.send_uuid(call_id)
    resident.send_uuid(call_id)
    await until(lambda: len(server.registry.call(str(call_id))) == 2, what="the new call's two legs")
    return visitor, resident


SOURCES = [f"127.0.0.{n}" for n in range(1, 9)]


@pytest_twisted.ensureDeferred
async def test_slow_clients_cannot_lock_out_asterisk_or_health(make_server: Any, logs: LogCapture) -> None:
    """
    The issue's attack, scaled down: slow clients from eight loopback
    addresses hold their connections with a header a byte at a time. Beyond
    the caps they are closed (the oldest first), a new leg is accepted and
    bridged, /health answers from an address the attack also uses, and a live
    call keeps its audio.
    """
    total, per_source = 24, 6
    server: Server = await make_server(http_max_connections=total, http_max_per_source=per_source)
    port = server.service.getServiceNamed("http").port.getHost().port
    bystander = await Bystander.start(server.port("visitor"), server.port("resident"), server.registry)
    clients: list[_SlowClient] = []
    drip = LoopingCall(lambda: [client.drip() for client in clients])
    drip.start(0.2)
    try:
        for _ in range(10):
            for source in SOURCES:
                endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, bindAddress=(source, 0))
                clients.append(await connectProtocol(endpoint, _SlowClient()))
        await until(
            lambda: sum(client.open for client in clients) <= total, what=f"at most {total} slow clients held"
        )
        assert sum(client.closed for client in clients) >= len(clients) - total
        visitor, resident = await _new_call(server)
        visitor.send(encode_frame(Kind.SLIN, b"\x07" * 320))
        await until(lambda: any(f.payload == b"\x07" * 320 for f in resident.frames), what="the new call's audio")
        for _ in range(3):
            response = await treq.get(f"http://127.0.0.1:{port}/health", persistent=False, timeout=5)
            assert response.code == 200, response.code
            assert (await response.json())["status"] == "ok"
        assert server.service.getServiceNamed("http").factory.cap.held <= total
        kept = await bystander.stop()
        assert kept >= 0.95, kept
    finally:
        drip.stop()
        bystander.close()
        for client in clients:
            if client.open:
                client.transport.abortConnection()
    evicted = server.service.api.metrics.get_sample_value(
        "audiohangup_connections_refused_total", {"listener": "http", "reason": "evicted"}
    )
    assert evicted and evicted >= len(clients) - total
    visitor.close()
    resident.close()
    await until(lambda: len(server.registry) == 0, what="the legs to end")


# Host and Origin (DNS rebinding, cross-site requests)


class HostCheckTests(SynchronousTestCase):
    hosts = ServedHosts(["calls.example.com"])

    def refusal(
        self, method: str = "GET", host: str | None = "localhost:8080", origin: str | None = None,
        media: str = "", secure: bool = False,
    ) -> str | None:
        error = self.hosts.refusal(method, [] if host is None else [host], origin, media, secure)
        return None if error is None else f"{error.status} {error.code}"

    def test_servedHosts(self) -> None:
        for host in (
            "localhost", "localhost:8080", "LocalHost:1", "127.0.0.1", "127.0.0.1:8080", "[::1]", "[::1]:8080",
            "10.0.0.2:8080", "calls.example.com", "calls.example.com:443", None,
        ):
            self.assertIsNone(self.refusal(host=host), host)

    def test_foreignHosts(self) -> None:
        for host in ("attacker.example", "attacker.example:8080", "localhost.attacker.example"):
            self.assertEqual(self.refusal(host=host), "421 bad_host", host)
        # Not a name at all: a bad request (RFC 9110), not a misdirected one.
        for host in ("", "a b", "x@localhost", "localhost:abc", "localhost/x"):
            self.assertEqual(self.refusal(host=host), "400 bad_host", host)
        self.assertEqual(
            self.hosts.refusal("GET", ["localhost", "attacker.example"], None, "", False).status, 400  # type: ignore[union-attr]
        )

    def test_crossSiteChanges(self) -> None:
        for origin in ("http://attacker.example", "http://localhost:3000", "https://localhost:8080", "null", "x"):
            self.assertEqual(self.refusal("POST", origin=origin), "403 cross_site", origin)
        for media in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data"):
            self.assertEqual(self.refusal("POST", media=media), "400 bad_content_type", media)
            self.assertEqual(self.refusal("DELETE", media=media), "400 bad_content_type", media)
        self.assertIsNone(self.refusal("GET", origin="http://attacker.example", media="text/plain"))

    def test_ownChanges(self) -> None:
        """The page itself, curl and the other instances of a cluster."""
        self.assertIsNone(self.refusal("POST", origin="http://localhost:8080"))
        self.assertIsNone(self.refusal("POST", host="localhost", origin="http://localhost"))
        self.assertIsNone(self.refusal("POST", host="localhost:8443", origin="https://localhost:8443", secure=True))
        self.assertIsNone(self.refusal("POST", host="127.0.0.1:8080", origin="https://calls.example.com"))
        for media in ("", "application/json", "application/merge-patch+json", "audio/l16", "audio/pcmu"):
            self.assertIsNone(self.refusal("POST", media=media), media)

    def test_names(self) -> None:
        self.assertEqual(check_name(" Calls.Example.COM "), "calls.example.com")
        for bad in ("", "http://x", "x:80", "a b", "x/", "-x"):
            with self.assertRaises(ValueError):
                check_name(bad)

    def test_advertisedNameIsServed(self) -> None:
        config = Config(http_hosts=("calls.example.com",), advertise_url="http://node-a.internal:8080/")
        self.assertEqual(served_names(config), ("calls.example.com", "node-a.internal"))
        self.assertEqual(served_names(Config()), ())

    def test_advertisedNameIsNoOriginOnAnyPort(self) -> None:
        """
        The advertise URL's name is served, but a page there is the API's own
        only on its scheme and port: another service on that host is another site.
        """
        hosts = ServedHosts(["calls.example.com", "node-a.internal"], origins=["calls.example.com"])
        own = hosts.refusal("POST", ["node-a.internal:8080"], "http://node-a.internal:8080", "", False)
        other = hosts.refusal("POST", ["node-a.internal:8080"], "http://node-a.internal:3000", "", False)
        proxied = hosts.refusal("POST", ["node-a.internal:8080"], "https://calls.example.com", "", False)
        self.assertEqual((own, other and other.code, proxied), (None, "cross_site", None))

    def test_option(self) -> None:
        options = Options()
        options.parseOptions(["--http-host", "a.example, B.example", "--http-host", "c"])
        self.assertEqual(options.config().http_hosts, ("a.example", "b.example", "c"))
        with self.assertRaises(UsageError):
            Options().parseOptions(["--http-host", "http://a.example"])

    def test_site(self) -> None:
        """Refused before routing, as JSON; /health answers whatever the Host; HTTP/1.0 without Host is served."""
        site = _site(Clock())
        for request, status, code in (
            (b"GET /calls HTTP/1.1\r\nHost: attacker.example:8080\r\n\r\n", b"421", b'"bad_host"'),
            (b"POST /api/hangup HTTP/1.1\r\nHost: localhost\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\n{}",
             b"400", b'"bad_content_type"'),
            (b"GET /health HTTP/1.1\r\nHost: attacker.example\r\n\r\n", b"200", b'"ok"'),
            (b"GET /calls HTTP/1.0\r\n\r\n", b"200", b'"calls"'),
            # Found by fuzz/fuzz_http.py: routing answered this one an HTML 400.
            (b"GET /health HTTP/1.1\r\nHost: \xff\x83\r\n\r\n", b"400", b'"bad_host"'),
            # And this one a 500 with werkzeug's BadHost traceback (an empty IDNA label).
            (b"PATCH /health HTTP/1.1\r\nHost: .>\r\n\r\n", b"400", b'"bad_host"'),
        ):
            connection = _Connection(site)
            connection.send(request)
            self.assertEqual(connection.answer.split(b" ")[1], status, connection.answer)
            self.assertIn(b"application/json", connection.answer)
            self.assertIn(code, connection.answer)


async def _exchange(port: int, request: bytes) -> bytes:
    """One request on its own connection; everything the server sent back until it closed."""

    class Client(Protocol):
        def __init__(self) -> None:
            self.received = b""
            self.closed = False

        def connectionMade(self) -> None:
            self.transport.write(request)

        def dataReceived(self, data: bytes) -> None:
            self.received += data

        def connectionLost(self, reason: Failure = connectionDone) -> None:
            self.closed = True

    client = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), Client())
    await until(lambda: client.closed, what="the answer")
    return client.received


@pytest_twisted.ensureDeferred
async def test_rebound_name_and_cross_site_posts_are_refused(make_server: Any, logs: LogCapture) -> None:
    """
    The tokenless loopback default: a page on a rebound name cannot read the
    calls, a cross-site text/plain or empty POST with a foreign Origin cannot
    hang one up; curl's POST (no Origin, no body) and a --http-host name can.
    """
    server: Server = await make_server(http_hosts=("audiohangup.internal",))
    port = server.service.getServiceNamed("http").port.getHost().port
    visitor, resident = await _new_call(server)
    [call_id] = server.registry.calls()
    rebound = await _exchange(port, f"GET /calls HTTP/1.1\r\nHost: attacker.example:{port}\r\nConnection: close\r\n\r\n".encode())
    assert rebound.startswith(b"HTTP/1.1 421 Misdirected Request\r\n") and b"bad_host" in rebound and call_id.encode() not in rebound
    hangup = f"POST /calls/{call_id}/hangup HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n"
    for extra, status, code in (
        ("Content-Type: text/plain\r\nContent-Length: 0\r\n\r\n", b"400", b"bad_content_type"),
        ("Origin: http://attacker.example\r\nContent-Length: 0\r\n\r\n", b"403", b"cross_site"),
        (f"Origin: http://127.0.0.1:{port + 1}\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{{}}",
         b"403", b"cross_site"),
    ):
        answer = await _exchange(port, (hangup + extra).encode())
        assert answer.startswith(b"HTTP/1.1 " + status) and code in answer, answer
    assert len(server.registry.call(call_id)) == 2 and visitor.hangup_frames == 0
    named = await treq.get(f"http://127.0.0.1:{port}/calls", headers={"Host": "audiohangup.internal"}, persistent=False)
    assert named.code == 200 and call_id in (await named.text())
    served = await treq.post(f"{server.url}/calls/{call_id}/hangup?role=visitor", persistent=False)
    assert served.code == 200, await served.text()
    await visitor.hangup_received
    resident.close()
    await until(lambda: len(server.registry) == 0, what="the call to end")

"""
Who gets in: duplicate call ids refused, source ACLs on every listener,
protected mode, scoped tokens and their reload, the failed-auth throttle, and
the API over TLS. Real sockets on loopback (Linux routes all of 127.0.0.0/8
there, so a client bound to 127.0.0.2 is "another host"), twistd children
for what only a process shows, and deterministic tests of the pure parts.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from treq.client import HTTPClient
from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import Clock
from twisted.logger import LogLevel
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import Agent, ResponseNeverReceived
from twisted.web.test.requesthelper import DummyRequest

from audiohangup.access import AuthThrottle, Scope, SourceACL, TokenFileError, Tokens, is_loopback, parse_networks
from audiohangup.api import ApiError, ControlAPI
from audiohangup.pacer import Pacer
from audiohangup.protocol import AudioSocketProtocol, LegSettings
from audiohangup.reasons import CloseReason, Role
from audiohangup.registry import Registry
from audiohangup.wire import HANGUP_FRAME, Kind, encode, encode_uuid
from tests.conftest import LogCapture, Server, bridged, until
from tests.fake_asterisk import FakeAsterisk, connect
from tests.tls import self_signed
from tests.twistd_child import LOOPBACK, Child, listening_ports, start_server, twistd_script

READ, CONTROL = "r3ad-token", "c0ntrol-token"


def marked(number: int) -> bytes:
    """An audio frame whose samples say which frame it is."""
    return encode(Kind.SLIN, number.to_bytes(2, "little") * 160)


def numbers(client: FakeAsterisk) -> list[int]:
    """The marked frames a client received (silence, all zeros, is not one)."""
    return [
        int.from_bytes(frame.payload[:2], "little")
        for frame in client.frames
        if frame.kind == Kind.SLIN and frame.payload[:2] != b"\x00\x00"
    ]


async def metric(server: Server, name: str, **labels: str) -> float:
    return server.service.api.metrics.collectors.get_sample_value(name, labels) or 0.0


# 1. Duplicates


@pytest_twisted.ensureDeferred
async def test_a_call_id_does_not_take_over_a_live_call(make_server: Any, logs: LogCapture) -> None:
    """
    The hijack of the issue: a third connection to the visitor port with the
    call's UUID gets 00 00 00 and nothing else; the real legs keep talking.
    """
    server = await make_server()
    call_id, visitor, resident = await bridged(server)
    intruder = await connect(server.port("visitor"), on_hangup="close")
    intruder.send_uuid(call_id)
    await intruder.closed
    assert [frame.encode() for frame in intruder.frames] == [HANGUP_FRAME]
    assert intruder.bytes_after_hangup == 0
    for number in range(1, 6):
        resident.send(marked(number))
        visitor.send(marked(100 + number))
    await until(lambda: numbers(visitor) == [1, 2, 3, 4, 5], what="the resident's five frames at the visitor")
    await until(lambda: numbers(resident) == [101, 102, 103, 104, 105], what="the visitor's frames at the resident")
    assert visitor.hangup_frames == resident.hangup_frames == 0
    assert [leg.role for leg in server.registry.call(str(call_id))] == [Role.VISITOR, Role.RESIDENT]
    [ended] = logs.ended()
    assert (ended["reason"], ended["log_level"], ended["call_id"]) == (CloseReason.DUPLICATE, LogLevel.warn, str(call_id))
    duplicates = [e for e in logs.events if "duplicate" in str(e.get("reason", "")) and e["log_level"] is LogLevel.warn]
    assert len(duplicates) == 1
    assert await metric(server, "audiohangup_connections_without_leg_total", reason="duplicate") == 1
    assert (await metric(server, "audiohangup_legs_started_total", role="visitor")) == 1
    [recent] = server.service.api.recent.latest(10)
    assert (recent["reason"], recent["cause"], recent["call_id"]) == ("duplicate", "duplicate", str(call_id))
    visitor.close()
    await until(lambda: len(server.registry) == 0, what="the call to end")


@pytest_twisted.ensureDeferred
async def test_replace_keeps_the_old_behaviour(make_server: Any, logs: LogCapture) -> None:
    """--on-duplicate replace: the newcomer takes the visitor's place and hears the resident."""
    server = await make_server(on_duplicate="replace")
    call_id, visitor, resident = await bridged(server)
    newcomer = await connect(server.port("visitor"), on_hangup="close")
    newcomer.send_uuid(call_id)
    await visitor.closed
    assert visitor.hangup_frames == 1
    await until(lambda: server.registry.get(str(call_id), Role.VISITOR) is not None
                and server.registry.get(str(call_id), Role.VISITOR).peer.endswith(str(newcomer.transport.getHost().port)),
                what="the newcomer as the visitor")
    for number in range(1, 6):
        resident.send(marked(number))
    await until(lambda: numbers(newcomer) == [1, 2, 3, 4, 5], what="the resident's audio at the newcomer")
    [ended] = logs.ended()
    assert (ended["reason"], ended["cause"]) == (CloseReason.HANGUP_CLEAN, "replaced")
    newcomer.close()
    await until(lambda: len(server.registry) == 0, what="the call to end")


# 2. Source ACLs


class RawClient(Protocol):
    """Sends bytes once connected and keeps whatever comes back, until the connection ends."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.received = b""
        self.closed: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.closed.callback(None)


async def raw(port: int, source: str, request: bytes) -> RawClient:
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, bindAddress=(source, 0))
    client = await connectProtocol(endpoint, RawClient(request))
    await client.closed.addTimeout(10, reactor)
    return client


@pytest_twisted.ensureDeferred
async def test_audiosocket_allow_list(make_server: Any, logs: LogCapture) -> None:
    """From outside --allow: closed without a byte, no leg, counted, logged once per source."""
    server = await make_server(allow=parse_networks("127.0.0.1/32"))
    for _ in range(2):
        outsider = await connect(server.port("visitor"), source="127.0.0.2")
        outsider.send_uuid(uuid.uuid4())
        await outsider.closed
        assert outsider.frames == [] and outsider.bytes_after_hangup == 0
    assert len(server.registry) == 0 and server.registry.connections() == []
    assert await metric(
        server, "audiohangup_connections_refused_total", listener="audiosocket-visitor", reason="not_allowed"
    ) == 2
    refused = [e for e in logs.events if "refused: not in" in e.get("log_format", "")]
    assert len(refused) == 1 and refused[0]["source"] == "127.0.0.2" and refused[0]["log_level"] is LogLevel.warn
    assert "connections from 127.0.0.2 refused: not in --allow" in logs.texts()[logs.events.index(refused[0])]
    insider = await connect(server.port("visitor"), source="127.0.0.1", on_hangup="close")
    insider.send_uuid(uuid.uuid4())
    await until(lambda: len(server.registry) == 1, what="the allowed leg")
    await until(lambda: insider.frames, what="its first paced frame")
    insider.close()
    await until(lambda: len(server.registry) == 0, what="the leg to end")


@pytest_twisted.ensureDeferred
async def test_audiosocket_allow_list_of_a_network(make_server: Any, logs: LogCapture) -> None:
    server = await make_server(allow=parse_networks("127.0.0.0/8, ::1"))
    client = await connect(server.port("resident"), source="127.0.0.2", on_hangup="close")
    client.send_uuid(uuid.uuid4())
    await until(lambda: len(server.registry) == 1, what="the leg from 127.0.0.2")
    assert server.registry.connections()[0].peer.startswith("127.0.0.2:")
    client.close()
    await until(lambda: len(server.registry) == 0, what="the leg to end")


@pytest_twisted.ensureDeferred
async def test_http_allow_list(make_server: Any, logs: LogCapture) -> None:
    """A request from outside --http-allow gets nothing at all, not a 403; one from inside is served."""
    server = await make_server(http_allow=parse_networks("127.0.0.1/32"))
    port = server.service.getServiceNamed("http").port.getHost().port
    request = b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    outsider = await raw(port, "127.0.0.2", request)
    assert outsider.received == b""
    assert await metric(server, "audiohangup_connections_refused_total", listener="http", reason="not_allowed") == 1
    insider = await raw(port, "127.0.0.1", request)
    assert insider.received.startswith(b"HTTP/1.1 200 ")
    wider = await make_server(http_allow=parse_networks("127.0.0.0/8"))
    served = await raw(wider.service.getServiceNamed("http").port.getHost().port, "127.0.0.2", request)
    assert served.received.startswith(b"HTTP/1.1 200 ")


class ACLTests(SynchronousTestCase):
    def test_networks(self) -> None:
        acl = SourceACL(parse_networks("10.0.0.0/8,192.168.1.7, 2001:db8::/32"))
        for host in ("10.1.2.3", "192.168.1.7", "2001:db8::1", "::ffff:10.0.0.1"):
            self.assertTrue(acl.allows(host), host)
        for host in ("11.0.0.1", "192.168.1.8", "2001:db9::1", "::1", "not an address"):
            self.assertFalse(acl.allows(host), host)
        self.assertTrue(acl.allows(None))  # a UNIX socket
        self.assertTrue(SourceACL().allows("203.0.113.9"))  # no list: every source

    def test_badNetworks(self) -> None:
        for text in ("", "10.0.0.0/33", "example.com", "10.0.0.0/8,,nope"):
            with self.assertRaises(ValueError):
                parse_networks(text)

    def test_loopback(self) -> None:
        for host in ("127.0.0.1", "127.1.2.3", "::1", "localhost"):
            self.assertTrue(is_loopback(host), host)
        for host in ("", "0.0.0.0", "::", "192.0.2.1", "example.com"):
            self.assertFalse(is_loopback(host), host)


# 3. Protected mode, and failing closed (twistd children)


def run_twistd(spawn: Any, *args: str) -> Child:
    return spawn(
        twistd_script(), "-n", "--pidfile=", "audiohangup",
        "--visitor", LOOPBACK, "--resident", LOOPBACK, *args,
    )


@pytest_twisted.ensureDeferred
async def test_protected_mode(spawn: Any, logs: LogCapture) -> None:
    """An API beyond loopback without a token stops start-up, naming the fix."""
    refused = run_twistd(spawn, "--http=tcp:0")
    ended = await refused.exit()
    assert getattr(ended, "exitCode", None) == 1, refused.describe()
    assert "listens beyond loopback and no API token is configured" in refused.output
    assert "--insecure-http" in refused.output and "--api-token" in refused.output
    assert listening_ports(refused.log) == {}


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("extra", [["--insecure-http"], ["--api-token", "t0ken"]])
async def test_protected_mode_lets_a_guarded_api_start(spawn: Any, logs: LogCapture, extra: list[str]) -> None:
    child = run_twistd(spawn, "--http=tcp:0", *extra)
    await until(lambda: child.ended is not None or "http listening on" in child.log, 20, "the API to listen")
    assert child.ended is None, child.describe()
    if extra == ["--insecure-http"]:
        # Logged once the service has started, which may be after "listening".
        warning = "--insecure-http: the API on tcp:0 takes requests without a token"
        await until(lambda: child.ended is not None or warning in child.log, 20, "the warning")
        assert warning in child.log, child.describe()
    child.signal("TERM")
    await child.exit()


@pytest_twisted.ensureDeferred
async def test_fail_closed(spawn: Any, tmp_path: Path, logs: LogCapture) -> None:
    """A store or a file the command line asks for and that cannot serve stops start-up, with the reason."""
    (tmp_path / "empty-tokens").write_text("# every token revoked\n")
    for args, reason in [
        (["--http", "tcp:0", "--api-tokens-file", str(tmp_path / "empty-tokens")], "holds no token"),
        (["--records", str(tmp_path / "missing" / "calls.sqlite3")], "does not exist"),
        (["--api-tokens-file", str(tmp_path / "no-such-tokens")], "cannot be read"),
        (["--webhook", "https://example.com/hook", "--webhook-ca", str(tmp_path / "no-ca.pem")], "cannot be read"),
    ]:
        child = run_twistd(spawn, "--http", LOOPBACK, *args)
        ended = await child.exit()
        assert getattr(ended, "exitCode", None) == 1, child.describe()
        assert reason in child.output, child.describe()


@pytest_twisted.ensureDeferred
async def test_open_audiosocket_listener_warns(spawn: Any, logs: LogCapture) -> None:
    """AudioSocket on every interface without --allow: one warning; with --allow, none."""
    child = spawn(
        twistd_script(), "-n", "--pidfile=", "audiohangup",
        "--visitor", "tcp:0", "--resident", "tcp:0", "--http", LOOPBACK,
    )
    await until(lambda: child.ended is not None or len(listening_ports(child.log)) == 1, 20, "the API")
    await until(lambda: child.ended is not None or "accept every source" in child.log, 20, "the warning")
    assert child.log.count("accept every source beyond loopback") == 1, child.describe()
    assert "visitor, resident" in child.log
    child.signal("TERM")
    await child.exit()


# 4. Scoped tokens


class ScopeTests(SynchronousTestCase):
    """Read vs control tokens on every route."""

    READ_ROUTES = [
        ("GET", "/calls"), ("GET", "/calls/{call}"), ("GET", "/metrics"), ("GET", "/legs/ended"),
        ("GET", "/records"), ("GET", "/instances"), ("GET", "/calls?scope=cluster"),
        ("GET", "/calls/{call}/recording"),
    ]
    CONTROL_ROUTES = [
        ("POST", "/calls/{call}/hangup"), ("POST", "/api/hangup"), ("POST", "/calls/{call}/play"),
        ("POST", "/calls/{call}/streams"), ("DELETE", "/calls/{call}/streams/MZ0"),
        ("POST", "/calls/{call}/recording"), ("DELETE", "/calls/{call}/recording"),
    ]

    def setUp(self) -> None:
        self.clock = Clock()
        self.registry = Registry()
        self.api = ControlAPI(
            self.registry, tokens=Tokens([(Scope.READ, READ), (Scope.CONTROL, CONTROL)]), clock=self.clock
        )
        self.stub = StubTreq(self.api.app.resource())
        self.call = str(uuid.uuid4())
        leg = AudioSocketProtocol(Role.VISITOR, self.registry, LegSettings(), self.clock, Pacer(self.clock))
        from twisted.internet.testing import StringTransport

        leg.makeConnection(StringTransport())
        leg.dataReceived(encode_uuid(uuid.UUID(self.call)))

    def status(self, method: str, path: str, token: str | None) -> tuple[int, Any]:
        headers = {} if token is None else {"Authorization": f"Bearer {token}"}
        body: dict[str, Any] = {}
        if path == "/api/hangup":
            body = {"json": {"call_id": self.call}}
        elif path.endswith("/streams"):
            body = {"json": {"url": "ws://127.0.0.1:9/", "mode": "listen"}}
        elif path.endswith("/play"):
            body = {"data": b"\x00\x00" * 160, "headers": {**headers, "Content-Type": "audio/L16;rate=8000"}}
            headers = body.pop("headers")
        response = self.successResultOf(
            self.stub.request(method, "http://api" + path.format(call=self.call), headers=headers, **body)
        )
        content = self.successResultOf(response.content())
        return response.code, content

    def test_table(self) -> None:
        for method, path in self.READ_ROUTES + self.CONTROL_ROUTES:
            control = (method, path) in self.CONTROL_ROUTES
            for token, allowed in [(None, False), ("wrong", False), (READ, not control), (CONTROL, True)]:
                code, content = self.status(method, path, token)
                if token in (None, "wrong"):
                    self.assertEqual(code, 401, (method, path, token))
                elif not allowed:
                    self.assertEqual(code, 403, (method, path, token))
                    error = json.loads(content)["error"]
                    self.assertEqual(error["code"], "forbidden")
                    self.assertNotIn(READ, error["message"])
                else:
                    self.assertNotIn(code, (401, 403), (method, path, token, content))
        self.assertEqual(self.status("GET", "/health", None)[0], 200)

    def test_tokensFile(self) -> None:
        tokens = Tokens.parse("# comment\nread abc\n\nCONTROL def  # trailing\n")
        self.assertEqual(tokens.counts(), {"read": 1, "control": 1})
        self.assertIs(tokens.scope_of("abc"), Scope.READ)
        self.assertIs(tokens.scope_of("def"), Scope.CONTROL)
        self.assertIsNone(tokens.scope_of("ab"))
        for broken in ("read", "write abc", "read abc extra"):
            with self.assertRaises(TokenFileError) as raised:
                Tokens.parse(f"read fine\n{broken}\n", "tokens")
            self.assertIn("tokens, line 2", str(raised.exception))
            self.assertNotIn("abc", str(raised.exception))  # never a token in a message
        for empty in ("", "# only a comment\n\n"):  # no token would mean no check: refused
            with self.assertRaisesRegex(TokenFileError, "holds no token"):
                Tokens.parse(empty, "tokens")


@pytest_twisted.ensureDeferred
async def test_tokens_file_is_reloaded_on_sighup(spawn: Any, tmp_path: Path, logs: LogCapture) -> None:
    """A token added works, one removed gets 401, a broken file keeps the old ones; never a token in the log."""
    tokens = tmp_path / "tokens"
    tokens.write_text("read first-token\n")
    child, ports = await start_server(spawn, "--api-tokens-file", str(tokens))
    base = f"http://127.0.0.1:{ports['http']}"

    async def status(token: str) -> int:
        response = await treq.get(f"{base}/calls", headers={"Authorization": f"Bearer {token}"}, persistent=False)
        await response.content()
        return response.code

    assert await status("first-token") == 200
    assert await status("second-token") == 401
    tokens.write_text("# rotated\nread second-token\ncontrol third-token\n")
    child.signal("HUP")
    await until(lambda: "API tokens reloaded" in child.log, 10, "the reload")
    assert "1 read, 1 control" in child.log
    assert await status("second-token") == 200
    assert await status("first-token") == 401
    tokens.write_text("read\n")
    child.signal("HUP")
    await until(lambda: "API tokens not reloaded" in child.log, 10, "the refused reload")
    assert await status("second-token") == 200
    for secret in ("first-token", "second-token", "third-token"):
        assert secret not in child.output
    child.signal("TERM")
    await child.exit()


# 5. Failed authentication


class ThrottleTests(SynchronousTestCase):
    def test_window(self) -> None:
        throttle = AuthThrottle(limit=20, window=60.0)
        for second in range(21):
            self.assertIsNone(throttle.retry_after("192.0.2.1", second * 0.5))
            throttle.failed("192.0.2.1", second * 0.5)
        self.assertEqual(throttle.retry_after("192.0.2.1", 10.0), 50.0)
        self.assertEqual(AuthThrottle.header(49.2), "50")
        self.assertIsNone(throttle.retry_after("192.0.2.2", 10.0))  # another address
        self.assertIsNone(throttle.retry_after("192.0.2.1", 60.0))  # the window has passed

    def test_sprayIsBounded(self) -> None:
        """10,000 distinct addresses failing, at the request level: the table stays within its bound."""
        clock = Clock()
        api = ControlAPI(Registry(), api_token="right", clock=clock)
        bound = api.throttle.max_addresses
        self.assertLess(bound, 10_000)
        for index in range(10_000):
            request = DummyRequest([b"calls"])
            request.client = IPv4Address("TCP", f"10.{index >> 16 & 255}.{index >> 8 & 255}.{index & 255}", 4000)
            request.requestHeaders.setRawHeaders(b"authorization", [b"Bearer wrong"])
            with self.assertRaises(ApiError):
                api.authorize(request, Scope.READ)
        self.assertEqual(len(api.throttle), bound)
        # The newest are remembered, the oldest forgotten first.
        self.assertEqual(api.throttle.retry_after("10.0.39.15", clock.seconds()), None)
        self.assertIn("10.0.39.15", api.throttle._failures)
        self.assertNotIn("10.0.0.0", api.throttle._failures)


@pytest_twisted.ensureDeferred
async def test_failed_authentication_is_throttled(make_server: Any, logs: LogCapture) -> None:
    """21 bad tokens from one address, then 429 with Retry-After; /health answers; another address is unaffected."""
    server = await make_server(api_token="right-token")
    port = server.service.getServiceNamed("http").port.getHost().port
    for attempt in range(21):
        response = await treq.get(f"{server.url}/calls", headers={"Authorization": "Bearer wrong"}, persistent=False)
        assert response.code == 401, attempt
        await response.content()
    response = await treq.get(f"{server.url}/calls", headers={"Authorization": "Bearer right-token"}, persistent=False)
    assert response.code == 429
    retry = int(response.headers.getRawHeaders("retry-after")[0])
    assert 1 <= retry <= 60
    assert (await response.json())["error"]["code"] == "too_many_failures"
    health = await treq.get(f"{server.url}/health", persistent=False)
    assert health.code == 200
    await health.content()
    other = await raw(port, "127.0.0.2", b"GET /calls HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer right-token\r\n"
                                         b"Connection: close\r\n\r\n")
    assert other.received.startswith(b"HTTP/1.1 200 ")


# 6. TLS


@pytest_twisted.ensureDeferred
async def test_api_over_tls(make_server: Any, tmp_path: Path, logs: LogCapture) -> None:
    certificate = self_signed(tmp_path)
    server = await make_server(http=certificate.endpoint(), api_token="tls-token")
    port = server.service.getServiceNamed("http").port.getHost().port
    client = HTTPClient(Agent(reactor, contextFactory=certificate.trusting_policy()))
    response = await client.get(
        f"https://localhost:{port}/calls", headers={"Authorization": "Bearer tls-token"}, timeout=10
    )
    assert response.code == 200
    assert await response.json() == {"calls": []}
    untrusting = HTTPClient(Agent(reactor))  # the system's trust store knows nothing of it
    with pytest.raises(ResponseNeverReceived) as raised:
        await untrusting.get(f"https://localhost:{port}/health", timeout=10)
    assert "certificate verify failed" in str(raised.value.reasons[0].value)

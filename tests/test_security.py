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
from typing import Any, cast

import pytest
import pytest_twisted
import treq
from treq.client import HTTPClient
from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import Clock
from twisted.logger import LogLevel
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import Agent, ResponseNeverReceived
from twisted.web.test.requesthelper import DummyRequest

from audiohangup.audio import LegSettings
from audiohangup.http.access import AuthThrottle, Scope, TokenFileError, Tokens
from audiohangup.http.api import ControlAPI
from audiohangup.http.errors import ApiError
from audiohangup.pacer import Pacer
from audiohangup.protocol import AudioSocketProtocol
from audiohangup.reasons import CloseReason, Role
from audiohangup.registry import Registry
from audiohangup.sources import SourceACL, is_loopback, parse_networks
from audiohangup.wire import HANGUP_FRAME, Kind, encode_frame, encode_uuid
from tests.conftest import LogCapture, Server, bridged, until
from tests.fake_asterisk import FakeAsterisk, connect
from tests.tls import self_signed
from tests.twistd_child import LOOPBACK, Child, listening_ports, start_server, twistd_script

READ, CONTROL = "r3ad-token", "c0ntrol-token"


def marked(number: int) -> bytes:
    """An audio frame whose samples say which frame it is."""
    return encode_frame(Kind.SLIN, number.to_bytes(2, "little") * 160)


def numbers(client: FakeAsterisk) -> list[int]:
    """The marked frames a client received (silence, all zeros, is not one)."""
    return [
        int.from_bytes(frame.payload[:2], "little")
        for frame in client.frames
        if frame.kind == Kind.SLIN and frame.payload[:2] != b"\x00\x00"
    ]


async def metric(server: Server, name: str, **labels: str) -> float:
    return server.service.api.metrics.get_sample_value(name, labels) or 0.0


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
@pytest.mark.parametrize("extra", [["--insecure-http"], ["--api-token", "t0ken-t0ken-t0ken"]])
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
    (tmp_path / "empty-tokens").chmod(0o600)
    (tmp_path / "open-tokens").write_text("control abcdefghijklmnopq\n")
    (tmp_path / "open-tokens").chmod(0o644)
    for args, reason in [
        (["--http", "tcp:0", "--api-tokens-file", str(tmp_path / "empty-tokens")], "holds no token"),
        (["--api-tokens-file", str(tmp_path / "open-tokens")], "mode 0644 lets others read the tokens"),
        (["--call-records", str(tmp_path / "missing" / "calls.sqlite3")], "does not exist"),
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
        tokens = Tokens.parse(
            "# comment\nread abcdefghijklmnop\n\n  # indented comment\nCONTROL Zq#9f3k-0123456789\n", "tokens"
        )
        self.assertEqual(tokens.counts(), {"read": 1, "listen": 0, "control": 1})
        self.assertIs(tokens.scope_of("abcdefghijklmnop"), Scope.READ)
        # A # inside a token is part of it: the token is not cut down to "Zq".
        self.assertIs(tokens.scope_of("Zq#9f3k-0123456789"), Scope.CONTROL)
        self.assertIsNone(tokens.scope_of("Zq"))
        for broken in ("read", "write abcdefghijklmnop", "read abcdefghijklmnop extra",
                       "read abcdefghijklmnop # a comment after a token"):
            with self.assertRaises(TokenFileError) as raised:
                Tokens.parse(f"read fine-fine-fine-fine\n{broken}\n", "tokens")
            self.assertIn("tokens, line 2", str(raised.exception))
            self.assertNotIn("abcdefghijklmnop", str(raised.exception))  # never a token in a message
        for empty in ("", "# only a comment\n\n"):  # no token would mean no check: refused
            with self.assertRaisesRegex(TokenFileError, "holds no token"):
                Tokens.parse(empty, "tokens")

    def test_shortTokens(self) -> None:
        """A token under 16 characters is refused with its line, never itself."""
        for short in ("x", "Zq", "fifteen-chars.."):
            with self.assertRaises(TokenFileError) as raised:
                Tokens.parse(f"# tokens\ncontrol sixteen-chars-ok\nread {short}\n", "tokens")
            message = str(raised.exception)
            self.assertIn("tokens, line 3: a token must be at least 16 characters", message)
            self.assertNotIn(short, message.replace("tokens", ""))
        self.assertTrue(Tokens.parse("read sixteen-chars-ok\n"))

    def test_tokensFileMode(self) -> None:
        """A tokens file group or others may read is refused, naming its mode, unless insecure is given."""
        import os
        import shutil
        import tempfile

        folder = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, folder)
        path = os.path.join(folder, "tokens")
        with open(path, "w") as file:
            file.write("control abcdefghijklmnop\n")
        for mode in (0o644, 0o660, 0o602, 0o700 | 0o004):
            os.chmod(path, mode)
            with self.assertRaises(TokenFileError) as raised:
                Tokens.load(path)
            self.assertIn(f"mode {mode & 0o777:04o}", str(raised.exception))
            self.assertNotIn("abcdefghijklmnop", str(raised.exception))
            self.assertIs(Tokens.load(path, insecure=True).scope_of("abcdefghijklmnop"), Scope.CONTROL)
        # The owner's alone, or shared with a group that may only read (root:audiohangup 0640).
        for mode in (0o600, 0o400, 0o640, 0o440):
            os.chmod(path, mode)
            self.assertIs(Tokens.load(path).scope_of("abcdefghijklmnop"), Scope.CONTROL)


@pytest_twisted.ensureDeferred
async def test_tokens_file_is_reloaded_on_sighup(spawn: Any, tmp_path: Path, logs: LogCapture) -> None:
    """
    A token added works, one removed gets 401, a broken file or one others
    may read keeps the old ones; never a token in the log.
    """
    first, second, third = "first-token-0123456", "second-token-012345", "third-token-0123456"
    tokens = tmp_path / "tokens"
    tokens.write_text(f"read {first}\n")
    tokens.chmod(0o600)
    child, ports = await start_server(spawn, "--api-tokens-file", str(tokens))
    base = f"http://127.0.0.1:{ports['http']}"

    async def status(token: str) -> int:
        response = await treq.get(f"{base}/calls", headers={"Authorization": f"Bearer {token}"}, persistent=False)
        await response.content()
        return response.code

    assert await status(first) == 200
    assert await status(second) == 401
    tokens.write_text(f"# rotated\nread {second}\ncontrol {third}\n")
    child.signal("HUP")
    await until(lambda: "API tokens reloaded" in child.log, 10, "the reload")
    assert "1 read, 0 listen, 1 control" in child.log
    assert await status(second) == 200
    assert await status(first) == 401
    tokens.write_text("read\n")
    child.signal("HUP")
    await until(lambda: "API tokens not reloaded" in child.log, 10, "the refused reload")
    assert await status(second) == 200
    tokens.write_text(f"read {first}\n")
    tokens.chmod(0o644)
    child.signal("HUP")
    await until(lambda: "mode 0644 lets others read the tokens" in child.log, 10, "the reload refused for the mode")
    assert await status(second) == 200
    assert await status(first) == 401
    for secret in (first, second, third):
        assert secret not in child.output
    child.signal("TERM")
    await child.exit()


# 5. Failed authentication


class ThrottleTests(SynchronousTestCase):
    def fail_from(self, api: ControlAPI, client: IPv4Address | IPv6Address) -> None:
        """One request with a wrong token from C{client}: a 401."""
        request = DummyRequest([b"calls"])
        request.client = client
        request.requestHeaders.setRawHeaders(b"authorization", [b"Bearer wrong"])
        with self.assertRaises(ApiError):
            api.authorize(request, Scope.READ)

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
            self.fail_from(api, IPv4Address("TCP", f"10.{index >> 16 & 255}.{index >> 8 & 255}.{index & 255}", 4000))
        self.assertEqual(len(api.throttle), bound)
        # The newest are remembered, the oldest forgotten first.
        self.assertEqual(api.throttle.retry_after("10.0.39.15", clock.seconds()), None)
        self.assertIn("10.0.39.15", api.throttle)
        self.assertNotIn("10.0.0.0", api.throttle)

    def test_lockedSourceIsNeverEvicted(self) -> None:
        """
        A locked source stays locked while 10,000 others fail once each (the
        issue's way around the throttle: evict the locked entry).
        """
        throttle = AuthThrottle(limit=20, window=60.0, max_addresses=64)
        for _ in range(21):
            throttle.failed("192.0.2.1", 0.0)
        for index in range(10_000):
            throttle.failed(f"10.{index >> 16 & 255}.{index >> 8 & 255}.{index & 255}", 1.0)
            self.assertLessEqual(len(throttle), 64)
        self.assertEqual(throttle.retry_after("192.0.2.1", 1.0), 59.0)
        self.assertIsNone(throttle.retry_after("192.0.2.1", 60.0))  # until the window has passed

    def test_everyEntryLocked(self) -> None:
        """
        A table full of locked sources: the sources outside it share one
        budget of 20 failures, so guesses stay bounded; known sources keep theirs.
        """
        throttle = AuthThrottle(limit=20, window=60.0, max_addresses=3)
        for source in ("192.0.2.1", "192.0.2.2", "192.0.2.3"):
            for _ in range(21):
                throttle.failed(source, 0.0)
        for index in range(20):
            throttle.failed(f"198.51.100.{index}", 1.0)
            self.assertIsNone(throttle.retry_after("203.0.113.1", 1.0), index)
        throttle.failed("198.51.100.99", 2.0)
        self.assertEqual(len(throttle), 3)
        self.assertEqual(throttle.retry_after("203.0.113.1", 2.0), 59.0)  # any new source waits
        self.assertEqual(throttle.retry_after("192.0.2.2", 2.0), 58.0)  # the locked ones still are
        # The locks run out: the table frees up, and the shared budget at most a window later.
        self.assertIsNone(throttle.retry_after("192.0.2.2", 60.0))
        throttle.failed("203.0.113.1", 60.0)
        self.assertIn("203.0.113.1", throttle)
        self.assertIsNone(throttle.retry_after("203.0.113.1", 60.0))
        self.assertIsNone(throttle.retry_after("203.0.113.2", 61.0))

    def test_sourceKey(self) -> None:
        """IPv6 by /64, loopback as one host, IPv4-mapped as IPv4, X-Forwarded-For only from a trusted proxy."""
        from audiohangup.http.access import source_key

        self.assertEqual(source_key("2001:db8:1:2:aaaa::1"), "2001:db8:1:2::/64")
        self.assertEqual(source_key("2001:db8:1:2:ffff:ffff:ffff:ffff"), "2001:db8:1:2::/64")
        self.assertEqual(source_key("2001:db8:1:3::1"), "2001:db8:1:3::/64")
        self.assertEqual(source_key("fe80::1%eth0"), "fe80::/64")
        for loopback in ("127.0.0.1", "127.0.0.2", "::1", "::ffff:127.0.0.1"):
            self.assertEqual(source_key(loopback), "loopback", loopback)
        self.assertEqual(source_key("::ffff:192.0.2.7"), "192.0.2.7")
        self.assertEqual(source_key("192.0.2.7", ["198.51.100.1"]), "192.0.2.7")  # not a proxy of ours
        proxies = parse_networks("10.0.0.0/8, 2001:db8:ffff::/48")
        for forwarded, expected in [
            ([], "10.0.0.1"),  # the proxy's own request
            (["198.51.100.7"], "198.51.100.7"),
            (["203.0.113.9, 198.51.100.7"], "198.51.100.7"),  # the client wrote the left one
            (["203.0.113.9", "198.51.100.7, 10.0.0.2"], "198.51.100.7"),  # two proxies, two headers
            (["2001:db8:5::1"], "2001:db8:5::/64"),
            (["2001:db8:ffff::9, 10.0.0.3"], "2001:db8:ffff::/64"),  # every hop ours: the left-most
            (["not-an-address, 10.0.0.3"], "10.0.0.3"),  # garbage left of our proxies: the last proxy
            ([" 198.51.100.8 ,10.0.0.3 "], "198.51.100.8"),
        ]:
            self.assertEqual(source_key("10.0.0.1", forwarded, proxies), expected, forwarded)
        self.assertEqual(source_key("192.0.2.7", ["198.51.100.7"], proxies), "192.0.2.7")
        # A hop with the port some proxies add (Azure's front door) is still its address.
        self.assertEqual(source_key("10.0.0.1", ["198.51.100.7:5678"], proxies), "198.51.100.7")
        self.assertEqual(source_key("10.0.0.1", ["[2001:db8:5::1]:5678"], proxies), "2001:db8:5::/64")

    def test_sameSiteIPv6SharesALock(self) -> None:
        """21 failures spread over one /64 lock the whole /64, at the request level."""
        api = ControlAPI(Registry(), api_token="right-token-0123456", clock=Clock())
        for index in range(21):
            self.fail_from(api, IPv6Address("TCP", f"2001:db8::{index + 1:x}", 4000))
        self.assertIsNotNone(api.throttle.retry_after("2001:db8::/64", 0.0))


async def fail_21_times(url: str, **headers: str) -> None:
    for attempt in range(21):
        response = await treq.get(
            f"{url}/calls", headers={"Authorization": "Bearer wrong", **headers}, persistent=False
        )
        assert response.code == 401, attempt
        await response.content()


@pytest_twisted.ensureDeferred
async def test_failed_authentication_is_throttled(make_server: Any, logs: LogCapture) -> None:
    """
    21 bad tokens from one host, then 429 with Retry-After, even with the
    right token (see the README); /health answers; every loopback address
    is the same host (127.0.0.2 is no way around it).
    """
    server = await make_server(api_token="right-token")
    port = server.service.getServiceNamed("http").port.getHost().port
    await fail_21_times(server.url)
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
    assert other.received.startswith(b"HTTP/1.1 429 ")


@pytest_twisted.ensureDeferred
async def test_throttle_behind_a_trusted_proxy(make_server: Any, logs: LogCapture) -> None:
    """
    Behind --trusted-proxies the client its X-Forwarded-For names is
    throttled, not the proxy: one client's failures lock it alone, and what
    it writes into the header itself does not get it out.
    """
    server = await make_server(api_token="right-token", trusted_proxies=parse_networks("127.0.0.1"))
    right = {"Authorization": "Bearer right-token"}

    async def code(forwarded: str) -> int:
        response = await treq.get(f"{server.url}/calls", headers={**right, "X-Forwarded-For": forwarded},
                                  persistent=False)
        await response.content()
        return response.code

    await fail_21_times(server.url, **{"X-Forwarded-For": "198.51.100.7"})
    assert await code("198.51.100.7") == 429
    assert await code("203.0.113.1, 198.51.100.7") == 429  # a spoofed hop left of the proxy's changes nothing
    assert await code("198.51.100.8") == 200  # another client of the same proxy
    assert await code("198.51.100.7, 198.51.100.8") == 200  # what the proxy wrote is what counts
    untrusted = await make_server(api_token="right-token")  # no --trusted-proxies: the header is not believed
    await fail_21_times(untrusted.url, **{"X-Forwarded-For": "198.51.100.7"})
    response = await treq.get(f"{untrusted.url}/calls", headers={**right, "X-Forwarded-For": "198.51.100.8"},
                              persistent=False)
    assert response.code == 429
    await response.content()


def unix_socket_path() -> str:
    """A short path for a UNIX socket (107 bytes at most), in a folder of its own."""
    import tempfile

    return f"{tempfile.mkdtemp(prefix='ah-', dir='/tmp')}/api.sock"


async def over_unix(path: str, request: bytes) -> bytes:
    """Send C{request} on a new connection to the UNIX socket, and read to the end."""
    from twisted.internet.endpoints import UNIXClientEndpoint

    client = await connectProtocol(UNIXClientEndpoint(reactor, path), RawClient(request))
    await client.closed.addTimeout(10, reactor)
    return client.received


@pytest_twisted.ensureDeferred
async def test_unix_socket_api_is_not_throttled(make_server: Any, logs: LogCapture) -> None:
    """
    Every client of a UNIX socket has the same (no) address: 21 failures
    there must not lock every one of them out. The socket's file mode says
    who may connect; the throttle leaves it be.
    """
    path = unix_socket_path()
    server = await make_server(http=f"unix:{path}", api_token="right-token")
    for attempt in range(25):
        answer = await over_unix(path, b"GET /calls HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer wrong\r\n"
                                       b"Connection: close\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 401 "), (attempt, answer)
    answer = await over_unix(path, b"GET /calls HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer right-token\r\n"
                                   b"Connection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 "), answer
    assert len(server.api.throttle) == 0


@pytest_twisted.ensureDeferred
async def test_http10_without_host_on_a_unix_socket(make_server: Any, logs: LogCapture) -> None:
    """
    HTTP/1.0 needs no Host header, and a UNIX socket has no host name:
    answered as any request (it was a 500 with a critical traceback).
    """
    path = unix_socket_path()
    await make_server(http=f"unix:{path}", api_token="right-token")
    for request, status in [
        (b"GET /health HTTP/1.0\r\n\r\n", b"200"),
        (b"GET /calls HTTP/1.0\r\nAuthorization: Bearer right-token\r\n\r\n", b"200"),
        (b"GET /calls HTTP/1.0\r\n\r\n", b"401"),
        (b"GET /nowhere HTTP/1.0\r\n\r\n", b"404"),
    ]:
        answer = await over_unix(path, request)
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.0 " + status + b" "), (request, answer)
        assert b"content-type: application/json" in head.lower(), answer
        json.loads(body)
    # UNIX-socket clients name any host (curl's "unix", requests-unixsocket's quoted path): no
    # page can reach the socket, so no name is refused there.
    for host in (b"unix", b"%2Ftmp%2Fah%2Fapi.sock", b"docker"):
        answer = await over_unix(path, b"GET /calls HTTP/1.1\r\nHost: " + host + b"\r\n"
                                       b"Authorization: Bearer right-token\r\nConnection: close\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 200 "), (host, answer)


@pytest_twisted.ensureDeferred
async def test_forged_forwarding_is_refused(make_server: Any, logs: LogCapture) -> None:
    """
    On a standalone instance, a control token's holder cannot pass its
    hangup off as a session's end with the cluster's headers: 403, and the
    call is untouched; without them the hangup is an API hangup.
    """
    server = await make_server(api_token="right-token")
    call_id, visitor, resident = await bridged(server)
    forged = {"Authorization": "Bearer right-token", "X-Audiohangup-Forwarded-By": "b",
              "X-Audiohangup-Cause": "session"}
    response = await treq.post(f"{server.url}/calls/{call_id}/hangup", headers=forged, persistent=False)
    assert response.code == 403
    assert (await response.json())["error"]["code"] == "bad_forwarding"
    assert len(server.registry) == 2 and visitor.hangup_frames == resident.hangup_frames == 0
    response = await treq.post(f"{server.url}/calls/{call_id}/hangup?wait=true",
                               headers={"Authorization": "Bearer right-token", "X-Audiohangup-Cause": "session"},
                               persistent=False)
    assert response.code == 200
    await response.content()
    await until(lambda: len(logs.ended(str(call_id))) == 2, what="both legs to end")
    assert {event["cause"] for event in logs.ended(str(call_id))} == {"api"}


class ForwardingSignatureTests(SynchronousTestCase):
    """What one instance signs, another of the same cluster (same --api-token) takes; nothing else does."""

    def test_signature(self) -> None:
        from audiohangup.cluster.forward import CAUSE, FORWARDED_BY, SIGNATURE, Cluster

        sent: dict[str, Any] = {}

        class Directory:
            instance_id = "a"

        clock = Clock()
        clock.advance(1_700_000_000)

        def cluster(token: str | None) -> Cluster:
            return Cluster(Directory(), cast(Any, clock), api_token=token)  # type: ignore[arg-type]

        sender = cluster("cluster-token-0123")
        import treq as treq_module

        def request(method: str, url: str, **kwargs: Any) -> Deferred[Any]:
            sent.update(kwargs["headers"])
            return Deferred()

        self.patch(treq_module, "request", request)
        Deferred.fromCoroutine(
            sender.forward("http://b", "b", b"POST", b"/calls/x/hangup?role=visitor", b"", {CAUSE: "session"})
        )
        self.assertEqual(sent[FORWARDED_BY], "a")
        args = ("a", sent[SIGNATURE], b"POST", b"/calls/x/hangup?role=visitor", "session", b"")
        self.assertTrue(cluster("cluster-token-0123").verified(*args))
        self.assertFalse(cluster("another-token-0123").verified(*args))
        self.assertFalse(cluster(None).verified(*args))
        receiver = cluster("cluster-token-0123")
        for changed in [
            ("b", *args[1:]), (*args[:2], b"DELETE", *args[3:]), (*args[:3], b"/calls/y/hangup?role=visitor", *args[4:]),
            (*args[:4], "api", b""), (*args[:5], b"{}"), (args[0], None, *args[2:]), (args[0], "t=1,sha256=00", *args[2:]),
        ]:
            self.assertFalse(receiver.verified(*changed), changed)
        clock.advance(301)  # a replay later than five minutes
        self.assertFalse(receiver.verified(*args))


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

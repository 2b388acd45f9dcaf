"""
Coverage-guided fuzz target (atheris) for the HTTP API's input validation.

The Klein app of a C{ControlAPI} is driven through C{treq.testing.StubTreq}
(no sockets), served by the API's own C{ApiSite} (body bounds, request
counting) rather than the plain C{Site} StubTreq builds. Each input becomes
one to three requests, whose method, path (a route with fuzz-chosen call
ids, or a fuzz-chosen path), query string, C{Content-Type}, C{Authorization}
and cluster forwarding headers and body all come from the fuzz bytes,
against a registry holding a visitor and a resident leg of one call and a
lone visitor leg of another, each on a C{StringTransport}. Routes:
C{/calls}, C{/calls/<id>}, C{/calls/<id>/hangup}, C{/calls/<id>/play},
C{/api/hangup}, C{/health}, C{/legs/ended}, C{/instances} and C{/records}
(a real C{CallRecords} on C{:memory:}, its thread pool replaced by direct
calls so everything stays synchronous). C{/}, C{/static/...} and
C{/metrics}, which answer HTML, CSS, JavaScript or Prometheus text by
design, are never asked for (a fuzz path the server reads as one of them,
like C{/;x}, may answer a page file, byte for byte).

Checked for every answer:

- the status is below 500, and one of those the README documents (200, 400,
  401, 404, 405, 413);
- the body is JSON (C{Content-Type: application/json}), and an error is
  C{{"error": {"code": str, "message": str}}};
- nothing is logged as a failure (a traceback);
- the legs' wires hold whole frames, at most one C{00 00 00} and nothing
  after it; a request that waits (C{wait=true}) is answered once Twisted
  delivers the legs' ends, which the harness does as a real transport would.

Run (see fuzz/README.rst)::

    python fuzz/fuzz_http.py -runs=20000 -artifact_prefix=/tmp/
    python fuzz/fuzz_http.py -max_total_time=120 /tmp/corpus/http

Known product issues can be tolerated by name while they are open, so a
long run explores past them, e.g. C{FUZZ_HTTP_TOLERATE=deep_json,redirect}
(the names are in C{KNOWN_ISSUES}). Unset, every check is strict.

Importable without atheris: C{TestOneInput(data)} is plain Python.
"""

from __future__ import annotations

import json
import os
import uuid
from importlib import resources
from typing import Any, cast
from urllib.parse import quote

import harness
from harness import Wire

with harness.instrumented(__name__):
    from prometheus_client import CollectorRegistry
    from treq.testing import StubTreq
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred, ensureDeferred, maybeDeferred
    from twisted.internet.error import ConnectionAborted, ConnectionDone, ConnectionLost
    from twisted.internet.task import Clock
    from twisted.python.failure import Failure

    from audiohangup.audio import FORMATS, LegSettings
    from audiohangup.events import RecentLegs
    from audiohangup.http.access import AuthThrottle, Scope, Tokens
    from audiohangup.http.api import ControlAPI
    from audiohangup.http.site import ApiSite
    from audiohangup.pacer import Pacer
    from audiohangup.protocol import AudioSocketProtocol
    from audiohangup.reasons import CloseReason, HangupCause, LegState, Role
    from audiohangup.records import CallRecords
    from audiohangup.registry import Registry
    from audiohangup.streams.manager import StreamConfig, Streams
    from audiohangup.wire import HANGUP_FRAME, FrameDecoder, Kind, encode_uuid

CALL = "0b8a1f9e-5c2d-4e3f-8a7b-6c5d4e3f2a1b"
LONE = "7d6c5b4a-3f2e-4d1c-9b0a-f9e8d7c6b5a4"
UNKNOWN = "11111111-2222-4333-8444-555555555555"
TOKEN = "s3cret-token-of-the-fuzzer"

#: Issues found by this target, tolerated only when named in FUZZ_HTTP_TOLERATE.
KNOWN_ISSUES = {
    # A path whose %-escapes are not UTF-8 (GET /calls/%C3%28) gets Klein's own
    # 400 "Non-UTF-8 encoding in URL." as text/html, and Klein log.err()s it.
    "non_utf8_path",
    # A JSON body nested deeper than the recursion limit ("[" * 5000) makes
    # json.loads raise RecursionError, not ValueError: 500 and a traceback.
    "deep_json",
    # A path with an empty segment (/calls//hangup) gets werkzeug's 308
    # redirect (merge_slashes) as a JSON error without a Location header.
    "redirect",
    # A POST with a body whose Content-Type holds a byte that is a line break
    # to str.splitlines (0x85, 0x0b, 0x0c, 0x1c-0x1e) makes Twisted's form
    # parsing (Request.requestReceived, _parseContentType) raise ValueError
    # out of the channel's dataReceived: no answer, an unhandled error.
    "content_type_linebreak",
}
TOLERATED = {name for name in os.environ.get("FUZZ_HTTP_TOLERATE", "").split(",") if name}
assert TOLERATED <= KNOWN_ISSUES, f"unknown names in FUZZ_HTTP_TOLERATE: {TOLERATED - KNOWN_ISSUES}"

DOCUMENTED_STATUSES = {200, 400, 401, 403, 404, 405, 413, 421}

SETTINGS = [
    LegSettings(),  # slin, audio/L16;rate=8000
    LegSettings(audio=FORMATS["ulaw"], max_queue_ms=200),
    LegSettings(audio=FORMATS["slin16"], max_queue_ms=100, playout_timeout=1.0),
]

METHODS = ["GET", "POST", "POST", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "FOO"]

CALL_FORMS = [
    CALL,
    CALL.upper(),
    "{" + CALL + "}",
    "urn:uuid:" + CALL,
    CALL.replace("-", ""),
    LONE,
    UNKNOWN,
    CALL[:-1],
    "",
]

ROUTES = [
    "/calls/{id}",
    "/calls/{id}/hangup",
    "/calls/{id}/hangup",
    "/calls/{id}/play",
    "/calls/{id}/play",
    "/api/hangup",
    "/api/hangup",
    "/calls",
    "/health",
    "/legs/ended",
    "/records",
    "/instances",
    None,  # a fuzz-chosen path
]

QUERY_KEYS = ["role", "wait", "after_playout", "limit", "since", "until", "call_id", "reason", "cursor", "scope", "x"]
QUERY_VALUES = [
    "visitor", "resident", "true", "false", "1", "0", "yes", "no", "", "TRUE", "20", "500", "501",
    "-1", "1e3", "nan", "inf", "2026-11-28T00:00:00Z", "2026-11-28", "1764288000", "hangup_reset",
    "server_lost", CALL, "MS4wOjE", "bad cursor", "local", "cluster",
]

CONTENT_TYPES = [
    None,
    "application/json",
    "audio/L16;rate=8000",
    "audio/L16; rate=8000; channels=1",
    "audio/L16;rate=8000;channels=2",
    "audio/l16;rate=16000",
    'AUDIO/L16; RATE="8000"',
    "audio/PCMU",
    "audio/basic",
    "audio/pcma",
    "text/plain",
    ";;=;",
]

AUTHORIZATIONS = [None, "Bearer " + TOKEN, "bearer  " + TOKEN + " ", "Bearer wrong", "Basic abc", "Bearer"]

#: The headers one instance of a cluster adds when it forwards a request.
FORWARDED = [None, None, "instance-b"]
CAUSES = [None, "api", "session", "shutdown", "SESSION"]
#: Host and Origin headers: served, foreign (DNS rebinding, another site's page) and malformed.
HOSTS: list[str | None] = [None, None, "localhost:8080", "127.0.0.1", "[::1]:8080", "rebound.example", "a b", ""]
ORIGINS: list[str | None] = [None, None, "http://localhost", "http://rebound.example", "null"]

JSON_VALUES: list[Any] = [
    "visitor", "resident", "Visitor", "", None, 0, 1.5, True, [], {}, ["visitor"], {"role": "visitor"},
    CALL, CALL.upper(), "{" + CALL + "}", LONE, UNKNOWN, "not-a-uuid", 12345678901234567890,
]


class Reader:
    """Fuzz bytes, consumed front to back; past the end every read is zero."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.index = 0

    def byte(self) -> int:
        if self.index >= len(self.data):
            return 0
        value = self.data[self.index]
        self.index += 1
        return value

    def pick(self, choices: list[Any]) -> Any:
        return choices[self.byte() % len(choices)]

    def blob(self, limit: int = 64) -> bytes:
        size = self.byte() % (limit + 1)
        value = self.data[self.index : self.index + size]
        self.index += size
        return value

    def text(self, limit: int = 64) -> str:
        return self.blob(limit).decode("utf-8", errors="replace")


class SyncRecords(CallRecords):
    """Call records whose SQLite work runs at once on the caller's thread."""

    def __init__(self, clock: Clock) -> None:
        super().__init__(":memory:", clock, keep_days=0)

        class NoPool:
            def start(self) -> None:
                pass

            def stop(self) -> None:
                pass

        self._pool = NoPool()  # type: ignore[assignment]

    def _run(self, work: Any, *args: Any) -> Deferred[Any]:
        return maybeDeferred(work, *args)


def _records() -> CallRecords:
    """One store for the process, holding a few ended and live legs."""
    clock = Clock()
    records = SyncRecords(clock)
    opened: list[Any] = []
    ensureDeferred(records.open()).addBoth(opened.append)
    assert opened and not isinstance(opened[0], Failure), opened
    registry = Registry()
    registry.events.add(records)
    for index, (call_id, role) in enumerate([(CALL, Role.VISITOR), (CALL, Role.RESIDENT), (LONE, Role.VISITOR)]):
        leg = AudioSocketProtocol(role, registry, LegSettings(), clock, Pacer(clock))
        leg.makeConnection(Wire(41000 + index))
        leg.dataReceived(encode_uuid(uuid.UUID(call_id)))
        clock.advance(1.5)
        if index < 2:
            leg.hangup(HangupCause.API)
            leg.connectionLost(Failure(ConnectionLost()))
    return records


RECORDS = _records()
RECENT = RecentLegs()
# The streams a server opens on the global reactor, as the API built them itself before the wiring passed them.
STREAMS = Streams(StreamConfig(), cast(Any, reactor))
API = ControlAPI(
    Registry(), settings=SETTINGS[0], recent=RECENT, records=RECORDS, metrics=CollectorRegistry(), streams=STREAMS
)
RESOURCE = API.app.resource()


class World:
    """The legs of one input: a fresh registry, clock and pacer each time."""

    def __init__(self, settings: LegSettings) -> None:
        # A StubTreq of its own: one kept for the process keeps every fake
        # connection it ever made, and memory grows. Its server is the API's
        # own Site (body bounds, request counting), not the plain Site
        # StubTreq would build.
        self.stub = StubTreq(RESOURCE)
        agent = self.stub._agent
        agent._serverFactory = ApiSite.forAPI(API, reactor=agent._memoryReactor)
        self.clock = Clock()
        self.pacer = Pacer(self.clock)
        self.registry = Registry()
        self.registry.events.add(RECENT)
        self.legs: list[tuple[AudioSocketProtocol, Wire]] = []
        for call_id, role in [(CALL, Role.VISITOR), (CALL, Role.RESIDENT), (LONE, Role.VISITOR)]:
            leg = AudioSocketProtocol(role, self.registry, settings, self.clock, self.pacer)
            wire = Wire(40000 + len(self.legs))
            leg.makeConnection(wire)
            leg.dataReceived(encode_uuid(uuid.UUID(call_id)))
            self.legs.append((leg, wire))

    def deliver_ends(self) -> None:
        """What Twisted would do next: end connections we closed or hung up."""
        for leg, wire in self.legs:
            if leg.state is LegState.CLOSED:
                continue
            if wire.disconnected:
                failure: Failure | None = Failure(ConnectionAborted())
            elif wire.disconnecting:
                failure = Failure(ConnectionDone())
            elif leg.state is LegState.CLOSING:
                failure = Failure(ConnectionLost())  # Asterisk resets after our hangup
            else:
                failure = None
            if failure is not None:
                wire.lost = True
                leg.connectionLost(failure)

    def check_wires(self) -> None:
        for leg, wire in self.legs:
            assert not wire.late, wire.late
            decoder = FrameDecoder()
            frames = decoder.feed(wire.value())
            assert decoder.buffered == 0 and len(frames) == len(wire.writes)
            kinds = [frame.kind for frame in frames]
            if Kind.HANGUP in kinds:
                assert kinds.count(Kind.HANGUP) == 1, "00 00 00 written twice"
                assert frames[-1].encode() == HANGUP_FRAME, "written after 00 00 00"
            if leg.state is LegState.CLOSED and leg.hangup_cause is not None and leg._decided is None:
                assert leg.close_reason in (
                    CloseReason.HANGUP_CLEAN, CloseReason.HANGUP_RESET, CloseReason.HANGUP_TIMEOUT
                )


def _segment(reader: Reader) -> str:
    """
    A fuzz path segment: percent-encoded, or raw printable ASCII (bad
    escapes, slashes and empty segments included).
    """
    text = reader.text(48)
    if reader.byte() & 1:
        return quote(text, safe="")
    return "".join(ch for ch in text if "!" <= ch <= "~" and ch not in "?#")


def _path(reader: Reader) -> str:
    route = reader.pick(ROUTES)
    if route is None:
        path = "/" + _segment(reader)
        if reader.byte() & 1:
            path += "/" + _segment(reader)
        # Pages and metrics answer other types by design: not asked for.
        if not path.strip("/") or path.lstrip("/").startswith(("static", "metrics")):
            path = "/nope" + path
        return path
    if "{id}" in route:
        form = reader.pick(CALL_FORMS + [None])
        call_id = _segment(reader) if form is None else form
        if not call_id:
            call_id = CALL
        route = route.replace("{id}", call_id)
    return route


def _query(reader: Reader) -> str:
    pairs = []
    for _ in range(reader.byte() % 5):
        key = reader.pick(QUERY_KEYS)
        value = reader.pick(QUERY_VALUES + [None])
        if value is None:
            value = reader.text(32)
        pairs.append(f"{quote(key, safe='')}={quote(value, safe='')}")
    return "&".join(pairs)


def _header(reader: Reader, choices: list[str | None]) -> str | bytes | None:
    value = reader.pick(choices + ["fuzz", "bytes"])
    if value == "fuzz":
        # Field characters only: control characters are the HTTP parser's
        # business (a 400 before any route), not the API's.
        value = "".join(ch for ch in reader.text(64) if " " <= ch <= "~")
    elif value == "bytes":
        # Raw bytes, obs-text (0x80-0xff) included: not always UTF-8.
        value = bytes(b for b in reader.blob(64) if b >= 0x20 and b != 0x7F)
    return value


def _body(reader: Reader) -> bytes | None:
    mode = reader.byte() % 6
    if mode == 0:
        return None
    if mode == 1:
        return reader.blob(256)
    if mode == 2:
        body: dict[str, Any] = {}
        for _ in range(reader.byte() % 4):
            key = reader.pick(["role", "call_id", "role", "call_id", "wait", ""])
            value = reader.pick(JSON_VALUES + [None, "text"])
            body[key] = reader.text(40) if value == "text" else value
        return json.dumps(body).encode()
    if mode == 3:
        # Repeated: sizes around the limits (64 KiB JSON, a queue's audio), deep nesting.
        unit = reader.blob(8) or b"["
        count = (reader.byte() << 8 | reader.byte()) % (70000 // len(unit) + 2)
        return unit * count
    if mode == 4:
        # Audio of a fuzz-chosen length, odd ones included.
        size = (reader.byte() << 8 | reader.byte()) % 20000
        return bytes([reader.byte()]) * size
    return reader.text(128).encode()


NON_UTF8_ANSWER = b"Non-UTF-8 encoding in URL."

#: The live page's files, which a path the server normalises to C{/} or
#: C{/static/<name>} (C{/;x}, say) rightly answers as they are.
PAGE_FILES = {
    resources.files("audiohangup.http").joinpath("web", name).read_bytes(): content_type
    for name, content_type in [
        ("index.html", "text/html; charset=utf-8"),
        ("app.js", "text/javascript; charset=utf-8"),
        ("style.css", "text/css; charset=utf-8"),
    ]
}


def _tolerated(event: dict[str, Any], code: int, body: bytes) -> bool:
    """A logged failure that is one of the known issues named in FUZZ_HTTP_TOLERATE."""
    failure = harness.failure_of(event)
    deep_json = "deep_json" in TOLERATED and code == 500 and failure.check(RecursionError)
    non_utf8 = (
        "non_utf8_path" in TOLERATED and code == 400 and body == NON_UTF8_ANSWER
        and failure.check(UnicodeDecodeError)
    )
    return bool(deep_json or non_utf8)


def _check(method: str, url: str, code: int, content_type: list[str] | None, body: bytes) -> None:
    where = f"{method} {url} -> {code} {content_type} {body[:200]!r}"
    page = (
        method in ("GET", "HEAD") and code == 200 and content_type is not None and len(content_type) == 1
        and content_type[0] in PAGE_FILES.values()
        and (method == "HEAD" or PAGE_FILES.get(body) == content_type[0])
    )
    if page:
        return
    if code == 400 and body == NON_UTF8_ANSWER and "non_utf8_path" in TOLERATED:
        return
    if code == 308 and "redirect" in TOLERATED:
        return
    if (
        code == 500 and "deep_json" in TOLERATED and b"internal_error" in body
        and harness.failures and all(harness.failure_of(event).check(RecursionError) for event in harness.failures)
    ):
        return
    assert code < 500, where
    assert code in DOCUMENTED_STATUSES, where
    assert content_type == ["application/json"], where
    if method == "HEAD":
        assert body == b"", where
        return
    answer = json.loads(body)
    assert isinstance(answer, dict), where
    if code >= 400:
        error = answer["error"]
        assert isinstance(error["code"], str) and error["code"], where
        assert isinstance(error["message"], str) and error["message"], where


def _settle(world: World, pending: Deferred[Any]) -> Any:
    """The answer, once the legs it waits for are gone (bounded)."""
    result: list[Any] = []
    pending.addBoth(result.append)
    world.stub.flush()
    for _ in range(40):
        if result:
            break
        world.clock.advance(0.5)
        world.deliver_ends()
        world.stub.flush()
    assert result, "a request was never answered"
    if isinstance(result[0], Failure):
        result[0].raiseException()
    return result[0]


def TestOneInput(data: bytes) -> None:
    del harness.failures[:]
    reader = Reader(data)
    flags = reader.byte()
    settings = SETTINGS[flags % len(SETTINGS)]
    world = World(settings)
    API.registry = world.registry
    API.settings = settings
    API.tokens = Tokens([(Scope.CONTROL, TOKEN)]) if flags & 0x10 else Tokens()
    API.throttle = AuthThrottle()  # each input starts with no failures on record
    if flags & 0x20:
        world.legs[2][0].hangup(HangupCause.API)  # the lone leg is already closing
    for _ in range(1 + (flags >> 6) % 3):
        method = reader.pick(METHODS)
        path = _path(reader)
        query = _query(reader)
        url = "http://localhost" + path + ("?" + query if query else "")
        headers: dict[str, list[str | bytes]] = {}
        content_type = _header(reader, CONTENT_TYPES)
        if content_type is not None:
            headers["Content-Type"] = [content_type]
        authorization = _header(reader, AUTHORIZATIONS)
        if authorization is not None:
            headers["Authorization"] = [authorization]
        forwarded, cause = reader.pick(FORWARDED), reader.pick(CAUSES)
        if forwarded is not None:
            headers["X-Audiohangup-Forwarded-By"] = [forwarded]
        if cause is not None:
            headers["X-Audiohangup-Cause"] = [cause]
        host, origin = _header(reader, HOSTS), _header(reader, ORIGINS)
        if host is not None:
            headers["Host"] = [host]
        if origin is not None:
            headers["Origin"] = [origin]
        body = _body(reader)
        try:
            pending = world.stub.request(method, url, headers=headers, data=body, allow_redirects=False)
        except ValueError as error:
            # StubTreq runs the server inside request(): this escaped the server's dataReceived.
            if "content_type_linebreak" in TOLERATED and "linefeed or carriage return" in str(error):
                return
            raise
        response = _settle(world, pending)
        content = _settle(world, response.content())
        _check(method, url, response.code, response.headers.getRawHeaders("content-type"), content)
        world.check_wires()
        unexpected = [event for event in harness.failures if not _tolerated(event, response.code, content)]
        assert not unexpected, [harness.failure_of(event).getTraceback() for event in unexpected]
        del harness.failures[:]
        world.clock.advance(reader.pick([0, 0.02, 1.0]))
        world.deliver_ends()
        world.check_wires()


if __name__ == "__main__":
    harness.main(TestOneInput)

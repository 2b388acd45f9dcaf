"""
Several instances behind one API: real C{twistd -n audiohangup} children on
loopback sharing one real redis-server, with fake Asterisk legs on each.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import pytest_twisted
import treq

from tests.conftest import until
from tests.fake_asterisk import FakeAsterisk, connect
from tests.redis_server import RedisServer, free_port
from tests.twistd_child import Child, Spawn, settle, start_server

HEARTBEAT = 0.3
TTL = 3 * HEARTBEAT
#: The control token the instances share (--redis needs one): what signs what they forward.
TOKEN = "cluster-token-0123456789"
AUTHORIZED = {"Authorization": f"Bearer {TOKEN}"}


@dataclass
class Instance:
    name: str
    child: Child
    ports: dict[str, int]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.ports['http']}"

    def port(self, role: str) -> int:
        return self.ports[f"audiosocket-{role}"]


async def instance(spawn: Spawn, redis: RedisServer, name: str) -> Instance:
    """
    An instance without the media link (--link none): a call's legs on two
    instances stay where each is, and the API forwards to each leg's owner
    (what these tests check). tests/test_link.py runs the default, linked.
    """
    http = free_port()
    child, ports = await start_server(
        spawn, "--http", f"tcp:{http}:interface=127.0.0.1", "--call-records", "none",
        "--redis", redis.url, "--instance-id", name, "--advertise-url", f"http://127.0.0.1:{http}",
        "--heartbeat", str(HEARTBEAT), "--api-token", TOKEN, "--link", "none",
    )
    return Instance(name, child, ports)


async def request(method: str, url: str, headers: dict[str, str] | None = None, **kwargs: Any) -> tuple[int, Any, Any]:
    response = await treq.request(
        method, url, persistent=False, timeout=10, headers={**AUTHORIZED, **(headers or {})}, **kwargs
    )
    return response.code, await response.json(), response


async def cluster_legs(at: Instance, *, allow_unavailable: bool = False) -> dict[tuple[str, str], str]:
    """(call id, role) -> instance id, as the directory lists them through C{at}."""
    status, body, _ = await request("GET", f"{at.url}/calls?scope=cluster")
    if allow_unavailable and status == 503:
        return {}  # Redis not (yet) reachable again
    assert status == 200, body
    return {(call["call_id"], leg["role"]): leg["instance_id"] for call in body["calls"] for leg in call["legs"]}


async def wait_listed(at: Instance, expected: dict[tuple[str, str], str], timeout: float = 10.0) -> None:
    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    deadline = reactor.seconds() + timeout
    while True:
        listed = await cluster_legs(at, allow_unavailable=True)
        if all(listed.get(key) == owner for key, owner in expected.items()):
            return
        if reactor.seconds() > deadline:
            raise AssertionError(f"the directory lists {listed}, not {expected}")
        await deferLater(reactor, 0.05)


async def leg_on(at: Instance, role: str, call_id: uuid.UUID, **options: Any) -> FakeAsterisk:
    client = await connect(at.port(role), **options)
    client.send_uuid(call_id)
    return client


@pytest_twisted.ensureDeferred
async def test_hangup_is_forwarded_to_the_owner(spawn: Spawn, redis_server: RedisServer) -> None:
    """A hangup sent to B for a leg held by A reaches the fake Asterisk on A."""
    a = await instance(spawn, redis_server, "a")
    b = await instance(spawn, redis_server, "b")
    call_id = uuid.uuid4()
    client = await leg_on(a, "visitor", call_id, on_hangup="reset")
    await wait_listed(b, {(str(call_id), "visitor"): "a"})

    status, body, response = await request("POST", f"{b.url}/calls/{call_id}/hangup?role=visitor&wait=true")
    assert status == 200, body
    assert body["legs"] == [{"role": "visitor", "result": "hangup_sent", "reason": "hangup_reset"}]
    assert response.headers.getRawHeaders("x-audiohangup-answered-by") == ["a"]
    await settle(client.closed, "the leg on A to close")
    assert client.ended_with_single_hangup()

    second = uuid.uuid4()
    other = await leg_on(a, "resident", second, on_hangup="close")
    await wait_listed(b, {(str(second), "resident"): "a"})
    status, body, _ = await request("POST", f"{b.url}/api/hangup", json={"call_id": str(second), "role": "resident"})
    assert (status, body["legs"][0]["result"]) == (200, "hangup_sent")
    await settle(other.hangup_received, "00 00 00 through /api/hangup on B")

    status, body, _ = await request("POST", f"{b.url}/calls/{uuid.uuid4()}/hangup")
    assert (status, body["error"]["code"]) == (404, "unknown_call")


@pytest_twisted.ensureDeferred
async def test_session_across_instances_ends_together(spawn: Spawn, redis_server: RedisServer) -> None:
    """Visitor on A, resident on B: the visitor resets, the resident gets 00 00 00."""
    a = await instance(spawn, redis_server, "a")
    b = await instance(spawn, redis_server, "b")
    call_id = uuid.uuid4()
    visitor = await leg_on(a, "visitor", call_id)
    resident = await leg_on(b, "resident", call_id, on_hangup="close")
    await wait_listed(a, {(str(call_id), "visitor"): "a", (str(call_id), "resident"): "b"})

    status, body, _ = await request("GET", f"{a.url}/instances")
    assert status == 200
    assert {(i["instance_id"], i["url"]) for i in body["instances"]} == {("a", a.url), ("b", b.url)}

    visitor.reset()
    await settle(resident.hangup_received, "00 00 00 on B's resident leg")
    await settle(resident.closed, "the resident leg to close")
    assert resident.ended_with_single_hangup()
    await until(lambda: f"{call_id} resident hangup sent (cause session)" in b.child.log, what="B's hangup line")
    await until(lambda: f"{call_id} resident leg ended: hangup_clean" in b.child.log, what="B's end line")


@pytest_twisted.ensureDeferred
async def test_forged_forwarding_is_refused_in_a_cluster(spawn: Spawn, redis_server: RedisServer) -> None:
    """
    The cluster's headers with the control token but no signature of an
    instance (or a wrong one): 403, the leg untouched; what B forwards to A
    (signed) is taken, and a hangup ends with the cause it says.
    """
    a = await instance(spawn, redis_server, "a")
    b = await instance(spawn, redis_server, "b")
    call_id = uuid.uuid4()
    client = await leg_on(a, "visitor", call_id, on_hangup="close")
    await wait_listed(b, {(str(call_id), "visitor"): "a"})
    hangup = f"{a.url}/calls/{call_id}/hangup?role=visitor"
    for extra in ({}, {"X-Audiohangup-Forwarded-Signature": "t=1700000000,sha256=" + "0" * 64}):
        status, body, _ = await request(
            "POST", hangup, headers={"X-Audiohangup-Forwarded-By": "b", "X-Audiohangup-Cause": "session", **extra}
        )
        assert (status, body["error"]["code"]) == (403, "bad_forwarding"), body
    assert client.hangup_frames == 0
    status, body, _ = await request("POST", f"{b.url}/calls/{call_id}/hangup?role=visitor")
    assert (status, body["legs"][0]["result"]) == (200, "hangup_sent"), body
    await settle(client.closed, "the leg on A to close")
    await until(lambda: f"{call_id} visitor hangup sent (cause api)" in a.child.log, what="A's hangup line")


@pytest_twisted.ensureDeferred
async def test_a_killed_instance_leaves_the_directory(spawn: Spawn, redis_server: RedisServer) -> None:
    """SIGKILL A: its legs leave the directory within one TTL; a hangup for them is then 404."""
    a = await instance(spawn, redis_server, "a")
    b = await instance(spawn, redis_server, "b")
    call_id = uuid.uuid4()
    client = await leg_on(a, "visitor", call_id)
    await wait_listed(b, {(str(call_id), "visitor"): "a"})

    a.child.signal("KILL")
    await a.child.exit()
    await settle(client.closed, "the killed instance's socket to close")
    status, body, _ = await request("POST", f"{b.url}/calls/{call_id}/hangup?role=visitor")
    assert (status, body["error"]["code"]) in {(502, "owner_unreachable"), (404, "unknown_call")}, body
    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    await deferLater(reactor, TTL + HEARTBEAT)  # the entry's TTL is what is under test
    assert (str(call_id), "visitor") not in await cluster_legs(b)
    status, body, _ = await request("POST", f"{b.url}/calls/{call_id}/hangup?role=visitor")
    assert (status, body["error"]["code"]) == (404, "unknown_call")
    status, body, _ = await request("GET", f"{b.url}/instances")
    assert [i["instance_id"] for i in body["instances"]] == ["b"]


@pytest_twisted.ensureDeferred
async def test_redis_down_and_back(spawn: Spawn, redis_server: RedisServer) -> None:
    """
    Redis stops: local hangups still work, cluster routes answer 503; Redis
    comes back empty: the live legs are registered again by themselves.
    """
    a = await instance(spawn, redis_server, "a")
    b = await instance(spawn, redis_server, "b")
    kept, dropped = uuid.uuid4(), uuid.uuid4()
    keeper = await leg_on(a, "visitor", kept)
    goner = await leg_on(a, "resident", dropped, on_hangup="reset")
    await wait_listed(b, {(str(kept), "visitor"): "a", (str(dropped), "resident"): "a"})

    await redis_server.stop()
    status, body, _ = await request("POST", f"{a.url}/calls/{dropped}/hangup?wait=true")
    assert (status, body["legs"]) == (200, [{"role": "resident", "result": "hangup_sent", "reason": "hangup_reset"}])
    await settle(goner.closed, "the local hangup with Redis down")
    for path in ("/calls?scope=cluster", "/instances"):
        status, body, _ = await request("GET", f"{b.url}{path}")
        assert (status, body["error"]["code"]) == (503, "redis_unavailable"), path
    status, body, _ = await request("POST", f"{b.url}/calls/{kept}/hangup")
    assert (status, body["error"]["code"]) == (503, "redis_unavailable")

    await redis_server.start()
    await wait_listed(b, {(str(kept), "visitor"): "a"})
    assert (str(dropped), "resident") not in await cluster_legs(b)
    assert not keeper.frames or keeper.hangup_frames == 0
    for child in (a.child, b.child):
        assert "Traceback" not in child.output and "Unhandled" not in child.output, child.describe()


@pytest_twisted.ensureDeferred
async def test_hangup_of_a_call_split_over_instances(spawn: Spawn, redis_server: RedisServer) -> None:
    """No role: B hangs up its own leg and has A hang up the other; one answer lists both."""
    a = await instance(spawn, redis_server, "a")
    b = await instance(spawn, redis_server, "b")
    call_id = uuid.uuid4()
    visitor = await leg_on(a, "visitor", call_id, on_hangup="close")
    resident = await leg_on(b, "resident", call_id, on_hangup="close")
    await wait_listed(b, {(str(call_id), "visitor"): "a", (str(call_id), "resident"): "b"})
    status, body, _ = await request("POST", f"{b.url}/calls/{call_id}/hangup?wait=true")
    assert status == 200, body
    assert sorted((leg["role"], leg["reason"]) for leg in body["legs"]) == [
        ("resident", "hangup_clean"), ("visitor", "hangup_clean"),
    ]
    await settle(visitor.closed, "A's leg to close")
    await settle(resident.closed, "B's leg to close")
    assert visitor.ended_with_single_hangup() and resident.ended_with_single_hangup()


@pytest_twisted.ensureDeferred
async def test_stream_routes_reach_the_owner(spawn: Spawn, redis_server: RedisServer) -> None:
    """POST and DELETE of streams sent to B for legs on A (and a call split over both) reach each leg's owner."""
    from tests.ws_app import App

    app = await App().listen()
    try:
        a = await instance(spawn, redis_server, "a")
        b = await instance(spawn, redis_server, "b")
        call_id = uuid.uuid4()
        await leg_on(a, "visitor", call_id, on_hangup="close")
        await leg_on(b, "resident", call_id, on_hangup="close")
        await wait_listed(b, {(str(call_id), "visitor"): "a", (str(call_id), "resident"): "b"})

        status, body, response = await request(
            "POST", f"{b.url}/calls/{call_id}/streams", json={"url": app.url("/{role}"), "role": "visitor"}
        )
        assert status == 201, body
        assert response.headers.getRawHeaders("x-audiohangup-answered-by") == ["a"]
        [opened] = body["streams"]
        await until(lambda: [c for c in app.connections if c.events("start")], what="the visitor's stream from A")
        assert app.connections[0].path == "/visitor"

        status, body, response = await request("DELETE", f"{b.url}/calls/{call_id}/streams/{opened['stream_id']}")
        assert (status, body["stream"]["stream_id"]) == (200, opened["stream_id"]), body
        assert response.headers.getRawHeaders("x-audiohangup-answered-by") == ["a"]
        assert await settle(app.connections[0].closed, "the stream's close") == (True, 1000)

        # No role: every live leg, where each is.
        status, body, _ = await request(
            "POST", f"{b.url}/calls/{call_id}/streams", json={"url": app.url("/{role}"), "mode": "listen"}
        )
        assert status == 201, body
        assert sorted(s["role"] for s in body["streams"]) == ["resident", "visitor"]
        await until(lambda: len([c for c in app.connections if c.events("start")]) == 3, what="two more streams")
        status, body, _ = await request("DELETE", f"{b.url}/calls/{call_id}/streams/MZnothing")
        assert (status, body["error"]["code"]) == (404, "unknown_stream")

        # An owner's refusal is the answer, and streams opened elsewhere still reach the caller.
        converse = {"url": app.url("/{role}"), "mode": "converse"}
        status, body, _ = await request("POST", f"{b.url}/calls/{call_id}/streams", json={**converse, "role": "visitor"})
        assert status == 201, body
        status, body, _ = await request("POST", f"{b.url}/calls/{call_id}/streams", json=converse)
        assert status == 201, body  # the resident's, on B; the visitor's refused on A
        assert [s["role"] for s in body["streams"]] == ["resident"]
        assert [(e["role"], e["status"], e["error"]["code"]) for e in body["errors"]] == [
            ("visitor", 409, "already_conversing")
        ]
        alone = uuid.uuid4()
        await leg_on(a, "visitor", alone, on_hangup="close")
        await wait_listed(b, {(str(alone), "visitor"): "a"})
        assert (await request("POST", f"{b.url}/calls/{alone}/streams", json=converse))[0] == 201
        status, body, _ = await request("POST", f"{b.url}/calls/{alone}/streams", json=converse)
        assert (status, body["error"]["code"]) == (409, "already_conversing"), body
    finally:
        await app.close()


@pytest_twisted.ensureDeferred
async def test_recording_routes_reach_the_owner(spawn: Spawn, redis_server: RedisServer) -> None:
    """Recording a call held by A through B: start, fetch while it runs, stop; each answered by A."""
    import io
    import wave

    from audiohangup.wire import Kind, encode_frame

    a = await instance(spawn, redis_server, "a")
    b = await instance(spawn, redis_server, "b")
    call_id = uuid.uuid4()
    client = await leg_on(a, "visitor", call_id, on_hangup="close")
    await wait_listed(b, {(str(call_id), "visitor"): "a"})
    status, body, response = await request("POST", f"{b.url}/calls/{call_id}/recording")
    assert status == 201, body
    assert response.headers.getRawHeaders("x-audiohangup-answered-by") == ["a"]
    for _ in range(10):
        client.send(encode_frame(Kind.SLIN, b"\x10\x00" * 160))
    fetched = await treq.get(f"{b.url}/calls/{call_id}/recording", headers=AUTHORIZED, persistent=False, timeout=10)
    assert fetched.code == 200 and fetched.headers.getRawHeaders("content-type") == ["audio/wav"]
    with wave.open(io.BytesIO(await fetched.content())) as wav:
        assert wav.getnchannels() == 2
    status, body, response = await request("DELETE", f"{b.url}/calls/{call_id}/recording")
    assert status == 200, body
    assert response.headers.getRawHeaders("x-audiohangup-answered-by") == ["a"]


async def raw_get(port: int, target: str) -> tuple[bytes, bytes]:
    """GET C{target} exactly as given (treq would re-encode it), over HTTP/1.0 (no chunks): the head and body."""
    import socket

    from twisted.internet import threads

    def get() -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(
                f"GET {target} HTTP/1.0\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n\r\n".encode("latin-1")
            )
            data = b""
            try:
                while chunk := sock.recv(65536):
                    data += chunk
            except ConnectionResetError:
                pass  # a cut answer: what came before the reset is returned
            return data

    head, _, body = (await threads.deferToThread(get)).partition(b"\r\n\r\n")
    return head, body


@pytest_twisted.ensureDeferred
async def test_forwarded_targets_are_signed_as_sent(spawn: Spawn, redis_server: RedisServer) -> None:
    """
    A request target that treq re-encodes on its way to the owner (an empty
    query dropped, | { } ^ " percent-encoded) is signed as it is sent, so the
    owner takes it; and the recording comes through B whole.
    """
    a = await instance(spawn, redis_server, "a")
    b = await instance(spawn, redis_server, "b")
    call_id = uuid.uuid4()
    await leg_on(a, "visitor", call_id, on_hangup="close")
    await wait_listed(b, {(str(call_id), "visitor"): "a"})
    status, body, _ = await request("POST", f"{b.url}/calls/{call_id}/recording")
    assert status == 201, body
    for query in ["", "?", "?x=a|b", '?x={"^"}&y=%7c']:
        head, body = await raw_get(b.ports["http"], f"/calls/{call_id}/recording{query}")
        assert head.split(b" ")[1] == b"200", (query, head, body[:300])
        assert b"\r\nx-audiohangup-answered-by: a" in head.lower() and body.startswith(b"RIFF"), (query, head)


class FakeOwner:
    """
    A raw HTTP server on loopback standing for a broken or hostile instance:
    after a request's head it sends C{answer}, then, if C{endless}, that
    line again and again until the client goes.
    """

    def __init__(self, answer: bytes, endless: bytes = b"") -> None:
        from twisted.internet.defer import Deferred

        self.answer, self.endless = answer, endless
        self.lost: Deferred[None] = Deferred()
        self.sent = 0
        #: Close the connection once the answer is out.
        self.close_after_answer = False

    async def listen(self) -> int:
        from twisted.internet import reactor
        from twisted.internet.endpoints import TCP4ServerEndpoint
        from twisted.internet.protocol import Factory, Protocol

        owner = self

        class Answer(Protocol):
            received = b""
            connected_ = True

            def dataReceived(self, data: bytes) -> None:
                self.received += data
                if b"\r\n\r\n" in self.received and not owner.sent:
                    self.send(owner.answer)
                    if owner.close_after_answer:
                        self.transport.loseConnection()
                    elif owner.endless:
                        self.more()

            def send(self, data: bytes) -> None:
                owner.sent += len(data)
                self.transport.write(data)

            def more(self) -> None:
                if self.connected_:
                    self.send(owner.endless * (16384 // len(owner.endless)))
                    reactor.callLater(0, self.more)

            def connectionLost(self, reason: Any = None) -> None:
                self.connected_ = False
                if not owner.lost.called:
                    owner.lost.callback(None)

        self.port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Factory.forProtocol(Answer))
        return int(self.port.getHost().port)


async def owned_by_fake(redis_server: RedisServer, fake: FakeOwner, call_id: uuid.UUID) -> Any:
    """A directory entry naming C{fake}, instance "evil", the owner of C{call_id}'s visitor."""
    from audiohangup.cluster.directory import DEFAULT_PREFIX
    from tests.test_directory import Cluster as Directories

    directories = Directories(redis_server)
    evil = await directories.started(
        "evil", url=f"http://127.0.0.1:{await fake.listen()}", prefix=DEFAULT_PREFIX, heartbeat=HEARTBEAT
    )
    evil.leg(call_id)
    return evil


@pytest_twisted.ensureDeferred
async def test_an_owner_answering_without_end_is_cut_off(spawn: Spawn, redis_server: RedisServer) -> None:
    """
    An owner that sends header lines without end, or a body over 64 KiB, is
    cut off: B answers 502 naming it, having read a bounded part.
    """
    b = await instance(spawn, redis_server, "b")
    for fake, method, code, why in [
        (FakeOwner(b"HTTP/1.1 200 OK\r\n", endless=b"X-Junk: " + b"j" * 90 + b"\r\n"),
         "GET", "owner_unreachable", "head passed"),
        (FakeOwner(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n", endless=b"[" * 1024),
         "POST", "owner_answer_too_large", "passed 65536 bytes"),
    ]:
        call_id = uuid.uuid4()
        evil = await owned_by_fake(redis_server, fake, call_id)
        try:
            await wait_listed(b, {(str(call_id), "visitor"): "evil"})
            status, body, _ = await request(method, f"{b.url}/calls/{call_id}/recording")
            assert status == 502 and body["error"]["code"] == code, (status, body)
            assert "instance evil at http://127.0.0.1:" in body["error"]["message"], body
            assert why in body["error"]["message"], body
            await settle(fake.lost, "B to cut the fake owner off")
        finally:
            await evil.directory.stop()
            evil.pacer.stopService()  # its stand-in leg's ticks must not outlive the test
            await fake.port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_recording_the_owner_breaks_off(spawn: Spawn, redis_server: RedisServer) -> None:
    """
    A recording is passed on as it comes: one the owner cuts short is cut (a
    reset) for the client too, never ended as if whole; one announced over 4 GiB is a 502;
    neither leaves a traceback in B's log.
    """
    b = await instance(spawn, redis_server, "b")
    for fake, expected in [
        (FakeOwner(b"HTTP/1.1 200 OK\r\nContent-Type: audio/wav\r\nContent-Length: 100000\r\n\r\nRIFF",
                   endless=b""), "cut"),
        (FakeOwner(b"HTTP/1.1 200 OK\r\nContent-Type: audio/wav\r\nContent-Length: 5000000000\r\n\r\nRIFF",
                   endless=b"\0" * 1024), "too large"),
    ]:
        call_id = uuid.uuid4()
        evil = await owned_by_fake(redis_server, fake, call_id)
        try:
            await wait_listed(b, {(str(call_id), "visitor"): "evil"})
            if expected == "cut":
                fake.close_after_answer = True
            head, body = await raw_get(b.ports["http"], f"/calls/{call_id}/recording")
            if expected == "cut":
                assert len(body) < 100000, head
            else:
                assert head.split(b" ")[1] == b"502" and b"owner_answer_too_large" in body, (head, body)
                await settle(fake.lost, "B to cut the fake owner off")
        finally:
            await evil.directory.stop()
            evil.pacer.stopService()  # its stand-in leg's ticks must not outlive the test
            await fake.port.stopListening()
    await until(lambda: "recording from instance evil cut short" in b.child.log, what="the cut logged")
    assert "Traceback" not in b.child.log and "Unhandled" not in b.child.log, b.child.log

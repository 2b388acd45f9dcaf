"""
The Redis call directory against a real C{redis-server} of each test's own
(see L{tests.redis_server}): legs register and go, two instances share one
Redis without deleting each other's entries, a crashed instance's entries
expire within one TTL, a restart cleans up after the earlier run, and a Redis
that goes away (or hangs) costs the calls nothing: the queries fail fast with
L{DirectoryUnavailable}, and the directory repairs itself when Redis is back.
Heartbeats are 0.2 s (TTL 0.6 s) so all this is quick; the C{logs} fixture
fails a test on any traceback or unhandled error.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, TypeVar

import pytest
import pytest_twisted
import txredisapi
from automat import NoTransition
from twisted.application.internet import ClientService
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from audiohangup.audio import LegSettings
from audiohangup.cluster import redis as redis_module
from audiohangup.cluster.directory import Directory, DirectoryUnavailable, InstanceEntry, LegEntry
from audiohangup.cluster.redis import RedisAddress, parse_redis_url
from audiohangup.interfaces import ILegObserver
from audiohangup.logs import iso_time
from audiohangup.pacer import Pacer
from audiohangup.protocol import AudioSocketProtocol
from audiohangup.reasons import Role
from audiohangup.registry import Registry
from audiohangup.wire import encode_uuid
from tests.conftest import LogCapture
from tests.redis_server import RedisServer, free_port

T = TypeVar("T")

HEARTBEAT = 0.2
TTL = 3 * HEARTBEAT
PREFIX = "test"


# Helpers


async def sleep(seconds: float) -> None:
    await deferLater(reactor, seconds)


async def eventually(check: Callable[[], Awaitable[T]], timeout: float = 5.0, what: str = "") -> T:
    """Run the async C{check} every 20 ms until it answers something truthy; fail after C{timeout}."""
    deadline = reactor.seconds() + timeout
    while True:
        value = await check()
        if value:
            return value
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or check}; last {value!r}")
        await sleep(0.02)


@dataclass
class Instance:
    """One audiohangup instance as the directory sees it: a registry of live legs and its directory."""

    directory: Directory
    registry: Registry
    legs: list[AudioSocketProtocol] = field(default_factory=list)
    #: Paces its legs on the real reactor; stopped with the cluster fixture.
    pacer: Pacer = field(default_factory=lambda: Pacer(reactor))

    @property
    def id(self) -> str:
        return self.directory.instance_id

    def leg(self, call_id: uuid.UUID | str, role: Role = Role.VISITOR) -> AudioSocketProtocol:
        """A live leg on a fake transport: its UUID arrives, so the directory is told it started."""
        leg = AudioSocketProtocol(role, self.registry, LegSettings(close_timeout=2.0), reactor, self.pacer)
        leg.makeConnection(StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000)))
        leg.dataReceived(encode_uuid(uuid.UUID(str(call_id))))
        self.legs.append(leg)
        return leg

    @staticmethod
    def end(leg: AudioSocketProtocol) -> None:
        """The peer closes the leg (how Asterisk ends a call): the directory is told it ended."""
        leg.connectionLost(Failure(ConnectionDone()))


@dataclass
class Cluster:
    """Directories made by a test, stopped when it ends (a second stop() is harmless)."""

    redis: RedisServer
    instances: list[Instance] = field(default_factory=list)
    clients: list[Any] = field(default_factory=list)

    def instance(self, instance_id: str, *, url: str | None = None, redis_url: str | None = None,
                 **options: Any) -> Instance:
        registry = Registry(end_with_leg=False)
        options.setdefault("heartbeat", HEARTBEAT)
        options.setdefault("prefix", PREFIX)
        directory = Directory(
            redis_url or self.redis.url, instance_id, url or f"http://{instance_id}.example:8080",
            registry, reactor, **options,
        )
        registry.events.add(directory)
        made = Instance(directory, registry)
        self.instances.append(made)
        return made

    async def started(self, instance_id: str, **options: Any) -> Instance:
        made = self.instance(instance_id, **options)
        await made.directory.start()
        assert made.directory.available
        return made

    async def raw(self) -> Any:
        """A plain txredisapi connection to the test's Redis, to look at or plant keys."""
        client = await txredisapi.Connection("127.0.0.1", self.redis.port, reconnect=False, convertNumbers=False)
        self.clients.append(client)
        return client


@pytest_twisted.async_yield_fixture
async def cluster(redis_server: RedisServer) -> AsyncIterator[Cluster]:
    made = Cluster(redis_server)
    try:
        yield made
    finally:
        for instance in made.instances:
            await instance.directory.stop()
            for leg in instance.legs:
                if leg.ended_at is None:
                    leg.connectionLost(Failure(ConnectionDone()))
            instance.pacer.stopService()
        for client in made.clients:
            await client.disconnect()


def warnings(logs: LogCapture, text: str) -> list[str]:
    return [
        line for event, line in zip(logs.events, logs.texts())
        if event.get("log_level") is LogLevel.warn and text in line
    ]


def infos(logs: LogCapture, text: str) -> list[str]:
    return [
        line for event, line in zip(logs.events, logs.texts())
        if event.get("log_level") is LogLevel.info and text in line
    ]


async def unavailable_fast(directory: Directory) -> list[str]:
    """Every query raises DirectoryUnavailable, each within one second; their messages."""
    messages = []
    for query in (lambda: directory.owners(str(uuid.uuid4())), directory.legs, directory.instances):
        began = reactor.seconds()
        with pytest.raises(DirectoryUnavailable) as raised:
            await query()
        assert reactor.seconds() - began < 1.0
        messages.append(str(raised.value))
    return messages


def call_ids(entries: list[LegEntry]) -> set[str]:
    return {entry.call_id for entry in entries}


# URLs, construction and the connection's machinery (no Redis needed)


def test_redis_urls(logs: LogCapture) -> None:
    assert parse_redis_url("redis://127.0.0.1:6380/2") == RedisAddress(host="127.0.0.1", port=6380, db=2)
    assert parse_redis_url("redis://redis.example") == RedisAddress(host="redis.example", port=6379, db=0)
    assert parse_redis_url("redis://") == RedisAddress(host="localhost")
    assert parse_redis_url("redis://:s%40cret@h:1?db=3") == RedisAddress(host="h", port=1, db=3, password="s@cret")
    assert parse_redis_url("redis://me:pw@h/0") == RedisAddress(host="h", username="me", password="pw")
    assert parse_redis_url("redis://[::1]:7000").host == "::1"
    assert parse_redis_url("unix:///run/redis/redis.sock") == RedisAddress(host=None, path="/run/redis/redis.sock")
    assert parse_redis_url("unix:///run/r.sock?db=4&password=pw") == RedisAddress(
        host=None, path="/run/r.sock", db=4, password="pw"
    )
    assert parse_redis_url("unix://:pw@/run/r.sock").password == "pw"
    assert parse_redis_url("redis://:pw@h:1/3").describe() == "redis://h:1/3"  # no credentials in logs
    assert parse_redis_url("redis://[::1]:7000").describe() == "redis://[::1]:7000"
    assert parse_redis_url("unix:///run/r.sock?db=4&password=pw").describe() == "unix:///run/r.sock?db=4"
    for bad in (
        "http://h", "rediss://h", "redis://h:notaport", "redis://h/x", "redis://h/1?db=2",
        "unix://host/path", "unix://", "redis://h?timeout=3", "/run/redis.sock", "",
    ):
        with pytest.raises(ValueError):
            parse_redis_url(bad)


def test_construction_checks_its_arguments(logs: LogCapture) -> None:
    registry = Registry()
    directory = Directory("redis://127.0.0.1:1", "host-1", "http://h:8080", registry, reactor)
    assert verifyObject(ILegObserver, directory)
    assert (directory.heartbeat, directory.ttl, directory.prefix) == (2.0, 6.0, "audiohangup")
    assert not directory.available
    with pytest.raises(ValueError):
        Directory("ftp://h", "a", "http://a", registry, reactor)
    for instance_id in ("", "a b", "a\tb"):
        with pytest.raises(ValueError):
            Directory("redis://h", instance_id, "http://a", registry, reactor)
    for options in ({"heartbeat": 0}, {"heartbeat": -1}, {"prefix": ""}, {"timeout": 0}):
        with pytest.raises(ValueError):
            Directory("redis://h", "a", "http://a", registry, reactor, **options)


def test_client_service_cannot_close_a_rejected_connection() -> None:
    """
    Why RedisConnection's endpoint sends AUTH, SELECT and PING instead of
    ClientService's prepareConnection (see its docstring): a connection that
    prepareConnection rejects stays open, and closing it (as a Redis that
    refuses or a reply timeout does) makes ClientService's state machine
    raise NoTransition inside connectionLost, a traceback in the reactor.
    If this starts to pass without raising, Twisted handles it now and
    prepareConnection can do the job.
    """
    made: list[Any] = []

    class Endpoint:
        def connect(self, factory: Any) -> Any:
            protocol = factory.buildProtocol(None)
            protocol.makeConnection(StringTransport())
            made.append(protocol)
            return succeed(protocol)

    def reject(protocol: Any) -> None:
        raise ValueError("NOAUTH")

    clock = Clock()
    service = ClientService(
        Endpoint(), Factory.forProtocol(Protocol), retryPolicy=lambda failures: 1.0, clock=clock,
        prepareConnection=reject,
    )
    service.startService()
    assert len(made) == 1 and made[0].transport.connected  # rejected, and left open
    with pytest.raises(NoTransition):
        made[0].connectionLost(Failure(ConnectionDone()))  # closed while ClientService waits to retry
    clock.advance(1.0)
    service.stopService()


# Registering and removing legs


@pytest_twisted.ensureDeferred
async def test_a_leg_registers_and_goes(cluster: Cluster, logs: LogCapture) -> None:
    a = await cluster.started("a")
    call = uuid.uuid4()
    leg = a.leg(call, Role.VISITOR)

    owners = await eventually(lambda: a.directory.owners(str(call)), what="the leg in the directory")
    assert owners == {
        "visitor": LegEntry(
            call_id=str(call), role="visitor", instance_id="a", url="http://a.example:8080",
            started_at=iso_time(leg.connected_at),
        )
    }
    assert await a.directory.legs() == [owners["visitor"]]
    started = datetime.fromisoformat(owners["visitor"].started_at)
    assert started.utcoffset() == timedelta(0)
    assert abs(started.timestamp() - leg.connected_at) < 0.001

    resident = a.leg(call, Role.RESIDENT)
    owners = await eventually(_roles(a.directory, str(call), {"visitor", "resident"}), what="both legs")
    assert list(owners) == ["visitor", "resident"]
    assert owners["resident"].started_at == iso_time(resident.connected_at)

    a.end(leg)
    await eventually(_roles(a.directory, str(call), {"resident"}), what="the visitor gone")
    a.end(resident)
    await eventually(_roles(a.directory, str(call), set()), what="both gone")
    assert await a.directory.legs() == []
    assert await a.directory.owners(str(uuid.uuid4())) == {}

    # The entries carry a TTL of three heartbeats, refreshed by each heartbeat.
    other = a.leg(uuid.uuid4())
    raw = await cluster.raw()
    key = f"{PREFIX}:leg:{other.call_id}:visitor"
    await eventually(lambda: raw.exists(key), what="the key")
    for _ in range(5):
        pttl = await raw.execute_command("PTTL", key)
        assert 0 < int(pttl) <= TTL * 1000
        await sleep(HEARTBEAT)
    assert 0 < int(await raw.execute_command("PTTL", f"{PREFIX}:instance:a")) <= TTL * 1000


def _roles(directory: Directory, call_id: str, roles: set[str]) -> Callable[[], Awaitable[Any]]:
    """A check for L{eventually}: the call's owners have exactly C{roles} (answers them, or True for none)."""

    async def check() -> Any:
        owners = await directory.owners(call_id)
        return (owners or True) if set(owners) == roles else None

    return check


@pytest_twisted.ensureDeferred
async def test_a_leg_replaced_within_one_instance_keeps_its_entry(cluster: Cluster, logs: LogCapture) -> None:
    """With --on-duplicate replace, a second connection replaces the first; the first's end deletes nothing."""
    a = await cluster.started("a")
    a.registry.on_duplicate = "replace"
    call = uuid.uuid4()
    old = a.leg(call)
    await eventually(_roles(a.directory, str(call), {"visitor"}))
    await sleep(0.01)  # a different start time
    new = a.leg(call)
    assert a.registry.get(str(call), Role.VISITOR) is new
    a.end(old)  # the replaced leg goes after our hangup
    await sleep(3 * HEARTBEAT)
    owners = await a.directory.owners(str(call))
    assert owners["visitor"].started_at == iso_time(new.connected_at)
    raw = await cluster.raw()
    assert await raw.hget(f"{PREFIX}:leg:{call}:visitor", "started") == f"{new.connected_at:.6f}"


# Two instances on one Redis


@pytest_twisted.ensureDeferred
async def test_two_instances_share_the_directory(cluster: Cluster, logs: LogCapture) -> None:
    a = await cluster.started("a")
    b = await cluster.started("b", url="http://b.example:9000")
    call = uuid.uuid4()
    a.leg(call, Role.VISITOR)
    b.leg(call, Role.RESIDENT)
    b.leg(uuid.uuid4(), Role.VISITOR)

    for directory in (a.directory, b.directory):
        owners = await eventually(_roles(directory, str(call), {"visitor", "resident"}), what="both legs")
        assert (owners["visitor"].instance_id, owners["visitor"].url) == ("a", "http://a.example:8080")
        assert (owners["resident"].instance_id, owners["resident"].url) == ("b", "http://b.example:9000")

        async def three(directory: Directory = directory) -> bool:
            return len(await directory.legs()) == 3

        await eventually(three, what="three legs")  # b's second leg is written on its own

    instances = await a.directory.instances()
    assert [(i.instance_id, i.url, i.legs) for i in instances] == [
        ("a", "http://a.example:8080", 1),
        ("b", "http://b.example:9000", 2),
    ]
    assert all(isinstance(i, InstanceEntry) for i in instances)
    assert instances[0].started_at == a.directory.started_at
    assert await b.directory.instances() == instances


@pytest_twisted.ensureDeferred
async def test_a_newer_leg_elsewhere_is_not_deleted_by_the_old_ones_end(
    cluster: Cluster, logs: LogCapture
) -> None:
    """
    The visitor of a call reconnects to instance B while A still holds the old
    leg: the entry is B's from then on. A's heartbeats do not take it back,
    and the end of A's old leg does not delete it.
    """
    a = await cluster.started("a")
    b = await cluster.started("b")
    call = uuid.uuid4()
    old = a.leg(call)
    assert (await eventually(_roles(a.directory, str(call), {"visitor"})))["visitor"].instance_id == "a"
    await sleep(0.01)
    new = b.leg(call)

    async def owned_by_b() -> bool:
        return (await a.directory.owners(str(call)))["visitor"].instance_id == "b"

    await eventually(owned_by_b, what="B's claim")
    await sleep(3 * HEARTBEAT)  # A heartbeats while its old leg is live
    assert await owned_by_b()
    a.end(old)
    await sleep(3 * HEARTBEAT)
    owners = await b.directory.owners(str(call))
    assert owners["visitor"].instance_id == "b"
    assert owners["visitor"].started_at == iso_time(new.connected_at)
    assert [(i.instance_id, i.legs) for i in await a.directory.instances()] == [("a", 0), ("b", 1)]

    # And when B's leg ends, the entry goes.
    b.end(new)
    await eventually(_roles(a.directory, str(call), set()), what="the entry gone")


@pytest_twisted.ensureDeferred
async def test_a_crashed_instance_expires_within_one_ttl(cluster: Cluster, logs: LogCapture) -> None:
    a = await cluster.started("a")
    b = await cluster.started("b")
    for _ in range(3):
        a.leg(uuid.uuid4())
    b_call = uuid.uuid4()
    b.leg(b_call)

    async def a_legs() -> int:
        return len([entry for entry in await b.directory.legs() if entry.instance_id == "a"])

    assert await eventually(lambda: _equal(a_legs, 3), what="A's legs") is True
    # A crashes: no more heartbeats, no stop(); its connection is left as it is.
    await sleep(HEARTBEAT / 2)
    a.directory._loop.stop()
    crashed_at = reactor.seconds()

    async def a_gone() -> bool:
        return await a_legs() == 0 and [i.instance_id for i in await b.directory.instances()] == ["b"]

    await eventually(a_gone, timeout=TTL + 1.0, what="A's entries expired")
    assert reactor.seconds() - crashed_at <= TTL + 0.1
    assert reactor.seconds() - crashed_at >= TTL - HEARTBEAT - 0.05  # they did live until their TTL
    # B's own entries carry on.
    await sleep(2 * TTL)
    assert call_ids(await b.directory.legs()) == {str(b_call)}
    assert [(i.instance_id, i.legs) for i in await b.directory.instances()] == [("b", 1)]


async def _equal(get: Callable[[], Awaitable[Any]], expected: Any) -> bool:
    return await get() == expected


@pytest_twisted.ensureDeferred
async def test_start_removes_what_an_earlier_run_left(cluster: Cluster, logs: LogCapture) -> None:
    """
    An earlier run of instance "a" crashed, leaving its presence and three
    legs; another instance's leg is there too. The new run of "a" holds one
    leg of the same call id and role as an old one. start() removes the old
    entries, writes its own, and leaves the other instance's alone.
    """
    raw = await cluster.raw()
    kept, old_live, old_gone_1, old_gone_2 = (str(uuid.uuid4()) for _ in range(4))

    async def plant(call_id: str, instance_id: str) -> None:
        key = f"{PREFIX}:leg:{call_id}:visitor"
        await raw.execute_command(
            "HSET", key, "call_id", call_id, "role", "visitor", "instance_id", instance_id,
            "url", "http://old:1", "started_at", "2020-01-01T00:00:00.000+00:00", "started", "1577836800.000000",
        )
        await raw.execute_command("EXPIRE", key, 600)

    await plant(kept, "b")
    for call_id in (old_live, old_gone_1, old_gone_2):
        await plant(call_id, "a")
    await raw.execute_command(
        "HSET", f"{PREFIX}:instance:a", "instance_id", "a", "url", "http://old:1",
        "started_at", "2020-01-01T00:00:00.000+00:00",
    )
    await raw.execute_command("EXPIRE", f"{PREFIX}:instance:a", 600)

    a = cluster.instance("a")
    leg = a.leg(old_live)  # before start(): the directory does nothing with it yet
    assert await raw.exists(f"{PREFIX}:leg:{old_gone_1}:visitor")
    await a.directory.start()
    assert a.directory.available

    async def cleaned() -> bool:  # start() waits for its first sync, bounded: it may still be under way
        return {entry.call_id for entry in await a.directory.legs()} == {kept, old_live}

    await eventually(cleaned, what="the earlier run's entries removed")
    entries = {entry.call_id: entry for entry in await a.directory.legs()}
    assert entries[kept].instance_id == "b" and entries[kept].url == "http://old:1"
    assert entries[old_live] == LegEntry(
        old_live, "visitor", "a", "http://a.example:8080", iso_time(leg.connected_at)
    )
    instances = await a.directory.instances()
    assert [(i.instance_id, i.url, i.started_at, i.legs) for i in instances] == [
        ("a", "http://a.example:8080", a.directory.started_at, 1)
    ]
    assert infos(logs, "removed 2 stale leg entries of instance a")


# Redis going away


@pytest_twisted.ensureDeferred
async def test_redis_stopped_and_restarted(cluster: Cluster, logs: LogCapture) -> None:
    """
    Redis stops mid-run: the observer methods raise nothing, the queries fail
    at once, one warning is logged. Redis comes back empty: within a couple of
    heartbeats the live legs are back, and the ones that ended meanwhile are not.
    """
    a = await cluster.started("a")
    b = await cluster.started("b")
    through, ends_meanwhile = uuid.uuid4(), uuid.uuid4()
    kept = a.leg(through)
    gone = a.leg(ends_meanwhile)
    b_leg = b.leg(uuid.uuid4())
    await eventually(lambda: _equal(lambda: _ids(a.directory), {str(through), str(ends_meanwhile), b_leg.call_id}))

    await cluster.redis.stop()
    assert not cluster.redis.running
    await eventually(lambda: _false(a.directory.available and b.directory.available), timeout=2.0)
    await eventually(lambda: _false(a.directory.available or b.directory.available), timeout=2.0)
    messages = await unavailable_fast(a.directory)
    assert all("unavailable" in message and cluster.redis.url in message for message in messages)

    # Calls go on: legs start and end as usual, and the directory is told, quietly.
    a.end(gone)
    started_meanwhile = a.leg(uuid.uuid4())
    assert len(a.registry) == 2
    await sleep(5 * HEARTBEAT)  # several failed reconnections
    assert not a.directory.available
    assert len(warnings(logs, "call directory: lost its connection to Redis")) == 2  # one per instance
    assert not [line for line in warnings(logs, "call directory") if "lost its connection" not in line]

    await cluster.redis.start()  # empty: no persistence
    restarted = reactor.seconds()
    expected = {str(through), started_meanwhile.call_id, b_leg.call_id}
    await eventually(lambda: _equal(lambda: _ids(b.directory), expected), timeout=4 * HEARTBEAT + 1.0)
    assert reactor.seconds() - restarted < 2 * HEARTBEAT + 0.5
    assert a.directory.available and b.directory.available
    assert [(i.instance_id, i.legs) for i in await b.directory.instances()] == [("a", 2), ("b", 1)]
    assert len(infos(logs, "call directory: Redis at")) == 2  # "... is back after ..."
    assert len(warnings(logs, "call directory")) == 2
    assert kept.live


async def _ids(directory: Directory) -> set[str] | None:
    try:
        return call_ids(await directory.legs())
    except DirectoryUnavailable:
        return None


async def _false(value: bool) -> bool:
    return not value


@pytest_twisted.ensureDeferred
async def test_reconnection_removes_legs_that_ended_meanwhile(
    cluster: Cluster, logs: LogCapture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The connection drops but Redis keeps its data: a leg that ended meanwhile is removed on reconnection."""
    # A first retry slow enough that the leg surely ends while the directory is away.
    monkeypatch.setattr(redis_module, "RETRY_FIRST", 1.0)
    a = await cluster.started("a")
    live, ended = a.leg(uuid.uuid4()), a.leg(uuid.uuid4())
    await eventually(lambda: _equal(lambda: _ids(a.directory), {live.call_id, ended.call_id}))
    assert a.directory._redis.current is not None
    raw = await cluster.raw()  # before the abort: opening it takes longer than the directory's first retry
    a.directory._redis.current.transport.abortConnection()
    await eventually(lambda: _false(a.directory.available), timeout=1.0)
    a.end(ended)
    assert await raw.exists(f"{PREFIX}:leg:{ended.call_id}:visitor")  # still there: nobody could remove it
    await eventually(lambda: _true(a.directory.available), timeout=4.0)
    await eventually(lambda: _equal(lambda: _ids(a.directory), {live.call_id}), timeout=1.0)
    assert infos(logs, "removed 1 stale leg entries of instance a")


async def _true(value: bool) -> bool:
    return value


@pytest_twisted.ensureDeferred
async def test_a_hung_redis_fails_queries_within_the_timeout(cluster: Cluster, logs: LogCapture) -> None:
    """
    Redis stops answering (SIGSTOP) but its socket stays open: queries fail
    within the reply timeout, the calls go on, one warning is logged however
    many reconnections fail, and all is well again once it answers.
    """
    a = await cluster.started("a", timeout=0.3)
    leg = a.leg(uuid.uuid4())
    await eventually(lambda: _equal(lambda: _ids(a.directory), {leg.call_id}))
    pid = cluster.redis._child.transport.pid  # type: ignore[union-attr]
    os.kill(pid, 19)  # SIGSTOP
    try:
        began = reactor.seconds()
        with pytest.raises(DirectoryUnavailable):
            await a.directory.legs()
        assert reactor.seconds() - began < 0.3 + 0.2
        await eventually(lambda: _false(a.directory.available), timeout=1.0)
        await unavailable_fast(a.directory)
        later = a.leg(uuid.uuid4())
        await sleep(6 * HEARTBEAT)  # connections are accepted, then PING times out, again and again
        assert not a.directory.available
        assert len(warnings(logs, "call directory")) == 1
    finally:
        os.kill(pid, 18)  # SIGCONT
    await eventually(lambda: _equal(lambda: _ids(a.directory), {leg.call_id, later.call_id}), timeout=3.0)
    assert len(warnings(logs, "call directory")) == 1


@pytest_twisted.ensureDeferred
async def test_start_without_redis_then_redis_comes(cluster: Cluster, logs: LogCapture) -> None:
    """start() returns promptly without Redis, with one warning; the directory connects once Redis is there."""
    port = free_port()
    a = cluster.instance("a", redis_url=f"redis://127.0.0.1:{port}")
    leg = a.leg(uuid.uuid4())
    began = reactor.seconds()
    await a.directory.start()
    assert reactor.seconds() - began < 1.0
    assert not a.directory.available
    await unavailable_fast(a.directory)
    await sleep(3 * HEARTBEAT)
    assert len(warnings(logs, "call directory: cannot reach Redis")) == 1
    assert "ConnectionRefusedError" in warnings(logs, "call directory")[0]
    # ClientService's own line per retry is at debug level: the outage is told once, above.
    retries = [event for event in logs.events if "Scheduling retry" in event.get("log_format", "")]
    assert retries and all(event["log_level"] is LogLevel.debug for event in retries)

    late = RedisServer(port=port)
    try:
        await late.start()
        await eventually(lambda: _equal(lambda: _ids(a.directory), {leg.call_id}), timeout=2.0)
        assert [i.instance_id for i in await a.directory.instances()] == ["a"]
    finally:
        await a.directory.stop()
        await late.close()


@pytest_twisted.ensureDeferred
async def test_a_redis_wanting_a_password(cluster: Cluster, logs: LogCapture) -> None:
    """
    Without the password Redis wants, or with a wrong one, the directory is
    unavailable (warned once each, saying why); with it, it works.
    """
    raw = await cluster.raw()
    await raw.execute_command("CONFIG", "SET", "requirepass", "s3cret")
    a = await _start_unavailable(cluster.instance("a"))
    await sleep(3 * HEARTBEAT)
    found = warnings(logs, "call directory")
    assert len(found) == 1 and "NOAUTH" in found[0], found
    c = await _start_unavailable(cluster.instance("c", redis_url=f"redis://:wrong@127.0.0.1:{cluster.redis.port}"))
    await sleep(3 * HEARTBEAT)
    found = warnings(logs, "call directory")
    assert len(found) == 2 and "could not auth" in found[1] and "wrong" not in found[1], found
    await c.directory.stop()
    b = await cluster.started("b", redis_url=f"redis://:s3cret@127.0.0.1:{cluster.redis.port}/3")
    b.leg(uuid.uuid4())
    assert len(await eventually(b.directory.legs)) == 1
    await a.directory.stop()


@pytest_twisted.ensureDeferred
async def test_a_redis_password_apart_from_the_url(cluster: Cluster, logs: LogCapture) -> None:
    """The password from --redis-password-file or the environment authenticates as one in the URL would."""
    raw = await cluster.raw()
    await raw.execute_command("CONFIG", "SET", "requirepass", "s3cret")
    a = await cluster.started("a", redis_url=f"redis://127.0.0.1:{cluster.redis.port}/3", password="s3cret")
    a.leg(uuid.uuid4())
    assert len(await eventually(a.directory.legs)) == 1
    with pytest.raises(ValueError, match="given twice") as raised:
        cluster.instance("b", redis_url=f"redis://:s3cret@127.0.0.1:{cluster.redis.port}", password="s3cret")
    assert "s3cret" not in str(raised.value)


async def _start_unavailable(instance: Instance) -> Instance:
    await instance.directory.start()
    assert not instance.directory.available
    return instance


# Stopping, and a unix socket


@pytest_twisted.ensureDeferred
async def test_stop_removes_its_own_entries(cluster: Cluster, logs: LogCapture) -> None:
    a = await cluster.started("a")
    b = await cluster.started("b")
    for _ in range(3):
        a.leg(uuid.uuid4())
    b_leg = b.leg(uuid.uuid4())
    await eventually(lambda: _equal(lambda: _count(b.directory), 4))

    began = reactor.seconds()
    await a.directory.stop()
    assert reactor.seconds() - began < 2.0
    assert not a.directory.available
    assert call_ids(await b.directory.legs()) == {b_leg.call_id}
    assert [i.instance_id for i in await b.directory.instances()] == ["b"]
    await a.directory.stop()  # again: nothing more
    with pytest.raises(DirectoryUnavailable, match="stopped"):
        await a.directory.legs()

    # After stop() the observer methods do nothing, and raise nothing.
    a.leg(uuid.uuid4())
    a.end(a.legs[0])
    await sleep(2 * HEARTBEAT)
    assert call_ids(await b.directory.legs()) == {b_leg.call_id}


async def _count(directory: Directory) -> int:
    return len(await directory.legs())


@pytest_twisted.ensureDeferred
async def test_stop_without_redis_is_prompt(cluster: Cluster, logs: LogCapture) -> None:
    a = await cluster.started("a")
    a.leg(uuid.uuid4())
    await cluster.redis.stop()
    began = reactor.seconds()
    await a.directory.stop()
    assert reactor.seconds() - began < 1.0
    assert not a.directory.available
    never_started = cluster.instance("n")
    await never_started.directory.stop()  # before start(): nothing to do


@pytest_twisted.ensureDeferred
async def test_over_a_unix_socket(cluster: Cluster, logs: LogCapture) -> None:
    assert cluster.redis.unixsocket is not None
    a = await cluster.started("a", redis_url=cluster.redis.unix_url + "?db=1")
    b = await cluster.started("b", redis_url=cluster.redis.url + "/1")  # the same database over TCP
    call = uuid.uuid4()
    a.leg(call)
    owners = await eventually(_roles(b.directory, str(call), {"visitor"}))
    assert owners["visitor"].instance_id == "a"
    assert infos(logs, f"connected to Redis at unix://{cluster.redis.unixsocket}?db=1")

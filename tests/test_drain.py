"""
The drain (C{--on-stop drain}, SIGTERM's default): the AudioSocket listeners
close, live calls go on bridged until they end by themselves (bounded by
C{--drain-timeout}), the API answers meanwhile, and the process exits once
the last leg is gone. Real C{twistd} children over loopback, and the
service in this process for the refusal of a leg that arrives during it.
"""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock, deferLater

from audiohangup.drain import Drain
from audiohangup.reasons import CloseReason
from audiohangup.registry import Registry
from audiohangup.wire import Kind, encode_frame
from tests.conftest import Server, until
from tests.fake_asterisk import FakeAsterisk, connect
from tests.redis_server import free_port
from tests.twistd_child import (
    Child,
    Spawn,
    assert_orderly_shutdown,
    assert_quiet,
    assert_sigterm_exit,
    get_json,
    index_of,
    listening_ports,
    settle,
    start_server,
    twistd_script,
    wait_for_legs,
)

FRAMES = 10


def frames_of(tag: int) -> list[bytes]:
    """FRAMES distinct 20 ms slin frames, none of them silence."""
    return [encode_frame(Kind.SLIN, bytes([tag, n + 1]) * 160) for n in range(FRAMES)]


def heard(client: FakeAsterisk) -> list[bytes]:
    """The audio a leg was sent, its pacer's silence left out."""
    return [frame.encode() for frame in client.frames if frame.kind == Kind.SLIN and any(frame.payload)]


async def talk(visitor: FakeAsterisk, resident: FakeAsterisk, tag: int) -> None:
    """Each leg says FRAMES frames; each must hear the other's, byte for byte, in order."""
    before_v, before_r = len(heard(visitor)), len(heard(resident))
    spoken, answered = frames_of(tag), frames_of(tag + 1)
    for mine, theirs in zip(spoken, answered, strict=True):
        visitor.send(mine)
        resident.send(theirs)
        await deferLater(reactor, 0.02)
    await until(
        lambda: len(heard(resident)) >= before_r + FRAMES and len(heard(visitor)) >= before_v + FRAMES,
        5, "the frames across",
    )
    assert heard(resident)[before_r:] == spoken
    assert heard(visitor)[before_v:] == answered


async def call_on(ports: dict[str, int]) -> tuple[uuid.UUID, FakeAsterisk, FakeAsterisk]:
    call_id = uuid.uuid4()
    visitor = await connect(ports["audiosocket-visitor"], on_hangup="close")
    resident = await connect(ports["audiosocket-resident"], on_hangup="close")
    visitor.send_uuid(call_id)
    resident.send_uuid(call_id)
    return call_id, visitor, resident


@pytest_twisted.ensureDeferred
async def test_a_drain_keeps_a_call_bridged_until_it_ends(spawn: Spawn, logs: Any) -> None:
    """
    SIGTERM: the listeners close (a new leg is refused), the live call goes
    on bridged both ways and the API answers for it; once it ends, the
    process exits in order.
    """
    child, ports = await start_server(spawn, "--on-stop", "drain")
    base = f"http://127.0.0.1:{ports['http']}"
    call_id, visitor, resident = await call_on(ports)
    await wait_for_legs(base, 2)
    await talk(visitor, resident, 0x10)

    child.signal("TERM")
    await until(lambda: "drain: new legs go elsewhere; 2 live leg(s) in 1 call(s)" in child.log, 10, "the drain")
    await until(lambda: "audiosocket-resident stopped listening" in child.log, 10, "the listeners to close")
    for role in ("visitor", "resident"):
        with pytest.raises(ConnectionRefusedError):
            await connect(ports[f"audiosocket-{role}"])
    await talk(visitor, resident, 0x20)
    code, body = await get_json(f"{base}/calls/{call_id}")
    assert code == 200 and [leg["role"] for leg in body["legs"]] == ["visitor", "resident"], body
    assert child.ended is None, child.describe()

    visitor.close()  # Asterisk ends the call: its session hangs up the other leg (--on-leg-end hangup)
    await settle(resident.closed, "the resident to be hung up by its session")
    ended = await child.exit()

    assert_sigterm_exit(child, ended)
    lines = assert_orderly_shutdown(child)
    assert_quiet(child)
    stopping = index_of(lines, "Received SIGTERM, shutting down.", child)
    draining = index_of(lines, "drain: new legs go elsewhere", child)
    gone = index_of(lines, f"{call_id} visitor leg ended: peer_closed", child)
    drained = index_of(lines, "drain: done, the last leg ended after", child)
    terminated = index_of(lines, "Main loop terminated.", child)
    assert stopping < draining < gone < drained < terminated, child.describe()
    assert "cause shutdown" not in child.log, child.describe()


@pytest_twisted.ensureDeferred
async def test_the_drain_timeout_hangs_up_the_rest(spawn: Spawn, logs: Any) -> None:
    """Past --drain-timeout the legs still live are hung up with cause shutdown, and the process exits."""
    child, ports = await start_server(spawn, "--on-stop", "drain", "--drain-timeout", "0.5")
    base = f"http://127.0.0.1:{ports['http']}"
    call_id, visitor, resident = await call_on(ports)
    await wait_for_legs(base, 2)

    child.signal("TERM")
    await settle(visitor.hangup_received, "the visitor's hangup at the drain's end")
    await settle(resident.hangup_received, "the resident's hangup at the drain's end")
    assert visitor.ended_with_single_hangup() and resident.ended_with_single_hangup()
    ended = await child.exit()

    assert_sigterm_exit(child, ended)
    lines = assert_orderly_shutdown(child)
    over = index_of(lines, "drain: --drain-timeout 0.5 s is over with 2 leg(s) still live", child)
    for role in ("visitor", "resident"):
        assert over < index_of(lines, f"{call_id} {role} hangup sent (cause shutdown)", child), child.describe()


@pytest_twisted.ensureDeferred
async def test_a_leg_arriving_during_a_drain_is_refused_as_draining(server: Server, logs: Any) -> None:
    """A connection accepted as the listeners close gets no leg: closed at once, reason draining, counted."""
    server.registry.refusing = "the server is stopping (--on-stop drain)"
    leg = await connect(server.port("visitor"), on_hangup="close")
    leg.send_uuid(uuid.uuid4())
    await settle(leg.closed, "the refused connection to close")
    assert len(server.registry) == 0 and server.registry.connection_count == 0
    counted = server.service.metrics.get_sample_value(
        "audiohangup_connections_without_leg_total", {"reason": CloseReason.DRAINING.value}
    )
    assert counted == 1.0
    ended = [event for event in logs.ended() if event.get("reason") == CloseReason.DRAINING]
    assert len(ended) == 1 and ended[0]["log_level"].name == "warn", ended


class TestDrainService:
    """The drain's waits, on a clock of its own."""

    def test_no_leg_no_wait(self) -> None:
        clock = Clock()
        stopped = Drain(Registry(), 1.0, clock, drain_timeout=60.0).stopService()  # type: ignore[arg-type]
        assert stopped.called

    def test_it_waits_for_the_last_connection(self) -> None:
        clock = Clock()
        registry = Registry()
        leg: Any = object()
        registry.connected(leg)
        stopped = Drain(registry, 1.0, clock, drain_timeout=60.0).stopService()  # type: ignore[arg-type]
        clock.advance(59)
        assert not stopped.called
        assert registry.refusing is not None
        registry.disconnected(leg)
        assert stopped.called


# Handing the ports over: SO_REUSEPORT


def shared(ports: dict[str, int], http: int) -> list[str]:
    """The options of a process on the AudioSocket ports C{ports}, with its API on C{http}."""
    return [
        "--reuse-port", "--on-stop", "drain", "--call-records", "none",
        "--visitor", f"tcp:{ports['audiosocket-visitor']}:interface=127.0.0.1",
        "--resident", f"tcp:{ports['audiosocket-resident']}:interface=127.0.0.1",
        "--http", f"tcp:{http}:interface=127.0.0.1",
    ]


@pytest_twisted.ensureDeferred
async def test_reuse_port_hands_the_ports_over(spawn: Spawn, logs: Any) -> None:
    """
    Two processes on the same AudioSocket ports (--reuse-port). SIGTERM to
    the first: new calls go to the second, the first's call goes on bridged
    until it ends, then the first exits; the second serves on.
    """
    ports = {"audiosocket-visitor": free_port(), "audiosocket-resident": free_port()}
    old, _ = await start_server(spawn, *shared(ports, free_port()))
    old_call, old_visitor, old_resident = await call_on(ports)
    await until(lambda: f"{old_call} resident leg started" in old.log, 10, "the old call on the old process")
    new, new_ports = await start_server(spawn, *shared(ports, free_port()))
    assert {name: new_ports[name] for name in ports} == ports

    old.signal("TERM")
    await until(lambda: "audiosocket-resident stopped listening" in old.log, 10, "the old process to stop listening")
    assert "audiosocket-visitor stopped listening" in old.log
    new_call, new_visitor, new_resident = await call_on(ports)
    await until(lambda: f"{new_call} resident leg started" in new.log, 10, "the new call on the new process")
    await until(lambda: f"{new_call} visitor leg started" in new.log, 10, "the new call on the new process")
    await talk(new_visitor, new_resident, 0x30)
    await talk(old_visitor, old_resident, 0x40)
    assert str(new_call) not in old.log and str(old_call) not in new.log
    assert old.ended is None, old.describe()

    old_visitor.close()
    await settle(old_resident.closed, "the old call's resident to be hung up by its session")
    ended = await old.exit()
    assert_sigterm_exit(old, ended)
    assert_orderly_shutdown(old)
    assert_quiet(old)
    await talk(new_visitor, new_resident, 0x50)  # the new process serves on


# The overlap without Redis: a local directory between the two processes

TOKEN = "drain-test-control-token-0123456789"


def sharing(ports: dict[str, int], folder: Path, name: str) -> list[str]:
    """A process on the shared AudioSocket and HTTP ports, with the local directory in C{folder}."""
    return [
        *shared(ports, ports["http"]), "--local-directory", str(folder), "--api-token", TOKEN,
        "--instance-id", name, "--heartbeat", "0.5",
    ]


async def answers(http: int, calls: dict[uuid.UUID, str], tries: int = 8) -> None:
    """
    Ask the shared API port for the calls of both processes C{tries} times
    (each a new connection, to either process): each call is listed with its
    legs on the instance that holds them (call id -> instance id).
    """
    for _ in range(tries):
        response = await treq.get(
            f"http://127.0.0.1:{http}/calls?scope=cluster", headers={"Authorization": f"Bearer {TOKEN}"},
            persistent=False, timeout=10,
        )
        body = await response.json()
        assert response.code == 200, body
        listed = {call["call_id"]: call["legs"] for call in body["calls"]}
        for call_id, instance_id in calls.items():
            assert [(leg["role"], leg["instance_id"]) for leg in listed[str(call_id)]] == [
                ("visitor", instance_id), ("resident", instance_id)
            ], body


@pytest_twisted.ensureDeferred
async def test_the_overlap_with_a_local_directory(spawn: Spawn, tmp_path: Path, logs: Any) -> None:
    """
    Two processes on the same AudioSocket and API ports share a local
    directory. After SIGTERM to the old one: the API (either process)
    answers for the calls of both; a call whose first leg is on the old
    process and whose second lands on the new one is one bridged call,
    byte-exact both ways through the media link; the old process exits once
    its calls end.
    """
    folder = tmp_path / "run"
    ports = {"audiosocket-visitor": free_port(), "audiosocket-resident": free_port(), "http": free_port()}
    old, _ = await start_server(spawn, *sharing(ports, folder, "old"))
    old_call, old_visitor, old_resident = await call_on(ports)
    split_id = uuid.uuid4()
    split_visitor = await connect(ports["audiosocket-visitor"], on_hangup="close")
    split_visitor.send_uuid(split_id)
    await until(lambda: f"{split_id} visitor leg started" in old.log, 10, "the split call's first leg on the old one")
    new, _ = await start_server(spawn, *sharing(ports, folder, "new"))

    old.signal("TERM")
    await until(lambda: "audiosocket-resident stopped listening" in old.log, 10, "the old process to stop listening")
    new_call, new_visitor, new_resident = await call_on(ports)
    split_resident = await connect(ports["audiosocket-resident"], on_hangup="close")
    split_resident.send_uuid(split_id)
    await until(lambda: f"{split_id} resident linked from instance new to instance old" in new.log, 10, "the link")
    await until(lambda: f"{split_id} resident leg joined over the link from instance new" in old.log, 10, "the join")
    await talk(split_visitor, split_resident, 0x60)
    await talk(old_visitor, old_resident, 0x70)
    await talk(new_visitor, new_resident, 0x80)
    await answers(ports["http"], {old_call: "old", new_call: "new"})

    # A hangup of the old call, through the shared port: whichever process takes it, the old one hangs up.
    response = await treq.post(
        f"http://127.0.0.1:{ports['http']}/calls/{old_call}/hangup?wait=true",
        headers={"Authorization": f"Bearer {TOKEN}"}, persistent=False, timeout=10,
    )
    assert response.code == 200, await response.text()
    await settle(old_visitor.hangup_received, "the old call's visitor to be hung up by the API")
    await settle(old_resident.hangup_received, "the old call's resident to be hung up by the API")
    split_visitor.close()
    await settle(split_resident.closed, "the split call's resident, on the new process, to be hung up")
    ended = await old.exit()
    assert_sigterm_exit(old, ended)
    assert_orderly_shutdown(old)
    await talk(new_visitor, new_resident, 0x90)
    await answers(ports["http"], {new_call: "new"})


# systemd socket activation: Twisted's systemd: endpoints, named sockets


@pytest_twisted.ensureDeferred
async def test_systemd_sockets_are_taken_by_name_and_kept_for_the_next(tmp_path: Path, logs: Any) -> None:
    """
    The listening sockets come from the parent, as systemd passes them
    (LISTEN_FDS, LISTEN_FDNAMES, LISTEN_PID): a call is bridged on them; the
    drain closes only the child's copies, so the sockets still listen for
    the next process after the child exited.
    """
    sockets = {}
    for role in ("visitor", "resident"):
        sockets[role] = socket.socket()
        sockets[role].bind(("127.0.0.1", 0))
        sockets[role].listen(16)
    ports = {f"audiosocket-{role}": handle.getsockname()[1] for role, handle in sockets.items()}
    argv = [
        "/bin/sh", "-c", 'LISTEN_PID=$$; export LISTEN_PID; exec "$0" "$@"', twistd_script(), "-n", "--pidfile=",
        "audiohangup", "--visitor", "systemd:domain=INET:name=visitor", "--resident",
        "systemd:domain=INET:name=resident", "--http", "tcp:0:interface=127.0.0.1", "--call-records", "none",
        "--allow", "127.0.0.0/8",
    ]
    child = Child(argv)
    env = dict(os.environ, LISTEN_FDS="2", LISTEN_FDNAMES="visitor:resident")
    reactor.spawnProcess(
        child, argv[0], argv, env=env, path=str(tmp_path),
        childFDs={0: "w", 1: "r", 2: "r", 3: sockets["visitor"].fileno(), 4: sockets["resident"].fileno()},
    )
    try:
        await until(lambda: child.ended is not None or len(listening_ports(child.log)) == 3, 20, "the listeners")
        assert {name: port for name, port in listening_ports(child.log).items() if name in ports} == ports, child.describe()
        await wait_for_legs(f"http://127.0.0.1:{listening_ports(child.log)['http']}", 0)
        call_id, visitor, resident = await call_on(ports)
        await until(lambda: f"{call_id} resident leg started" in child.log, 10, "the call")
        await talk(visitor, resident, 0xA0)
        child.signal("TERM")
        await until(lambda: "drain: new legs go elsewhere" in child.log, 10, "the drain")
        visitor.close()
        await settle(resident.closed, "the resident to be hung up by its session")
        assert_sigterm_exit(child, await child.exit())
        assert_orderly_shutdown(child)
        # The parent's sockets still listen: the next process takes what comes.
        waiting = await connect(ports["audiosocket-visitor"])
        waiting.transport.loseConnection()
    finally:
        if child.ended is None:
            child.signal("KILL")
            await child.exit()
        for handle in sockets.values():
            handle.close()


# With Redis: a draining instance stays in the directory until its last leg ends


@pytest_twisted.ensureDeferred
async def test_a_draining_instance_is_still_reached_through_redis(spawn: Spawn, redis_server: Any, logs: Any) -> None:
    """
    Instance a drains a call; its presence and legs stay in the directory, so
    a hangup sent to instance b is forwarded to a and ends the call; then a
    exits and leaves the directory.
    """
    from tests.test_cluster import HEARTBEAT, TTL, Instance, request, wait_listed
    from tests.test_cluster import TOKEN as CLUSTER_TOKEN

    async def instance(name: str) -> Instance:
        http = free_port()
        child, ports = await start_server(
            spawn, "--http", f"tcp:{http}:interface=127.0.0.1", "--call-records", "none", "--on-stop", "drain",
            "--redis", redis_server.url, "--instance-id", name, "--advertise-url", f"http://127.0.0.1:{http}",
            "--heartbeat", str(HEARTBEAT), "--api-token", CLUSTER_TOKEN,
        )
        return Instance(name, child, ports)

    a, b = await instance("a"), await instance("b")
    call_id, visitor, resident = await call_on(a.ports)
    listed = {(str(call_id), "visitor"): "a", (str(call_id), "resident"): "a"}
    await wait_listed(b, listed)

    a.child.signal("TERM")
    await until(lambda: "drain: new legs go elsewhere" in a.child.log, 10, "a's drain")
    await talk(visitor, resident, 0xB0)
    # A whole TTL later (entries a stopped refreshing would be gone by then), a and its legs are still listed.
    await deferLater(reactor, TTL + HEARTBEAT)
    await wait_listed(b, listed, timeout=0.0)
    status, body, _ = await request("POST", f"{b.url}/calls/{call_id}/hangup?wait=true")
    assert status == 200, body
    await settle(visitor.hangup_received, "the visitor on a to be hung up through b")
    await settle(resident.hangup_received, "the resident on a to be hung up through b")
    assert_sigterm_exit(a.child, await a.child.exit())
    assert f"{call_id} visitor hangup sent (cause api)" in a.child.log, a.child.describe()
    assert "cause shutdown" not in a.child.log
    status, body, _ = await request("GET", f"{b.url}/instances")
    assert status == 200 and [entry["instance_id"] for entry in body["instances"]] == ["b"], body


class TestDrainLog:
    """What a drain says, on a clock of its own: its start, its progress, its end."""

    def test_start_progress_and_timeout(self, logs: Any) -> None:
        clock = Clock()
        registry = Registry()
        leg: Any = object()
        registry.connected(leg)
        Drain(registry, 1.0, clock, drain_timeout=100.0, progress=30.0).stopService()  # type: ignore[arg-type]
        clock.advance(30)
        clock.advance(30)
        texts = logs.texts()
        assert any("drain: new legs go elsewhere; 1 live leg(s) in 0 call(s)" in text for text in texts), texts
        for progress in ("1 live leg(s) in 0 call(s) after 30 s (70 s left)", "after 60 s (40 s left)"):
            assert any(progress in text for text in texts), texts
        registry.disconnected(leg)
        assert any("drain: done, the last leg ended after 60.0 s" in text for text in logs.texts())

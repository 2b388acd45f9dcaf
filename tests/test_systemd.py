"""
systemd's notify protocol: the pieces on a Clock with the messages kept, a
real datagram socket bound by the test (a path and an abstract name), and a
real C{twistd} child told C{$NOTIFY_SOCKET} as systemd would: C{READY=1},
C{STATUS=} with its legs, C{WATCHDOG=1} pings and C{STOPPING=1} on SIGTERM.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import Clock

from audiohangup.metrics import ReactorLag
from audiohangup.systemd import NotifySocket, SystemdNotifier, notify_address, status_text, watchdog_interval
from tests.conftest import LogCapture, until
from tests.fake_asterisk import connect
from tests.twistd_child import (
    Spawn,
    assert_orderly_shutdown,
    assert_quiet,
    assert_sigterm_exit,
    settle,
    start_server,
    wait_for_legs,
)

# The environment's words


def test_notify_socket_names_a_path_or_an_abstract_name() -> None:
    assert notify_address("/run/systemd/notify") == b"/run/systemd/notify"
    assert notify_address("@/org/freedesktop/systemd1/notify/1") == b"\0/org/freedesktop/systemd1/notify/1"
    assert notify_address(None) is None
    assert notify_address("") is None


def test_a_notify_socket_of_another_kind_is_said_and_left(logs: LogCapture) -> None:
    assert notify_address("vsock:2:1234") is None
    assert any("NOTIFY_SOCKET=vsock:2:1234" in text for text in logs.texts())


@pytest.mark.parametrize(
    ("environ", "interval"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4242"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4243"}, None),  # meant for another process
        ({}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
    ],
)
def test_watchdog_interval_is_half_of_watchdog_usec_for_this_process(environ: dict[str, str], interval: float | None) -> None:
    assert watchdog_interval(environ, 4242) == interval


def test_status_text_counts_legs_and_sessions() -> None:
    assert status_text(1, 1) == "1 live leg in 1 session"
    assert status_text(4, 2, stopping=True) == "stopping: 4 live legs in 2 sessions"


# The notifier on a Clock


class Port:
    """A listener whose port listens when the test says so."""

    def __init__(self) -> None:
        self.waiters: list[Deferred[None]] = []

    def listening(self) -> Deferred[None]:
        waiter: Deferred[None] = Deferred()
        self.waiters.append(waiter)
        return waiter

    def listen(self) -> None:
        for waiter in self.waiters:
            waiter.callback(None)


def notifier(environ: dict[str, str], *ports: Port) -> tuple[SystemdNotifier, Clock, list[str], list[int]]:
    clock = Clock()
    sent: list[str] = []
    counts = [0, 0]
    notifier = SystemdNotifier(
        clock, lambda: (counts[0], counts[1]), list(ports), environ=environ, send=sent.append, status_interval=2.0
    )
    return notifier, clock, sent, counts


def test_ready_once_every_listener_listens() -> None:
    visitor, resident = Port(), Port()
    service, _clock, sent, _counts = notifier({}, visitor, resident)
    service.startService()
    visitor.listen()
    assert sent == []
    resident.listen()
    assert sent == ["READY=1\nSTATUS=0 live legs in 0 sessions"]
    assert service.ready


def test_status_is_refreshed_when_it_changes() -> None:
    service, clock, sent, counts = notifier({}, Port())
    service.startService()
    service.listeners[0].listen()  # type: ignore[attr-defined]
    sent.clear()
    clock.advance(2.0)
    assert sent == []  # nothing changed: nothing sent
    counts[:] = [2, 1]
    clock.advance(2.0)
    assert sent == ["STATUS=2 live legs in 1 session"]
    clock.advance(2.0)
    assert sent == ["STATUS=2 live legs in 1 session"]


def test_watchdog_pings_at_half_the_timeout_from_the_start() -> None:
    service, clock, sent, _counts = notifier({"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid())})
    service.startService()
    assert sent[0] == "WATCHDOG=1"
    clock.pump([1.0] * 6)
    assert sent.count("WATCHDOG=1") == 4  # at 0, 2, 4 and 6 s
    service.stopService()
    clock.advance(10.0)
    assert sent.count("WATCHDOG=1") == 4
    assert clock.getDelayedCalls() == []


def test_no_watchdog_pings_for_another_process() -> None:
    service, clock, sent, _counts = notifier({"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid() + 1)})
    service.startService()
    clock.advance(10.0)
    assert "WATCHDOG=1" not in sent


def test_stopping_is_said_once_with_what_is_still_live() -> None:
    service, clock, sent, counts = notifier({}, Port())
    service.startService()
    service.listeners[0].listen()  # type: ignore[attr-defined]
    counts[:] = [3, 2]
    sent.clear()
    service.stopping()
    service.stopping()
    assert sent == ["STOPPING=1\nSTATUS=stopping: 3 live legs in 2 sessions"]
    counts[:] = [1, 1]
    clock.advance(2.0)  # a drain shows as it goes
    assert sent[-1] == "STATUS=stopping: 1 live leg in 1 session"


def test_without_notify_socket_nothing_is_opened_or_sent() -> None:
    clock = Clock()
    service = SystemdNotifier(clock, lambda: (0, 0), [Port()], environ={"WATCHDOG_USEC": "1000000"})
    service.startService()
    service.stopping()
    assert not service.enabled
    assert clock.getDelayedCalls() == []
    service.stopService()


def test_reactor_lag_is_how_late_the_timer_fires() -> None:
    from prometheus_client import CollectorRegistry

    metrics = CollectorRegistry()
    clock = Clock()
    lag = ReactorLag(metrics, clock, interval=0.5)
    lag.startService()
    clock.advance(0.5)
    clock.advance(0.8)  # the next was due at 1.0 and ran at 1.3
    assert metrics.get_sample_value("audiohangup_reactor_lag_seconds_count") == 2
    assert metrics.get_sample_value("audiohangup_reactor_lag_seconds_sum") == pytest.approx(0.3)
    assert metrics.get_sample_value("audiohangup_reactor_lag_seconds_bucket", {"le": "0.25"}) == 1
    lag.stopService()
    assert clock.getDelayedCalls() == []


# A real datagram socket


@pytest.fixture
def sockets() -> Iterator[Path]:
    """A short directory: a UNIX socket's path must fit in 107 bytes."""
    directory = tempfile.mkdtemp(prefix="ah-notify-")
    try:
        yield Path(directory)
    finally:
        shutil.rmtree(directory)


def bound(address: str | bytes) -> socket.socket:
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(address)
    receiver.settimeout(5.0)
    return receiver


def test_a_datagram_reaches_a_socket_by_its_path(sockets: Path) -> None:
    receiver = bound(str(sockets / "notify"))
    sender = NotifySocket(notify_address(str(sockets / "notify")) or b"")
    try:
        assert sender.send("READY=1\nSTATUS=ok")
        assert receiver.recv(4096) == b"READY=1\nSTATUS=ok"
    finally:
        sender.close()
        receiver.close()


def test_a_datagram_reaches_an_abstract_name() -> None:
    name = f"@audiohangup-test-{uuid.uuid4()}"
    receiver = bound(notify_address(name) or b"")
    sender = NotifySocket(notify_address(name) or b"")
    try:
        assert sender.send("WATCHDOG=1")
        assert receiver.recv(4096) == b"WATCHDOG=1"
    finally:
        sender.close()
        receiver.close()


def test_a_socket_that_is_gone_is_logged_once_and_never_raises(sockets: Path, logs: LogCapture) -> None:
    sender = NotifySocket(os.fsencode(sockets / "nobody"))
    try:
        assert not sender.send("WATCHDOG=1")
        assert not sender.send("WATCHDOG=1")
    finally:
        sender.close()
    said = [text for text in logs.texts() if "notify socket did not take" in text]
    assert len(said) == 1, said


# A real twistd child under a NOTIFY_SOCKET the test binds


class Notifications(DatagramProtocol):
    def __init__(self) -> None:
        self.messages: list[str] = []

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self.messages.append(datagram.decode())

    def find(self, prefix: str) -> list[str]:
        return [message for message in self.messages if message.startswith(prefix)]


@pytest_twisted.ensureDeferred
async def test_twistd_tells_systemd_ready_status_watchdog_and_stopping(
    spawn: Spawn, sockets: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    As under a unit of Type=notify with WatchdogSec=1 (pings every half
    second): READY=1 with every port listening, the status following a live
    call, and STOPPING=1 on SIGTERM while the call is still live, before the
    drain hangs it up.
    """
    notifications = Notifications()
    port = reactor.listenUNIXDatagram(str(sockets / "notify"), notifications)
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", str(sockets / "notify"))
        monkeypatch.setenv("WATCHDOG_USEC", "1000000")
        monkeypatch.delenv("WATCHDOG_PID", raising=False)
        child, ports = await start_server(spawn)
        await until(lambda: notifications.find("READY=1"), 10.0, "READY=1")
        assert notifications.find("READY=1") == ["READY=1\nSTATUS=0 live legs in 0 sessions"]
        base = f"http://127.0.0.1:{ports['http']}"

        leg = await connect(ports["audiosocket-visitor"], on_hangup="close")
        leg.send_uuid(uuid.uuid4())
        await wait_for_legs(base, 1)
        await until(lambda: "STATUS=1 live leg in 1 session" in notifications.messages, 10.0, "STATUS of one leg")
        pings = len(notifications.find("WATCHDOG=1"))
        await until(lambda: len(notifications.find("WATCHDOG=1")) >= pings + 3, 10.0, "three more pings")

        child.signal("TERM")
        await settle(leg.hangup_received, "00 00 00 from the server on SIGTERM")
        ended = await child.exit()
        assert notifications.find("STOPPING=1") == ["STOPPING=1\nSTATUS=stopping: 1 live leg in 1 session"]
        assert_sigterm_exit(child, ended)
        assert_orderly_shutdown(child)
        assert_quiet(child)
    finally:
        await port.stopListening()

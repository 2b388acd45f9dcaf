# -*- test-case-name: tests.test_systemd -*-
"""
systemd's notify protocol (C{sd_notify(3)}), so a unit of C{Type=notify}
knows when the server is ready, what it holds, when it stops, and whether
its reactor still turns.

Each message is one datagram of C{KEY=value} lines sent to the UNIX socket
C{$NOTIFY_SOCKET} names: a path, or with a leading C{@} a name in the
abstract namespace. Without the variable (not under systemd, or a unit of
another type) nothing is sent and nothing is opened. The protocol is a
dozen lines over the standard library's socket module, as systemd's own
documentation suggests for languages without libsystemd; the small
libraries on PyPI for it (sdnotify, systemd-python's C{daemon.notify}) are
either unmaintained or need libsystemd's headers to build, and neither
drives the watchdog from the reactor, which is the part that matters here.

L{SystemdNotifier} sends:

 - C{READY=1} once every listener listens (before it, systemd holds back
   whatever is ordered after the unit);
 - C{STATUS=} with the live legs and sessions, refreshed every few
   seconds while they change (C{systemctl status} shows it);
 - C{STOPPING=1} at the very start of a stop, when L{stopping} is called;
 - C{WATCHDOG=1} from a reactor timer at half of C{$WATCHDOG_USEC}
   (C{WatchdogSec=}), unless C{$WATCHDOG_PID} names another process. The
   pings come from the reactor itself, so a reactor stuck in a loop stops
   them and systemd kills and restarts the service.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

__all__ = ["NotifySocket", "SystemdNotifier", "notify_address", "status_text", "watchdog_interval"]

#: Seconds between two refreshes of C{STATUS=} (sent only when it changed).
STATUS_INTERVAL = 2.0

log = Logger()


def notify_address(value: str | None) -> bytes | None:
    """
    The address C{$NOTIFY_SOCKET} names: a path, or an abstract name (its
    C{@} made the NUL byte the kernel expects). None when it is unset, empty,
    or of a kind this does not speak (C{vsock:}, which systemd 254 added for
    virtual machines): the server then runs as without systemd, and says so.
    """
    if not value:
        return None
    if value.startswith("@"):
        return b"\0" + os.fsencode(value[1:])
    if value.startswith("/"):
        return os.fsencode(value)
    log.warn("NOTIFY_SOCKET={value} is neither a path nor an abstract name: systemd is not told", value=value)
    return None


def watchdog_interval(environ: Mapping[str, str], pid: int) -> float | None:
    """
    Seconds between two C{WATCHDOG=1}: half of C{$WATCHDOG_USEC}, as
    C{sd_watchdog_enabled(3)} advises. None when the watchdog is off, the
    value is not a positive number, or C{$WATCHDOG_PID} names another
    process (the variables were inherited from a parent that is watched).
    """
    usec = environ.get("WATCHDOG_USEC")
    if not usec:
        return None
    watched = environ.get("WATCHDOG_PID")
    if watched and watched != str(pid):
        return None
    try:
        microseconds = int(usec)
    except ValueError:
        log.warn("WATCHDOG_USEC={value} is not a whole number of microseconds: no watchdog pings", value=usec)
        return None
    if microseconds <= 0:
        return None
    return microseconds / 2 / 1e6


def status_text(legs: int, sessions: int, *, stopping: bool = False) -> str:
    """What C{systemctl status} shows on its Status: line."""
    text = f"{legs} live leg{'s' * (legs != 1)} in {sessions} session{'s' * (sessions != 1)}"
    return f"stopping: {text}" if stopping else text


class NotifySocket:
    """
    A datagram socket to systemd's notify socket. A send never blocks the
    reactor and never raises: a datagram that cannot go (systemd gone, its
    queue full) is dropped and logged, once until one goes again; a missed
    watchdog ping is made up by the next.
    """

    def __init__(self, address: bytes) -> None:
        self.address = address
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.socket.setblocking(False)
        self._failing = False

    def send(self, message: str) -> bool:
        try:
            self.socket.sendto(message.encode("utf-8"), self.address)
        except OSError as error:
            if not self._failing:
                log.warn(
                    "systemd's notify socket did not take {message!r}: {error} (logged once until one goes)",
                    message=message.split("\n")[0], error=str(error),
                )
            self._failing = True
            return False
        self._failing = False
        return True

    def close(self) -> None:
        self.socket.close()


class Listening(Protocol):
    """What the notifier waits for: a listener whose C{listening()} fires once its port listens."""

    def listening(self) -> Deferred[None]: ...


class SystemdNotifier(Service):
    """
    Tells systemd what the server is doing (see the module's docstring).
    Without C{$NOTIFY_SOCKET} it does nothing at all. It stops last, so the
    watchdog pings and the status go on through the whole stop.
    """

    name = "systemd"

    def __init__(
        self,
        clock: IReactorTime,
        counts: Callable[[], tuple[int, int]],
        listeners: Sequence[Listening] = (),
        *,
        environ: Mapping[str, str] | None = None,
        send: Callable[[str], object] | None = None,
        status_interval: float = STATUS_INTERVAL,
    ) -> None:
        """
        @param counts: the live legs and sessions, read at each refresh.
        @param send: where the messages go (tests); by default the socket
            C{$NOTIFY_SOCKET} names, opened at start.
        """
        self.clock = clock
        self.counts = counts
        self.listeners = list(listeners)
        self.environ = os.environ if environ is None else environ
        self._send = send
        self._socket: NotifySocket | None = None
        self.status_interval = status_interval
        self.ready = False
        self.stopped = False
        self._status: str | None = None
        self._watchdog: LoopingCall | None = None
        self._refresh: LoopingCall | None = None

    @property
    def enabled(self) -> bool:
        return self._send is not None

    def startService(self) -> None:
        super().startService()
        self.ready = self.stopped = False
        if self._send is None:
            address = notify_address(self.environ.get("NOTIFY_SOCKET"))
            if address is None:
                return
            self._socket = NotifySocket(address)
            self._send = self._socket.send
        interval = watchdog_interval(self.environ, os.getpid())
        if interval is not None:
            self._watchdog = self._loop(lambda: self.notify("WATCHDOG=1"), interval)
        waiting = DeferredList([listener.listening() for listener in self.listeners], fireOnOneErrback=True)
        waiting.addCallbacks(lambda _: self._ready(), lambda _: None)  # a port that fails stops start-up itself

    def _loop(self, work: Callable[[], object], interval: float) -> LoopingCall:
        loop = LoopingCall(work)
        loop.clock = self.clock
        loop.start(interval, now=True)
        return loop

    def notify(self, *lines: str) -> None:
        """Send one datagram of these C{KEY=value} lines (nothing without systemd)."""
        if self._send is not None:
            self._send("\n".join(lines))

    def _ready(self) -> None:
        if not self.running or self.stopped:
            return
        self.ready = True
        self.notify("READY=1", f"STATUS={self._current()}")
        self._refresh = self._loop(self.refresh, self.status_interval)

    def _current(self) -> str:
        self._status = status_text(*self.counts(), stopping=self.stopped)
        return self._status

    def refresh(self) -> None:
        """Send C{STATUS=} if it changed since it was last sent."""
        previous = self._status
        if self._current() != previous:
            self.notify(f"STATUS={self._status}")

    def stopping(self) -> None:
        """
        The server begins to stop: C{STOPPING=1}, once, before anything of
        the stop (the drain that follows shows in the status it refreshes).
        """
        if self.stopped:
            return
        self.stopped = True
        self.notify("STOPPING=1", f"STATUS={self._current()}")

    def stopService(self) -> None:
        super().stopService()
        for loop in (self._refresh, self._watchdog):
            if loop is not None and loop.running:
                loop.stop()
        self._refresh = self._watchdog = None
        if self._socket is not None:
            self._socket.close()
            self._socket = None
            self._send = None

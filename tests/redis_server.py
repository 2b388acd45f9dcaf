"""
A throwaway C{redis-server} for tests: a child of the test's reactor on a
free loopback port (and, if asked, a unix socket), with no persistence, that a
test can stop and start again on the same port (an empty Redis comes back).

Use the C{redis_server} fixture (conftest.py)::

    @pytest_twisted.ensureDeferred
    async def test_something(redis_server: RedisServer) -> None:
        ... redis_server.url ...
        await redis_server.stop()
        await redis_server.start()

or the class directly, as an async context manager::

    async with RedisServer() as server:
        ...

Tests that need Redis are skipped when no C{redis-server} is installed.
Nothing here blocks the reactor: the server is spawned with
C{reactor.spawnProcess} and probed with C{PING} over a Twisted connection.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from typing import Any

import pytest
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, UNIXClientEndpoint
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure

#: Seconds a server has to answer PING after it is spawned, and to exit once told to.
START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0


def redis_server_executable() -> str | None:
    return shutil.which("redis-server") or (
        "/usr/bin/redis-server" if os.access("/usr/bin/redis-server", os.X_OK) else None
    )


def free_port() -> int:
    """A loopback port with nothing listening on it (now)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class _Child(ProcessProtocol):
    def __init__(self) -> None:
        self.output = bytearray()
        self.ended: Failure | None = None
        self._waiters: list[Deferred[None]] = []

    def outReceived(self, data: bytes) -> None:
        self.output += data

    def errReceived(self, data: bytes) -> None:
        self.output += data

    def processEnded(self, reason: Failure) -> None:
        self.ended = reason
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def whenEnded(self) -> Deferred[None]:
        waiter: Deferred[None] = Deferred()
        if self.ended is not None:
            waiter.callback(None)
        else:
            self._waiters.append(waiter)
        return waiter

    def signal(self, name: str) -> None:
        try:
            self.transport.signalProcess(name)
        except ProcessExitedAlready:
            pass


class _PingFactory(Factory):
    noisy = False

    def __init__(self, pinger: _Ping) -> None:
        self.pinger = pinger

    def buildProtocol(self, addr: object) -> _Ping:
        return self.pinger


class _Ping(Protocol):
    """Sends PING; C{answered} fires True on +PONG, False if the connection ends first."""

    def __init__(self) -> None:
        self.answered: Deferred[bool] = Deferred()
        self._received = b""

    def connectionMade(self) -> None:
        self.transport.write(b"PING\r\n")

    def dataReceived(self, data: bytes) -> None:
        self._received += data
        if b"\r\n" in self._received and not self.answered.called:
            self.answered.callback(self._received.startswith(b"+PONG"))
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure | None = None) -> None:
        if not self.answered.called:
            self.answered.callback(False)


async def _within(deferred: Deferred[Any], seconds: float) -> bool:
    """Whether C{deferred} fired within C{seconds}; it is cancelled otherwise."""
    timer = reactor.callLater(seconds, deferred.cancel)
    try:
        await deferred
    except Exception:
        return False
    finally:
        if timer.active():
            timer.cancel()
    return True


class RedisServer:
    """
    One C{redis-server}: C{--bind 127.0.0.1 --port N --save '' --appendonly no},
    plus C{--unixsocket} if C{unixsocket} is given. Its port (and socket) stay
    the same across L{stop} and L{start}.
    """

    def __init__(self, port: int | None = None, unixsocket: str | None = None) -> None:
        executable = redis_server_executable()
        if executable is None:
            pytest.skip("redis-server is not installed")
        self.executable = executable
        self.port = port if port is not None else free_port()
        self.unixsocket = unixsocket
        self.directory = tempfile.mkdtemp(prefix="audiohangup-redis-")
        self._child: _Child | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    @property
    def unix_url(self) -> str:
        assert self.unixsocket is not None, "started without a unix socket"
        return f"unix://{self.unixsocket}"

    @property
    def running(self) -> bool:
        return self._child is not None and self._child.ended is None

    @property
    def output(self) -> str:
        return "" if self._child is None else self._child.output.decode("utf-8", "replace")

    def argv(self) -> list[str]:
        argv = [
            self.executable, "--port", str(self.port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no", "--daemonize", "no",
            "--dir", self.directory, "--logfile", "",
        ]
        if self.unixsocket is not None:
            argv += ["--unixsocket", self.unixsocket, "--unixsocketperm", "700"]
        return argv

    async def start(self) -> RedisServer:
        """Spawn the server and wait until it answers PING (over TCP, and the socket if any)."""
        assert not self.running, "already running"
        child = self._child = _Child()
        argv = self.argv()
        reactor.spawnProcess(child, argv[0], argv, env=dict(os.environ), path=self.directory)
        deadline = reactor.seconds() + START_TIMEOUT
        while not await self.ping():
            if child.ended is not None:
                raise AssertionError(f"redis-server exited at start: {child.ended.value!r}\n{self.output}")
            if reactor.seconds() > deadline:
                await self.stop()
                raise AssertionError(f"redis-server did not answer PING within {START_TIMEOUT} s\n{self.output}")
            await deferLater(reactor, 0.02)
        return self

    async def ping(self) -> bool:
        """Whether the server answers PING now (on every address it listens on)."""
        endpoints = [TCP4ClientEndpoint(reactor, "127.0.0.1", self.port, timeout=1)]
        if self.unixsocket is not None:
            endpoints.append(UNIXClientEndpoint(reactor, self.unixsocket, timeout=1))
        for endpoint in endpoints:
            pinger = _Ping()
            try:
                await endpoint.connect(_PingFactory(pinger))
            except Exception:
                return False
            timer = reactor.callLater(1.0, pinger.transport.abortConnection)
            try:
                answered = await pinger.answered
            finally:
                if timer.active():
                    timer.cancel()
            if not answered:
                return False
        return True

    async def stop(self, signal: str = "TERM") -> None:
        """
        Stop the server (SIGTERM; C{"KILL"} for a crash) and wait until it has
        exited; its port is free for L{start} afterwards. Does nothing if it
        is not running.
        """
        child = self._child
        if child is None or child.ended is not None:
            return
        child.signal(signal)
        if not await _within(child.whenEnded(), STOP_TIMEOUT):
            child.signal("KILL")
            await _within(child.whenEnded(), STOP_TIMEOUT)

    async def close(self) -> None:
        """Stop for good and remove the working directory."""
        await self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)

    async def __aenter__(self) -> RedisServer:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

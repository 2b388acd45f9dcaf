"""
Shared fixtures: a real server on loopback ports, twistd child processes, log
capture that fails a test on any traceback or unhandled error, and a bounded
wait for conditions.
"""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
import pytest_twisted
from twisted.logger import formatEvent, globalLogPublisher

T = TypeVar("T")


@dataclass
class LogCapture:
    """Every event logged during a test."""

    events: list[dict[str, Any]] = field(default_factory=list)

    def texts(self) -> list[str]:
        return [formatEvent(event) for event in self.events]

    def ended(self, call_id: str | None = None) -> list[dict[str, Any]]:
        """The 'leg ended' events, optionally of one call."""
        return [
            event
            for event in self.events
            if "leg ended" in event.get("log_format", "")
            and (call_id is None or event.get("call_id") == call_id)
        ]

    def problems(self) -> list[str]:
        """Tracebacks, failures and unhandled errors: none may ever appear."""
        found = []
        for event in self.events:
            text = formatEvent(event)
            if "log_failure" in event or "Traceback" in text or "Unhandled" in text:
                found.append(text + "\n" + str(event.get("log_failure", "")))
        return found


@pytest.fixture
def logs() -> Iterator[LogCapture]:
    capture = LogCapture()
    globalLogPublisher.addObserver(capture.events.append)
    try:
        yield capture
        gc.collect()  # surfaces "Unhandled error in Deferred" from garbage
    finally:
        globalLogPublisher.removeObserver(capture.events.append)
    assert capture.problems() == []


async def until(predicate: Callable[[], T], timeout: float = 5.0, what: str = "") -> T:
    """Poll C{predicate} every 5 ms until it is truthy; fail after C{timeout} seconds."""
    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    deadline = reactor.seconds() + timeout
    while not (value := predicate()):
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        await deferLater(reactor, 0.005)
    return value


@dataclass
class Server:
    """A running audiohangup service on loopback ports chosen by the kernel."""

    service: Any

    @property
    def registry(self) -> Any:
        return self.service.registry

    def port(self, role: str) -> int:
        return self.service.getServiceNamed(f"audiosocket-{role}").port.getHost().port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.service.getServiceNamed('http').port.getHost().port}"

    @property
    def api(self) -> Any:
        """The ControlAPI behind the HTTP listener."""
        return self.service.api


async def bridged(server: Server) -> tuple[Any, Any, Any]:
    """A visitor and a resident of one new call, both live; the call id and their fake Asterisk clients."""
    import uuid

    from tests.fake_asterisk import connect

    call_id = uuid.uuid4()
    visitor = await connect(server.port("visitor"), on_hangup="close")
    resident = await connect(server.port("resident"), on_hangup="close")
    visitor.send_uuid(call_id)
    resident.send_uuid(call_id)
    await until(lambda: len(server.registry) == 2, what="two legs")
    return call_id, visitor, resident


@pytest_twisted.async_yield_fixture
async def make_server(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Server]]]:
    from twisted.internet import reactor

    from audiohangup.service import Config, build_service

    started = []

    async def make(**options: Any) -> Server:
        loopback = "tcp:0:interface=127.0.0.1"
        options.setdefault("records", str(tmp_path / f"records-{len(started)}.sqlite3"))
        options.setdefault("webhook_outbox", str(tmp_path / f"webhook-outbox-{len(started)}.sqlite3"))
        options.setdefault("http", loopback)
        options.setdefault("on_stop", "hangup")  # a test's stop hangs up what it left live; a drain would wait
        config = Config(visitor=loopback, resident=loopback, **options)
        service = build_service(config, reactor)
        service.privilegedStartService()
        service.startService()
        started.append(service)
        return Server(service)

    yield make
    for service in started:
        await service.stopService()


@pytest_twisted.async_yield_fixture
async def server(make_server: Callable[..., Awaitable[Server]]) -> AsyncIterator[Server]:
    yield await make_server()


@pytest_twisted.async_yield_fixture
async def spawn(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """
    Start a child in C{tmp_path} with a copy of the environment; kill any
    child still running when the test ends, pass or fail.
    """
    import os

    from twisted.internet import reactor

    from tests.twistd_child import Child

    children: list[Child] = []

    def start(executable: str, *args: str) -> Child:
        child = Child([executable, *args])
        reactor.spawnProcess(child, executable, [executable, *args], env=dict(os.environ), path=str(tmp_path))
        children.append(child)
        return child

    yield start
    for child in children:
        if child.ended is None:
            child.signal("KILL")
            await child.exit(timeout=10)


@pytest_twisted.async_yield_fixture
async def redis_server() -> AsyncIterator[Any]:
    """A redis-server of the test's own on a free loopback port and a unix socket (tests/redis_server.py)."""
    import shutil
    import tempfile

    from tests.redis_server import RedisServer

    # A short directory: a unix socket's path must fit in 107 bytes.
    sockets = tempfile.mkdtemp(prefix="ah-redis-")
    server = RedisServer(unixsocket=f"{sockets}/redis.sock")
    try:
        await server.start()
        yield server
    finally:
        await server.close()
        shutil.rmtree(sockets, ignore_errors=True)

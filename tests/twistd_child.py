"""
A C{twistd} child process for tests that run the server as a user would:
spawned in a temporary directory, its output kept, and helpers to wait for
it to listen, drive its API and check how it stopped. The C{spawn} fixture
lives in conftest.py.
"""

from __future__ import annotations

import re
import shutil
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import treq
from twisted.internet import defer, reactor
from twisted.internet.error import ProcessExitedAlready, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure

from tests.conftest import until

REPOSITORY = Path(__file__).resolve().parent.parent
LOOPBACK = "tcp:0:interface=127.0.0.1"
LISTENERS = ("audiosocket-visitor", "audiosocket-resident", "http")
LISTENING = re.compile(
    r"\b(audiosocket-visitor|audiosocket-resident|http) listening on 127\.0\.0\.1:(\d+)\s*$", re.M
)

#: Seconds a child gets to start listening, and to exit once told to.
START_TIMEOUT = 20.0
EXIT_TIMEOUT = 15.0


def twistd_script() -> str:
    """The C{twistd} console script of this interpreter, as a user's shell would run it."""
    script = Path(sys.executable).with_name("twistd")
    if script.is_file():
        return str(script)
    found = shutil.which("twistd")
    if found is None:
        pytest.fail(f"no twistd script next to {sys.executable} nor on PATH")
    return found


class Child(ProcessProtocol):
    """A child process whose output is kept, in arrival order, until it ends."""

    def __init__(self, argv: list[str]) -> None:
        self.argv = argv
        self.stdout = bytearray()
        self.stderr = bytearray()
        self.combined = bytearray()
        self.ended: Failure | None = None

    def outReceived(self, data: bytes) -> None:
        self.stdout += data
        self.combined += data

    def errReceived(self, data: bytes) -> None:
        self.stderr += data
        self.combined += data

    def processEnded(self, reason: Failure) -> None:
        self.ended = reason

    @property
    def output(self) -> str:
        return self.combined.decode("utf-8", errors="replace")

    @property
    def log(self) -> str:
        return self.stdout.decode("utf-8", errors="replace")

    def describe(self) -> str:
        status = "running" if self.ended is None else repr(self.ended.value)
        return f"{' '.join(self.argv)}\n[{status}]; its output:\n{self.output}"

    def signal(self, name: str) -> None:
        try:
            self.transport.signalProcess(name)
        except ProcessExitedAlready:
            pass

    async def exit(self, timeout: float = EXIT_TIMEOUT) -> BaseException:
        """Wait, bounded, for the child to end; return how it ended."""
        try:
            await until(lambda: self.ended is not None, timeout)
        except AssertionError:
            raise AssertionError(f"child still running after {timeout} s: {self.describe()}") from None
        assert self.ended is not None
        return self.ended.value


Spawn = Callable[..., Child]


def listening_ports(text: str) -> dict[str, int]:
    return {name: int(port) for name, port in LISTENING.findall(text)}


async def start_server(spawn: Spawn, *extra: str, prefix: tuple[str, ...] = ()) -> tuple[Child, dict[str, int]]:
    """
    Run C{twistd -n audiohangup} on loopback ports; wait until all three
    listen and the API answers. C{prefix} runs it under a wrapper (C{prlimit ...}).

    The "listening on" lines come from C{privilegedStartService}, before
    twistd runs its reactor and installs its SIGTERM handler: a SIGTERM
    right after them kills the child without an orderly shutdown. An answer
    from C{/health} proves the reactor runs, so the child is ready.
    """
    command = (*prefix, twistd_script())  # prefix: a wrapper such as prlimit
    child = spawn(
        command[0], *command[1:], "-n", "--pidfile=", "audiohangup",
        "--visitor", LOOPBACK, "--resident", LOOPBACK, "--http", LOOPBACK,
        # The tests that stop a child with live legs mean today's hang-up (a drain would wait for them):
        # those of the drain give --on-stop drain, which comes later and wins.
        "--close-timeout", "1", "--on-stop", "hangup", *extra,
    )
    try:
        await until(
            lambda: child.ended is not None or len(listening_ports(child.log)) == len(LISTENERS),
            START_TIMEOUT,
        )
    except AssertionError:
        raise AssertionError(
            f"no 'listening on' lines within {START_TIMEOUT} s: {child.describe()}"
        ) from None
    if child.ended is not None:
        raise AssertionError(f"twistd ended before listening: {child.describe()}")
    ports = listening_ports(child.log)
    assert sorted(ports) == sorted(LISTENERS), child.describe()
    assert len(set(ports.values())) == 3, ports
    await wait_for_legs(f"http://127.0.0.1:{ports['http']}", 0)
    return child, ports


async def get_json(url: str) -> tuple[int, Any]:
    response = await treq.get(url, persistent=False, timeout=10)
    return response.code, await response.json()


async def post_json(url: str) -> tuple[int, Any]:
    response = await treq.post(url, persistent=False, timeout=10)
    return response.code, await response.json()


async def wait_for_legs(base: str, legs: int, timeout: float = 10.0) -> None:
    """Poll C{GET /health} until it reports C{legs} live legs."""
    deadline = reactor.seconds() + timeout
    while True:
        code, body = await get_json(f"{base}/health")
        if code == 200 and body == {"status": "ok", "legs": legs}:
            return
        if reactor.seconds() > deadline:
            raise AssertionError(f"/health is {code} {body}, not {legs} legs, after {timeout} s")
        await deferLater(reactor, 0.02)


async def settle(deferred: defer.Deferred[Any], what: str, timeout: float = 10.0) -> Any:
    try:
        return await deferred.addTimeout(timeout, reactor)
    except defer.TimeoutError:
        raise AssertionError(f"timed out after {timeout} s waiting for {what}") from None


def assert_sigterm_exit(child: Child, ended: BaseException) -> None:
    """
    twistd stops its reactor on SIGTERM, shuts down in order, then restores
    the default handler and re-raises the signal, so the child dies of it.
    """
    assert isinstance(ended, ProcessTerminated), child.describe()
    assert ended.signal == signal.SIGTERM, child.describe()
    assert ended.exitCode is None, child.describe()


def assert_quiet(child: Child) -> None:
    text = child.output
    for word in ("Traceback", "Unhandled", "ConnectionResetError", "#warn]", "#error]", "#critical]"):
        assert word not in text, f"{word!r} in the log: {child.describe()}"
    assert child.stderr == b"", child.describe()


def assert_orderly_shutdown(child: Child) -> list[str]:
    lines = [line for line in child.log.splitlines() if line.strip()]
    assert len(lines) >= 2, child.describe()
    assert lines[-2].endswith("Main loop terminated."), child.describe()
    assert lines[-1].endswith("Server Shut Down."), child.describe()
    return lines


def index_of(lines: list[str], fragment: str, child: Child) -> int:
    found = [index for index, line in enumerate(lines) if fragment in line]
    assert len(found) == 1, f"{fragment!r} logged {len(found)} times, not once: {child.describe()}"
    return found[0]
